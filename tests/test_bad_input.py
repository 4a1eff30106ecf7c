"""Bad input and faults, as a careless or hostile user brings them: each case ends in one line naming
the file, key or value and what was expected, exit 1, no traceback, no temporary file left anywhere,
and the earlier good outputs intact. Then Hypothesis fuzzes the config and image readers."""
import gzip
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    ROOT,
    finish,
    idx_bytes,
    make_digits,
    npz_bytes,
    run_task,
    sha256,
    start_task,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mnist


def digests(ws: Path) -> dict[str, str]:
    return {str(p.relative_to(ws)): sha256(p.read_bytes()) for p in sorted(ws.rglob("*"))
            if p.is_file() and p.parent.name in ("data", "model")}


def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def make_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


# Each case's `prepare` changes the workspace and returns the parameters to change: none ({}) for these.
def rewrite(path: Path, content) -> dict:
    write(path, content)
    return {}


def data_config(ws: Path, lines: str) -> dict:
    return rewrite(ws / "data.yaml", f"hash: {'a' * 64}\n" + lines)


def train_config(ws: Path, lines: str) -> dict:
    """A train.yaml that would be good but for `lines`."""
    return rewrite(ws / "train.yaml", "optimizer: adam\ntrain_epochs: 1\nbatch_size: 32\n" + lines)


def model_json_without(ws: Path, key: str) -> dict:
    summary = json.loads((ws / "model" / "model.json").read_text())
    return rewrite(ws / "model" / "model.json", json.dumps({k: v for k, v in summary.items() if k != key}))


def source_without(ws: Path, array: str) -> dict:
    """A downloaded npz that lacks `array`, with its right hash."""
    body = npz_bytes({k: v for k, v in make_digits().items() if k != array})
    return rewrite(ws / "data.yaml", f"uri: {write(ws / 'bad.npz', body)}\nhash: {sha256(body)}\n")


