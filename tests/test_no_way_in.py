"""No way in, as an attacker tries it against the tasks: a local user, a hostile config or server, or
a compromised container's leftovers. Each attack ends refused in one line, or done safely: nothing
planted at a path makes a task write elsewhere, read for ever, or stop for good; nothing a config or
a server says forges a log line, leaves http(s), or reads another host's files. (The runners' side,
the Slurm script, mounts and pods, is in test_slurm.py, test_runners.py and test_k8s.py; the
compilation cache in test_cache.py.)"""
import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import (
    digits_workspace,
    finish,
    make_digits,
    needs_docker,
    npz_bytes,
    run_task,
    sha256,
    source_workspace,
    start_task,
)

import mnist
import noxfile

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as another local user")
AS_ANOTHER_USER = ("setpriv", "--reuid=4321", "--regid=4321", "--clear-groups")


def one_error_line(err: str, task: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mnist.py {task}: error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------ planted paths
def test_a_symlink_at_a_log_path_is_not_followed(tmp_path, capsys):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file\n")
    (ws / "logs").mkdir()
    (ws / "logs" / "mnist_download.log").symlink_to(victim)
    result = run_task("download", ws, capsys)
    assert result.code == 1 and "mnist_download.log: a symbolic link stands there" in result.err
    assert victim.read_text() == "a user's file\n" and not (ws / "data" / "mnist.npz").exists()


def test_a_fifo_at_the_checkpoint_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO waits for a writer that never comes; the task refuses it in one line."""
    ws = digits_workspace(tmp_path / "ws")
    (ws / "model").mkdir()
    os.mkfifo(ws / "model" / mnist.CHECKPOINT_NAME)
    result = finish(start_task("train", ws), timeout=300)
    assert result.code == 1
    assert f"{mnist.CHECKPOINT_NAME}: not a regular file" in one_error_line(result.err, "train")


def test_a_data_file_linked_to_dev_zero_is_replaced_not_read_for_ever(tmp_path):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    (ws / "data").mkdir()
    (ws / "data" / "mnist.npz").symlink_to("/dev/zero")
    result = finish(start_task("download", ws), timeout=120)
    assert result.code == 0, result.err
    assert not (ws / "data" / "mnist.npz").is_symlink()
    assert sha256((ws / "data" / "mnist.npz").read_bytes()) == sha256((ws / "mnist.npz").read_bytes())


def test_lock_files_are_the_tasks_own_and_private(tmp_path, capsys):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    assert run_task("download", ws, capsys).code == 0
    lock = ws / "data" / mnist.LOCK_NAME
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600 and lock.stat().st_uid == os.geteuid()


@needs_root
def test_another_local_user_cannot_stop_a_run_by_locking_its_folder():
    """uid 4321 can open a 0755 folder, but not the 0600 lock file in it: a lock on what it can open
    leaves the task free."""
    base = Path(tempfile.mkdtemp(prefix="mnist-lock-"))
    os.chmod(base, 0o755)
    ws = source_workspace(base / "ws", npz_bytes(make_digits()))
    (ws / "data").mkdir()
    hold = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n")
    holder = subprocess.Popen([*AS_ANOTHER_USER, sys.executable, "-c", hold, str(ws / "data")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = finish(start_task("download", ws), timeout=120)
        assert result.code == 0, result.err
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(base)


def test_a_temporary_file_locked_by_another_process_is_left_for_a_new_one(tmp_path, monkeypatch):
    """Another process that locks the task's new temporary file before the task does (its name shows
    in the folder at once) costs the task a new name, never a wait without end."""
    locked = []
    real_lock = mnist.lock

    def raced(fd, shared):
        if not locked:  # the first file: another process takes it first
            path = os.readlink(f"/proc/self/fd/{fd}")
            locked.append(os.open(path, os.O_RDONLY))
            fcntl.flock(locked[0], fcntl.LOCK_EX)
        real_lock(fd, shared)

    monkeypatch.setattr(mnist, "lock", raced)
    writer = threading.Thread(target=mnist.write_atomically, args=(str(tmp_path / "out.json"), b"{}"), daemon=True)
    writer.start()
    writer.join(timeout=20)
    assert not writer.is_alive() and (tmp_path / "out.json").read_bytes() == b"{}"
    os.close(locked[0])


# ------------------------------------------------------------------------ what configs and servers say
def test_a_uri_cannot_forge_a_log_line(tmp_path, capsys):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    (ws / "data.yaml").write_text(yaml.safe_dump({"uri": "x.npz\nINFO verified SHA-256 of everything\r",
                                                  "hash": "0" * 64}))
    result = run_task("download", ws, capsys)
    assert result.code == 1
    log = (ws / "logs" / "mnist_download.log").read_text()
    assert "\\nINFO verified" in log and "\\x0d" in log
    assert all(line[:4].isdigit() for line in log.splitlines())  # every line starts with its timestamp
    assert not any(line.startswith("INFO") for line in (result.out + result.err).splitlines())


def test_a_redirect_to_ftp_is_refused(tmp_path, capsys, server):
    ws = source_workspace(tmp_path / "ws", b"", server)
    server.serve("/mnist.npz", b"", status=302, location="ftp://127.0.0.1/mnist.npz")
    result = run_task("download", ws, capsys)
    assert result.code == 1 and server.hits["/mnist.npz"] == 1  # not retried
    assert "redirects to 'ftp://127.0.0.1/mnist.npz'; only redirects to http(s)" in one_error_line(result.err,
                                                                                                    "download")


def test_a_redirect_to_http_is_followed(tmp_path, capsys, server):
    body = npz_bytes(make_digits())
    ws = source_workspace(tmp_path / "ws", body, server)
    server.serve("/mnist.npz", b"", status=302, location=server.serve("/moved.npz", body))
    assert run_task("download", ws, capsys).code == 0 and server.hits["/moved.npz"] == 1


def test_a_redirect_from_https_to_http_is_refused():
    """No TLS server runs here with a certificate the client trusts: urllib's own redirect handling
    is driven with a real https request and an http target."""
    request = urllib.request.Request("https://data.example/mnist.npz")
    with pytest.raises(mnist.CubeError, match="never from https to http"):
        mnist.CheckedRedirects().redirect_request(request, None, 302, "Found", {}, "http://data.example/mnist.npz")
    moved = mnist.CheckedRedirects().redirect_request(request, None, 302, "Found", {}, "https://mirror.example/m.npz")
    assert moved.full_url == "https://mirror.example/m.npz"


def test_a_file_uri_naming_another_host_is_refused(tmp_path, capsys):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    (ws / "data.yaml").write_text(yaml.safe_dump({"uri": "file://remotehost/etc/passwd", "hash": "0" * 64}))
    result = run_task("download", ws, capsys)
    assert result.code == 1
    assert "names a file on this machine (file:///path or file://localhost/path), not on 'remotehost'" in \
        one_error_line(result.err, "download")
    local = {"uri": f"file://localhost{ws / 'mnist.npz'}", "hash": sha256((ws / "mnist.npz").read_bytes())}
    (ws / "data.yaml").write_text(yaml.safe_dump(local))
    assert run_task("download", ws, capsys).code == 0


# ------------------------------------------------------------------------------------- the image
@needs_docker
def test_the_image_runs_as_a_plain_user_by_default(image):
    """Whatever starts the image without naming a user (Kubeflow, a bare docker run) gets the same
    plain uid as run-k8s's pods; MLCube's runner asks for root itself (mlcube.yaml), to become you."""
    ran = subprocess.run(["docker", "run", "--rm", "--entrypoint=id", image], capture_output=True, text=True)
    assert ran.stdout.split()[:2] == [f"uid={noxfile.K8S_USER}", f"gid={noxfile.K8S_USER}"], ran.stderr
    assert noxfile.CUBE["docker"]["cpu_args"] == "--user=0:0"


def test_a_compilation_cache_folder_is_made_private_whatever_its_entries_modes(tmp_path):
    """Under a umask of 002 JAX writes its entries group-writable: the folder itself is made 0700, so
    no one else reaches them."""
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    assert mnist.trusted_cache(str(folder)) and stat.S_IMODE(folder.stat().st_mode) == 0o700
