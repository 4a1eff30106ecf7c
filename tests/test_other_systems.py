"""Windows and macOS, as far as this Linux machine can stand in for them.

STAND-IN: no Windows or macOS machine can run here. test_standin_* runs the four tasks as separate
processes with the Unix-only surface hidden from mnist.py (fcntl, pwd, grp and resource unimportable;
os.O_NONBLOCK, os.geteuid, os.setuid, os.getuid and signal.SIGKILL absent), which proves that nothing
Unix-only is needed to start or to finish a task, and that the fallbacks run. It does not prove what
only those systems do: Windows's own file locks (msvcrt) and its refusal to remove a file another
process holds open, or macOS's file system; .github/workflows/other-systems.yml runs the quick start
there, on a hosted CI service (not run here). The uri table test parses Windows paths with Python's
Windows rules (ntpath, nturl2path)."""
import json
import ntpath
import nturl2path
import os
import subprocess
import sys
import types

import pytest
import yaml
from conftest import ROOT, make_digits, npz_bytes, sha256, source_workspace, task_args

import mnist

HIDE_UNIX = """import os, runpy, signal, sys
for name in ("fcntl", "pwd", "grp", "resource"):
    sys.modules[name] = None
for name in ("O_NONBLOCK", "geteuid", "setuid", "getuid"):
    delattr(os, name)
del signal.SIGKILL
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_standin_the_four_tasks_run_without_the_unix_only_surface(tmp_path):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    env = {**os.environ, "MNIST_COMPILATION_CACHE": str(tmp_path / "cache")}
    for task in ("download", "train", "evaluate", "infer"):
        done = subprocess.run([sys.executable, "-c", HIDE_UNIX, str(ROOT / "mnist.py"), *task_args(task, ws)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, (task, done.stderr[-3000:])
    assert json.loads((ws / "model" / "model.json").read_text())["epochs_run"] == 1
    assert len(json.loads((ws / "predictions.json").read_text())["predictions"]) == 128
    assert not [p for p in ws.rglob("*") if p.name.endswith(".part")]
    helped = subprocess.run([sys.executable, "-c", HIDE_UNIX, str(ROOT / "mnist.py"), "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "download" in helped.stdout


@pytest.mark.parametrize("uri, local", [
    ("C:\\data\\mnist.npz", "C:\\data\\mnist.npz"),
    ("C:/data/mnist.npz", "C:/data/mnist.npz"),
    ("d:\\Users\\ann\\mnist.npz", "d:\\Users\\ann\\mnist.npz"),
    ("\\\\server\\share\\mnist.npz", "\\\\server\\share\\mnist.npz"),
    ("file:///C:/data/mnist.npz", "C:\\data\\mnist.npz"),
    ("data\\mnist.npz", "C:\\cube\\workspace\\data\\mnist.npz"),
    ("mnist.npz", "C:\\cube\\workspace\\mnist.npz"),
    ("https://example.test/my data.npz", "https://example.test/my%20data.npz"),
])
def test_windows_paths_and_urls_as_windows_reads_them(monkeypatch, uri, local):
    """Python's Windows path rules (ntpath, nturl2path) in mnist.py's place: a drive's or a UNC path is
    a local file, never a URL of scheme "c"."""
    monkeypatch.setattr(mnist, "os", types.SimpleNamespace(path=ntpath))
    monkeypatch.setattr(mnist.urllib.request, "url2pathname", nturl2path.url2pathname)
    source = mnist.read_source({"uri": uri, "hash": "a" * 64}, "C:\\cube\\workspace", "data.yaml")
    assert source.uri == local


def test_configs_with_windows_line_ends_read_as_any_other(tmp_path, capsys):
    body = npz_bytes(make_digits())
    ws = source_workspace(tmp_path / "ws", body)
    for name in ("data.yaml", "train.yaml"):
        text = (ws / name).read_text()
        (ws / name).write_bytes(text.replace("\n", "\r\n").encode())
    config = mnist.read_train_config(str(ws / "train.yaml"))
    assert config.optimizer == "adam" and config.batch_size == 64
    sources, _ = mnist.read_data_config(str(ws / "data.yaml"))
    assert sources["mnist.npz"].sha256 == sha256(body)
    assert yaml.safe_load((ws / "train.yaml").read_text())["optimizer"] == "adam"