# Each case: (name, task, what to do to the workspace before the run, returning the parameters to
# change, and the fragment the one line must hold).
CASES = [
    ("/dev/zero as the source", "download",
     lambda ws: data_config(ws, "uri: file:///dev/zero\n"),
     "/dev/zero: not a regular file (a device, FIFO or socket)"),
    ("a FIFO as the source", "download",
     lambda ws: data_config(ws, f"uri: {fifo(ws / 'fifo')}\n"),
     "fifo: not a regular file"),
    ("a source larger than its size:", "download",
     lambda ws: data_config(ws, "uri: mnist.npz\nsize: 1000\n"),
     "ws/mnist.npz: stopped after 1000 bytes, its size in the data config is 1000"),
    ("size: not a number of bytes", "download",
     lambda ws: data_config(ws, "uri: mnist.npz\nsize: -5\n"),
     "size must be the file's size in bytes, 1 to 17179869184, got -5"),
    ("data_dir is a file", "download",
     lambda ws: {"data_dir": write(ws / "plain", "x")}, "plain: a file stands where a folder is expected"),
    ("data_dir/mnist.npz is a folder", "download",
     lambda ws: {"data_dir": make_folder(ws / "fresh" / "mnist.npz").parent},
     "mnist.npz: is a folder where a file is expected"),
    ("a YAML alias bomb as the seed", "train",
     lambda ws: rewrite(ws / "train.yaml", "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
                       + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                                 for p, c in zip("abcdefgh", "bcdefghi", strict=True))
                       + "optimizer: adam\ntrain_epochs: 1\nbatch_size: 32\nseed: *i\n"),
     "not valid YAML (aliases (*name) are not allowed"),
    ("a config of a megabyte", "train",
     lambda ws: rewrite(ws / "train.yaml", "optimizer: adam\n" + "#" * (1 << 20) + "\n"), "larger than 64 KiB"),
    ("YAML nested thousands deep", "train",
     lambda ws: rewrite(ws / "train.yaml", "seed: " + "[" * 30000 + "]" * 30000 + "\n"), "not valid YAML"),
    ("a key of a kilobyte", "train",
     lambda ws: train_config(ws, "k" * 1000 + ": 1\n"),
     "unknown key 'kkkkkkkk"),
    ("learning_rate .nan", "train",
     lambda ws: train_config(ws, "learning_rate: .nan\n"),
     "learning_rate must be a finite number, got nan"),
    ("learning_rate .inf", "train",
     lambda ws: train_config(ws, "learning_rate: .inf\n"),
     "learning_rate must be a finite number, got inf"),
    ("target_accuracy .nan", "train",
     lambda ws: train_config(ws, "target_accuracy: .nan\n"),
     "target_accuracy must be a finite number"),
    ("a seed beyond int32", "train",
     lambda ws: train_config(ws, f"seed: {2**40}\n"),
     "seed must lie in 0..2147483646, got 1099511627776"),
    ("train_epochs beyond the step counter", "train",
     lambda ws: rewrite(ws / "train.yaml", f"optimizer: adam\nbatch_size: 32\ntrain_epochs: {10**12}\n"),
     "makes more than 2147483647 steps, which the step counter cannot count; use at most 134217727"),
    ("model.json without test_loss", "evaluate",
     lambda ws: model_json_without(ws, "test_loss"), "model.json: missing test_loss, which train writes"),
    ("model.json that is not JSON", "evaluate",
     lambda ws: rewrite(ws / "model" / "model.json", "{not json"), "model.json: not a readable model.json"),
    ("--predictions is a folder", "infer",
     lambda ws: {"predictions": make_folder(ws / "out")}, "out: is a folder where a file is expected"),
    ("--predictions under a file", "infer",
     lambda ws: {"predictions": write(ws / "plain", "x") / "p.json"},
     "plain: a file stands where a folder is expected"),
    ("IDX sizes that overflow", "infer",
     lambda ws: {"images": write(ws / "huge.idx", b"\0\0\x08\x03" + struct.pack(">3i", 2**31 - 1, 28, 28)
                                 + bytes(784))},
     "huge.idx: ends within image 2 of the 2147483647 it declares"),
    ("IDX sizes that are negative", "infer",
     lambda ws: {"images": write(ws / "neg.idx", b"\0\0\x08\x03" + struct.pack(">3i", -1, 28, 28))},
     "not an IDX file of unsigned bytes (negative sizes (-1, 28, 28))"),
    ("a text file named .npy", "infer",
     lambda ws: {"images": write(ws / "notes.npy", "these are my notes\n")},
     "notes.npy: not images infer reads (a .npy, an .npz or an IDX file, gzipped or not, or image files"),
    ("images that are a device", "infer",
     lambda ws: {"images": "/dev/zero"}, "/dev/zero: not a regular file"),
    ("a downloaded npz without x_test", "download",
     lambda ws: source_without(ws, "x_test"),
     "bad.npz: missing array 'x_test'"),
    ("an npz whose x_train declares 713 TiB", "train",
     lambda ws: rewrite(ws / "data" / "mnist.npz", npz_declaring(make_digits(), "x_train", (10**9, 28**2, 10**3))),
     "its x_train declares 1000000000×784×1000 uint8 (784000000000000 bytes) in "),
    ("an empty npz as images", "infer",
     lambda ws: {"images": write(ws / "empty.npz", npz_bytes({}))}, "empty.npz: holds no arrays; expected one"),
    ("--predictions is the images", "infer",
     lambda ws: {"predictions": ws / "data" / "mnist.npz"}, "mnist.npz: is one of infer's inputs"),
    ("--predictions is params.msgpack", "infer",
     lambda ws: {"predictions": ws / "model" / "params.msgpack"}, "params.msgpack: is one of infer's inputs"),
    ("--predictions is a user's file", "infer",
     lambda ws: {"predictions": write(ws / "data" / "notes.json", '{"mine": 1}')},
     "notes.json: already exists and is not a predictions file that infer wrote"),
    ("a uri with a malformed IPv6 host", "download",
     lambda ws: data_config(ws, "uri: http://[::1/x\n"), "not a valid uri: 'http://[::1/x' (Invalid IPv6 URL)"),
    ("a uri with a port out of range", "download",
     lambda ws: data_config(ws, "uri: http://127.0.0.1:99999/x\n"), "not a valid uri: 'http://127.0.0.1:99999/x'"),
    ("a uri with a host that is not ASCII", "download",
     lambda ws: data_config(ws, "uri: http://exämple.test/mnist.npz\n"), "is not ASCII; write it in its ASCII form"),
    ("a misspelt key", "train",
     lambda ws: rewrite(ws / "train.yaml", "optimizer: adam\ntrain_epoch: 1\nbatch_size: 32\n"),
     "train.yaml: unknown key 'train_epoch'; did you mean 'train_epochs'?"),
    ("a key given twice", "train",
     lambda ws: train_config(ws, "batch_size: 64\n"), "not valid YAML (key 'batch_size' given twice"),
]


