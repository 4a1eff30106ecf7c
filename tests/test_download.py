"""The download task, against a real HTTP server on 127.0.0.1 and real files."""
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ROOT,
    Terminal,
    finish,
    idx_bytes,
    make_mnist,
    npz_bytes,
    run_task,
    sha256,
    start_mnist,
    start_task,
    write_config,
)

import mnist


def run_download(tmp_path, config, capsys):
    """Write `config` as data.yaml and run the task in-process; return (exit code, its output)."""
    write_config(tmp_path / "data.yaml", config)
    run = run_task("download", tmp_path, capsys)
    return run.code, run.out + run.err


def data_files(tmp_path):
    """What data_dir holds but the lock file that download leaves there (see mnist.folder_lock)."""
    folder = tmp_path / "data"
    return sorted(set(os.listdir(folder)) - {mnist.LOCK_NAME}) if folder.exists() else []


def error_line(err):
    """The task's error: exactly one line starting with the task's name, and no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("mnist.py download: error: "), err
    return lines[0]


@pytest.fixture
def served(server):
    """A good npz on the HTTP server: (its data config, its bytes)."""
    body = npz_bytes(make_mnist())
    return {"uri": server.serve("/mnist.npz", body), "hash": sha256(body)}, body


def test_download_writes_verified_npz_and_log(tmp_path, served, capsys, monkeypatch):
    monkeypatch.setattr(mnist, "CHUNK", 4096)  # several chunks, so progress has something to report
    config, body = served
    code, err = run_download(tmp_path, config, capsys)
    assert code == 0, err
    assert (tmp_path / "data" / "mnist.npz").read_bytes() == body
    assert data_files(tmp_path) == ["download.json", "mnist.npz"]  # no temporary files left
    record = json.loads((tmp_path / "data" / "download.json").read_text())
    assert record["mnist.npz"] == config["hash"]
    log = (tmp_path / "logs" / "mnist_download.log").read_text()
    for event in ("started download", "read ", f"fetched {len(body)} bytes from {config['uri']}",
                  "verified SHA-256", "written "):
        assert event in log
    assert log.splitlines()[0][:4].isdigit()  # timestamped
    assert [line.split(":")[1].split()[0] for line in err.splitlines() if "% of" in line] == [
        "25%", "50%", "75%", "100%"]  # progress, not on a terminal: a line a quarter


def test_live_progress_bar_on_a_terminal(tmp_path, served, capsys, monkeypatch):
    monkeypatch.setattr(mnist, "CHUNK", 4096)
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    config, body = served
    assert run_download(tmp_path, config, capsys)[0] == 0
    frames = terminal.getvalue().split("\r")[1:]  # each redraw starts at the line's beginning
    assert len(frames) == -(-len(body) // 4096) and frames[-1].endswith("\n")
    assert frames[0].startswith("mnist.npz [#") and frames[-1].startswith(f"mnist.npz [{'#' * 30}]")
    assert "% of" not in terminal.getvalue()  # the quarter lines are for logs, not terminals


def test_rerun_downloads_nothing(tmp_path, served, server, capsys):
    config, _ = served
    assert run_download(tmp_path, config, capsys)[0] == 0
    code, err = run_download(tmp_path, config, capsys)
    assert code == 0 and "skipped" in err
    assert server.hits["/mnist.npz"] == 1


def test_sha256_prefix_and_upper_case_accepted(tmp_path, served, capsys):
    config, _ = served
    config["hash"] = "sha256:" + config["hash"].upper()
    assert run_download(tmp_path, config, capsys)[0] == 0


def test_wrong_hash_leaves_nothing(tmp_path, served, capsys):
    config, body = served
    config["hash"] = "0" * 64
    code, err = run_download(tmp_path, config, capsys)
    line = error_line(err)
    assert code == 1 and "0" * 64 in line and sha256(body) in line
    assert data_files(tmp_path) == []


def test_wrong_hash_keeps_earlier_good_file(tmp_path, served, server, capsys):
    config, body = served
    assert run_download(tmp_path, config, capsys)[0] == 0
    other = npz_bytes(make_mnist(seed=1))
    code, err = run_download(tmp_path, {"uri": server.serve("/other.npz", other), "hash": "a" * 64}, capsys)
    assert code == 1 and "SHA-256 mismatch" in error_line(err)
    assert (tmp_path / "data" / "mnist.npz").read_bytes() == body
    assert data_files(tmp_path) == ["download.json", "mnist.npz"]


def test_truncated_body_is_an_error_not_a_file(tmp_path, server, capsys):
    body = npz_bytes(make_mnist())
    code, err = run_download(tmp_path, {"uri": server.serve("/cut.npz", body, truncate=100),
                                        "hash": sha256(body)}, capsys)
    assert code == 1 and "short of its Content-Length" in error_line(err)
    assert server.hits["/cut.npz"] == mnist.HTTP_ATTEMPTS
    assert data_files(tmp_path) == []


def test_404_is_not_retried(tmp_path, server, capsys):
    code, err = run_download(tmp_path, {"uri": server.url("/missing.npz"), "hash": "b" * 64}, capsys)
    assert code == 1 and "HTTP 404" in error_line(err)
    assert server.hits["/missing.npz"] == 1
    assert data_files(tmp_path) == []


def test_500_is_retried_until_success(tmp_path, server, capsys):
    body = npz_bytes(make_mnist())
    url = server.serve("/flaky.npz", body, fail=2)
    code, err = run_download(tmp_path, {"uri": url, "hash": sha256(body)}, capsys)
    assert code == 0, err
    assert server.hits["/flaky.npz"] == 3 and err.count("retrying") == 2


def test_500_forever_gives_up(tmp_path, server, capsys):
    url = server.serve("/down.npz", b"x", fail=99)
    code, err = run_download(tmp_path, {"uri": url, "hash": sha256(b"x")}, capsys)
    assert code == 1 and f"after {mnist.HTTP_ATTEMPTS} attempts" in error_line(err)
    assert server.hits["/down.npz"] == mnist.HTTP_ATTEMPTS


def test_stalled_server_times_out(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setattr(mnist, "HTTP_ATTEMPTS", 2)
    url = server.serve("/slow.npz", b"x", stall=2 * mnist.HTTP_TIMEOUT)
    code, err = run_download(tmp_path, {"uri": url, "hash": sha256(b"x")}, capsys)
    assert code == 1 and "timed out" in error_line(err)
    assert data_files(tmp_path) == []


def test_connection_refused(tmp_path, server, capsys):
    url = server.url("/x.npz")
    server.httpd.shutdown()
    server.httpd.server_close()
    code, err = run_download(tmp_path, {"uri": url, "hash": "c" * 64}, capsys)
    assert code == 1 and "refused" in error_line(err)


def test_not_an_npz(tmp_path, server, capsys):
    body = b"<html>a login page, not data</html>"
    code, err = run_download(tmp_path, {"uri": server.serve("/page", body), "hash": sha256(body)}, capsys)
    assert code == 1 and "not a readable .npz" in error_line(err)
    assert data_files(tmp_path) == []


def test_npz_with_object_arrays_is_refused(tmp_path, server, capsys):
    arrays = make_mnist()
    arrays["y_train"] = np.array([object()] * 64)
    body = npz_bytes(arrays)
    code, err = run_download(tmp_path, {"uri": server.serve("/pickle.npz", body), "hash": sha256(body)}, capsys)
    assert code == 1 and "pickle" in error_line(err).lower()
    assert data_files(tmp_path) == []


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("x_test"), "missing array 'x_test'"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "x_train must be uint8"),
    (lambda a: a.update(x_test=a["x_test"][:, :27]), "x_test's images are 27×28, x_train's 28×28; train and test"),
    (lambda a: a.update(y_train=a["y_train"] + 5),
     "y_train labels must be 0..14, each present, but 0, 1, 2, 3, 4 never"),
    (lambda a: a.update(y_test=a["y_test"][:-1]), "y_test must be 16 integer labels"),
])
def test_npz_with_wrong_arrays_is_refused(tmp_path, server, capsys, change, message):
    arrays = make_mnist()
    change(arrays)
    body = npz_bytes(arrays)
    code, err = run_download(tmp_path, {"uri": server.serve("/bad.npz", body), "hash": sha256(body)}, capsys)
    assert code == 1 and message in error_line(err)
    assert data_files(tmp_path) == []


def test_file_uri_and_plain_paths(tmp_path, capsys):
    body = npz_bytes(make_mnist())
    (tmp_path / "copy.npz").write_bytes(body)
    for uri in (f"file://{tmp_path / 'copy.npz'}", str(tmp_path / "copy.npz"), "copy.npz"):
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
        code, err = run_download(tmp_path, {"uri": uri, "hash": sha256(body)}, capsys)
        assert code == 0, err
        assert (tmp_path / "data" / "mnist.npz").read_bytes() == body


def test_missing_local_file(tmp_path, capsys):
    code, err = run_download(tmp_path, {"uri": "nowhere.npz", "hash": "d" * 64}, capsys)
    assert code == 1 and "nowhere.npz: cannot read" in error_line(err)


@pytest.mark.parametrize("config, message", [
    ({"uri": "ftp://example.org/mnist.npz", "hash": "e" * 64}, "unsupported uri scheme 'ftp:'"),
    ({"uri": "x.npz"}, "missing key 'hash'"),
    ({"uri": "x.npz", "hash": "e" * 64, "sha": 1}, "unknown key 'sha'"),
    ({"uri": "x.npz", "hash": "md5:abc"}, "hash must be a SHA-256 digest"),
    ("uri: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ({"files": {"train_images": {"uri": "a", "hash": "e" * 64}}}, "files: missing key 'train_labels'"),
    ({"files": {n: {"uri": "a"} for n in mnist.IDX_FILES}}, "files.train_images: missing key 'hash'"),
])
def test_bad_data_config(tmp_path, capsys, config, message):
    code, err = run_download(tmp_path, config, capsys)
    line = error_line(err)
    assert code == 1 and str(tmp_path / "data.yaml") in line and message in line
    assert data_files(tmp_path) == []


def idx_config(server, arrays, gzipped):
    files = {}
    for name, key in mnist.IDX_FILES.items():
        body = idx_bytes(arrays[key])
        body = gzip.compress(body) if gzipped else body
        files[name] = {"uri": server.serve(f"/{name}", body), "hash": sha256(body)}
    return {"files": files}


@pytest.mark.parametrize("gzipped", [True, False])
def test_idx_route_assembles_npz(tmp_path, server, capsys, gzipped):
    arrays = make_mnist()
    config = idx_config(server, arrays, gzipped)
    code, err = run_download(tmp_path, config, capsys)
    assert code == 0, err
    loaded, _ = mnist.load_mnist(str(tmp_path / "data" / "mnist.npz"))
    for key in mnist.ARRAYS:
        np.testing.assert_array_equal(loaded[key], arrays[key])
    assert data_files(tmp_path) == ["download.json", "mnist.npz"]
    code, err = run_download(tmp_path, config, capsys)  # same sources: nothing fetched again
    assert code == 0 and "skipped" in err and server.hits["/train_images"] == 1


def test_idx_route_refuses_a_corrupt_idx(tmp_path, server, capsys):
    config = idx_config(server, make_mnist(), gzipped=True)
    bad = gzip.compress(b"\0\0\x08\x03" + b"\0" * 20)
    config["files"]["test_images"] = {"uri": server.serve("/bad", bad), "hash": sha256(bad)}
    code, err = run_download(tmp_path, config, capsys)
    assert code == 1 and "not an IDX file" in error_line(err)
    assert data_files(tmp_path) == []


def test_real_idx_files_over_http(tmp_path, server, capsys, real_data):
    """The four original IDX .gz files, with their canonical SHA-256 digests from SHA256SUMS."""
    digests = dict(reversed(line.split()) for line in (real_data / "SHA256SUMS").read_text().splitlines())
    names = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
             "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
    config = {"files": {name: {"uri": server.serve(f"/{file}", (real_data / file).read_bytes()),
                               "hash": digests[file]} for name, file in names.items()}}
    code, err = run_download(tmp_path, config, capsys)
    assert code == 0, err
    arrays, _ = mnist.load_mnist(str(tmp_path / "data" / "mnist.npz"))
    assert arrays["x_train"].shape == (60000, 28, 28) and arrays["x_test"].shape == (10000, 28, 28)
    assert np.bincount(arrays["y_train"]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(arrays["y_test"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    with np.load(real_data / "mnist.npz") as keras:
        for key in mnist.ARRAYS:
            np.testing.assert_array_equal(arrays[key], keras[key])


def test_real_npz_over_http(tmp_path, server, capsys, real_data):
    body = (real_data / "mnist.npz").read_bytes()
    code, err = run_download(tmp_path, {"uri": server.serve("/mnist.npz", body), "hash": sha256(body)}, capsys)
    assert code == 0, err
    assert sha256((tmp_path / "data" / "mnist.npz").read_bytes()) == sha256(body)


def test_help_and_usage_errors_answer_before_jax_is_imported(tmp_path):
    """A `jax` that cannot be imported first on the path: --help and a mistyped command still answer,
    so they never wait seconds for JAX."""
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text("raise ImportError('jax was imported')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    assert finish(start_mnist("train", "--help", env=env)).code == 0
    mistyped = finish(start_mnist("trian", env=env))
    assert mistyped.code == 2 and "invalid choice: 'trian'" in mistyped.err and "jax was imported" not in mistyped.err
    assert "jax was imported" in finish(start_mnist("download", "--data_config=a", "--data_dir=b", "--log_dir=c",
                                                    env=env)).err  # a real task does import it


def test_cli_help_lists_tasks_and_parameters():
    top = finish(start_mnist("--help"))
    assert top.code == 0 and "download" in top.out
    task = finish(start_mnist("download", "--help"))
    assert task.code == 0
    assert all(f"--{p}" in task.out for p in ("data_config", "data_dir", "log_dir"))


@pytest.mark.parametrize("args", [["fly"], ["download", "--data_config=a", "--data_dir=b", "--log_dir=c", "--x=1"],
                                  ["download", "--data_dir=b", "--log_dir=c"]])
def test_cli_usage_errors_exit_2(args):
    result = finish(start_mnist(*args))
    assert result.code == 2 and "usage:" in result.err


def test_cli_error_exits_1_with_one_line(tmp_path):
    write_config(tmp_path / "data.yaml", "uri: x.npz\n")
    result = finish(start_task("download", tmp_path))
    assert result.code == 1
    assert result.err.strip().splitlines()[-1] == (
        f"mnist.py download: error: {tmp_path / 'data.yaml'}: missing key 'hash' (expected uri, hash, size, classes)")


FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_is_a_drop_in_twin(tmp_path, capsys):
    """The IDX route on a real twin data set, from file:// URIs: Fashion-MNIST has 6000 images of each
    class for training and 1000 for testing."""
    names = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
             "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
    config = {"files": {name: {"uri": (FASHION / file).as_uri(), "hash": sha256((FASHION / file).read_bytes())}
                        for name, file in names.items()}}
    code, out = run_download(tmp_path, config, capsys)
    assert code == 0, out
    arrays, _ = mnist.load_mnist(str(tmp_path / "data" / "mnist.npz"))
    assert arrays["x_train"].shape == (60000, 28, 28) and arrays["x_test"].shape == (10000, 28, 28)
    assert np.bincount(arrays["y_train"]).tolist() == [6000] * 10
    assert np.bincount(arrays["y_test"]).tolist() == [1000] * 10


def test_readme_says_how_often_a_download_is_tried():
    """The words and the behaviour agree: HTTP_ATTEMPTS tries in all, the first and its retries."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"are tried {mnist.HTTP_ATTEMPTS} times in all ({mnist.HTTP_ATTEMPTS - 1} retries" in readme