def npz_declaring(arrays: dict, key: str, shape: tuple) -> bytes:
    """An npz of `arrays` whose `key` member's header declares `shape` over the data it really holds."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            header = {"descr": "|u1", "fortran_order": False, "shape": shape} if name == key else None
            if header is None:
                np.save(member, array)
            else:
                np.lib.format.write_array_header_1_0(member, header)
                member.write(array.tobytes())
            archive.writestr(f"{name}.npy", member.getvalue())
    return buffer.getvalue()


def part_files(ws: Path) -> list[str]:
    """The temporary files under `ws`: this cube's, and any other ending in .part."""
    return [str(p) for p in ws.rglob("*.part")]


@pytest.mark.parametrize("name, task, prepare, fragment", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_loses_nothing(trained, tmp_path, capsys, name, task, prepare, fragment):
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    change = prepare(ws)
    before = digests(ws)
    started = time.perf_counter()
    code, _, err = run_task(task, ws, capsys, **change)
    seconds = time.perf_counter() - started
    lines = [line for line in err.splitlines() if line.strip() and "% of " not in line]  # not progress
    assert code == 1 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"mnist.py {task}: error: ") and fragment in lines[0], err
    assert len(lines[0]) < 400 and seconds < 30
    assert part_files(ws) == [] and digests(ws) == before
    if task != "infer":  # the line is in the task's log file too
        assert lines[0] in (ws / "logs" / f"mnist_{task}.log").read_text()


# ------------------------------------------------------------------------- bounded downloads
def test_endless_http_body_stops_at_the_cap(trained, tmp_path, capsys, server, monkeypatch):
    monkeypatch.setattr(mnist, "MAX_DATA_BYTES", 4 << 20)
    url = server.serve("/forever", bytes(65536), endless=True)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"uri": url, "hash": "a" * 64}))
    code, _, err = run_task("download", tmp_path, capsys)
    assert code == 1 and f"{url}: stopped after {4 << 20} bytes, the most a data file may have" in err
    assert part_files(tmp_path) == []


def test_declared_length_that_disagrees_with_size_stops_at_once(tmp_path, capsys, server):
    body = npz_bytes(make_digits())
    url = server.serve("/mnist.npz", body)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"uri": url, "hash": sha256(body), "size": len(body) - 1}))
    code, _, err = run_task("download", tmp_path, capsys)
    assert code == 1 and f"the server declares {len(body)} bytes, but its size in the data config is" in err
    assert server.hits["/mnist.npz"] == 1  # not retried


def test_size_that_matches_is_accepted(tmp_path, capsys, server):
    body = npz_bytes(make_digits())
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"uri": server.serve("/m.npz", body), "hash": sha256(body),
                                                        "size": len(body)}))
    assert run_task("download", tmp_path, capsys).code == 0


# --------------------------------------------------------------------------- one run a folder
@pytest.mark.parametrize("task, folder", [("download", "data"), ("train", "model")])
def test_second_run_into_a_busy_folder_is_refused(trained, tmp_path, capsys, task, folder):
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    before = digests(ws)
    with mnist.folder_lock(str(ws / folder)):
        code, _, err = run_task(task, ws, capsys)
    assert code == 1 and f"{ws / folder}: in use by another run (writing or reading it); wait for it" in err
    assert digests(ws) == before


def test_lock_dies_with_its_process_and_only_its_temp_files_go(trained, tmp_path):
    """kill -9 leaves a temporary file that its process held; the next run that writes in the folder
    removes it, and leaves alone a user's file that merely looks temporary."""
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import mnist\n"
                               "with mnist.folder_lock(sys.argv[2]), mnist.staged(sys.argv[2] + '/mnist.npz'):\n"
                               "    print('held', flush=True); time.sleep(60)",
                               str(ROOT), str(ws / "data")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    write(ws / "data" / ".notes.part", "a user's own file")
    assert len(part_files(ws)) == 2
    holder.kill()
    holder.wait()
    result = finish(start_task("download", ws))
    assert result.code == 0, result.err
    assert sorted(os.listdir(ws / "data")) == [mnist.LOCK_NAME, ".notes.part", "download.json", "mnist.npz"]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, server):
    """`docker stop` and `timeout` send SIGTERM: the half-written download is removed, exit 143."""
    url = server.serve("/slow", bytes(65536), endless=True)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"uri": url, "hash": "a" * 64}))
    process = start_task("download", tmp_path)
    deadline = time.time() + 30
    while not part_files(tmp_path) and time.time() < deadline:
        time.sleep(0.05)
    assert part_files(tmp_path), "the download never started"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 143 and "mnist.py download: terminated" in err and "Traceback" not in err
    assert part_files(tmp_path) == [] and not (tmp_path / "data" / "mnist.npz").exists()


# ------------------------------------------------------------------ faults that need root
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a tmpfs, or another user)")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a full disk for real."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)])


@needs_root
@pytest.mark.parametrize("task", ["download", "train"])
def test_full_disk_is_named_as_a_full_disk(trained, tmp_path, capsys, tiny_disk, task):
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    write(tiny_disk / "filler", bytes(200 << 10))  # room for logs, not for data or a model
    folder = {"download": "data_dir", "train": "model_dir"}[task]
    code, _, err = run_task(task, ws, capsys, **{folder: tiny_disk / "out"})
    assert code == 1 and "Traceback" not in err
    assert f"{tiny_disk / 'out'}: no space left on its device" in err and "retrying" not in err
    assert part_files(tiny_disk) == []


@needs_root
def test_unwritable_data_dir_is_one_line(trained):
    """As root nothing is unwritable: run as uid 4321 against a folder root owns."""
    base = Path(tempfile.mkdtemp(prefix="mnist-unwritable-"))
    try:
        ws = base / "ws"
        shutil.copytree(trained, ws)
        os.chmod(base, 0o755)
        for path in (ws, *ws.rglob("*")):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        for path in (ws / "logs", *(ws / "logs").iterdir()):
            path.chmod(0o777)  # room for the log, so that the data folder is the fault
        result = finish(start_task("download", ws, env={"HOME": str(base)}, data_dir=ws / "locked",
                                   run_as=("setpriv", "--reuid=4321", "--regid=4321", "--clear-groups")))
        assert result.code == 1 and "Traceback" not in result.err
        assert result.err.strip().splitlines() == [f"mnist.py download: error: {ws / 'locked'}: "
                                                      "permission denied; check who owns it, or choose another folder"]
    finally:
        shutil.rmtree(base)


# ------------------------------------------------------------------------------ infer's memory
def test_infer_streams_any_number_of_images(trained, tmp_path, capsys):
    """25,000 images from a gzipped IDX, in three batches; the same answers as scoring them at once."""
    images = np.tile(make_digits()["x_test"], (200, 1, 1))[:25000]
    path = write(tmp_path / "many.idx.gz", gzip.compress(idx_bytes(images)))
    assert run_task("infer", trained, capsys, images=path, predictions=tmp_path / "p.json").code == 0
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    params, _, _ = mnist.load_model(str(trained / "model"))
    expected = np.asarray(mnist.class_probabilities(params, images[24000:], 255))
    assert len(predictions) == 25000
    assert [p["class"] for p in predictions[24000:]] == [int(p.argmax()) for p in expected]


# ------------------------------------------------------------------------------------ fuzzing
fuzz = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                   st.lists(st.integers(), max_size=3))
keys = st.sampled_from(["optimizer", "train_epochs", "batch_size", "learning_rate", "seed", "target_accuracy",
                        "uri", "hash", "size", "files", "other"])


def reads_or_refuses(reader, path) -> object:
    try:
        return reader(str(path))
    except mnist.CubeError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e) and len(str(e)) < 400
        return None


@fuzz
@given(st.one_of(st.text(max_size=300), st.dictionaries(keys, values, max_size=7).map(yaml.safe_dump)))
def test_fuzz_train_config_reads_or_refuses(tmp_path, text):
    config = reads_or_refuses(mnist.read_train_config, write(tmp_path / "train.yaml", text))
    if config is not None:
        assert config.optimizer in mnist.OPTIMIZERS and config.train_epochs > 0 and config.batch_size > 0
        assert 0 < config.learning_rate < float("inf") and 0 <= config.seed <= mnist.MAX_SEED


@fuzz
@given(st.one_of(st.text(max_size=300), st.dictionaries(keys, values, max_size=5).map(yaml.safe_dump)))
def test_fuzz_data_config_reads_or_refuses(tmp_path, text):
    read = reads_or_refuses(mnist.read_data_config, write(tmp_path / "data.yaml", text))
    if read is not None:
        sources, _ = read
        assert all(len(s.sha256) == 64 and (s.size is None or 0 < s.size) for s in sources.values())


@fuzz
@given(st.one_of(st.binary(max_size=3000),
                 st.tuples(st.integers(0, 5), st.lists(st.integers(-2**31, 2**31 - 1), max_size=4),
                           st.binary(max_size=3000)).map(
                     lambda t: b"\0\0\x08" + bytes([t[0]]) + struct.pack(f">{len(t[1])}i", *t[1]) + t[2]),
                 st.tuples(st.integers(0, 20), st.integers(-2, 2)).map(  # N×28×28 headers, bodies near their size
                     lambda t: b"\0\0\x08\x03" + struct.pack(">3i", t[0], 28, 28) + bytes(max(0, 784 * t[0] + t[1])))))
def test_fuzz_idx_images_read_or_refuse(tmp_path, data):
    images_read_whole_or_refused(write(tmp_path / "images.idx", data))


@fuzz
@given(st.one_of(st.binary(max_size=400).map(lambda tail: b"\x93NUMPY\x01\x00" + tail),
                 st.tuples(st.integers(0, 20), st.integers(-2, 2)).map(  # N×28×28 arrays, cut or grown near their end
                     lambda t: npy_bytes(np.zeros((t[0], 28, 28), np.uint8), t[1]))))
def test_fuzz_npy_header_reads_or_refuses(tmp_path, data):
    images_read_whole_or_refused(write(tmp_path / "images.npy", data))


def images_read_whole_or_refused(path: Path) -> None:
    """Assert that infer's reader gives every image the file declares, 28×28, 7 at a time, or refuses it."""
    def read_all(path):
        with mnist.image_batches(path, 7, (28, 28)) as (count, batches, _):
            return count, [batch.shape for batch in batches]
    result = reads_or_refuses(read_all, path)
    if result is not None:
        count, shapes = result
        assert sum(shape[0] for shape in shapes) == count and all(s[1:] == (28, 28) for s in shapes)


def npy_bytes(array: np.ndarray, change: int) -> bytes:
    """A .npy file of `array`, cut short by -change bytes or grown by change zero bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    return data[:len(data) + change] if change < 0 else data + bytes(change)
