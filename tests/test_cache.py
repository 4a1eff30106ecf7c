"""The persistent compilation cache: on by default in every runner, in the user's cache folder (or a
host folder mounted into the container), reused by the next run, off when asked, and safe: shared by
runs at once, and a damaged entry costs a compilation, never a crash or other bits."""
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, make_digits, needs_docker, nox, npz_bytes, sha256

import mnist

PROGRAMS = ["jit_init", "jit_plan_epoch", "jit_train_steps", "jit_score"]


@pytest.fixture
def cube(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.npz").write_bytes(npz_bytes(make_digits()))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"optimizer": "adam", "train_epochs": 1, "batch_size": 64}))
    return tmp_path


def train(cube, model="model", **env):
    """`python mnist.py train` as its own process, JAX logging its compilations; (stderr, params digest)."""
    command = [sys.executable, str(ROOT / "mnist.py"), "train", f"--train_config={cube / 'train.yaml'}",
               f"--data_dir={cube / 'data'}", f"--model_dir={cube / model}", f"--log_dir={cube / 'logs'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HOME": str(cube / "home"), "XDG_CACHE_HOME": "",
                                 "JAX_LOG_COMPILES": "1", **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr, sha256((cube / model / "params.msgpack").read_bytes())


def hits(stderr: str) -> list[str]:
    return sorted(name for name in PROGRAMS if f"Persistent compilation cache hit for '{name}'" in stderr)


def test_a_second_run_loads_what_the_first_compiled(cube):
    folder = cube / "home" / ".cache" / "mnist-mlcube" / "jax"
    first, digest = train(cube)
    assert hits(first) == [] and any(name.startswith("jit_train_steps-") for name in os.listdir(folder))
    second, again = train(cube)
    assert hits(second) == sorted(PROGRAMS) and again == digest


def test_xdg_cache_home_and_the_variable_move_it(cube):
    train(cube, XDG_CACHE_HOME=str(cube / "xdg"))
    assert any((cube / "xdg" / "mnist-mlcube" / "jax").iterdir())
    train(cube, MNIST_COMPILATION_CACHE=str(cube / "elsewhere"))
    assert any((cube / "elsewhere").iterdir())


def test_off_keeps_nothing(cube):
    first, _ = train(cube, MNIST_COMPILATION_CACHE="off")
    second, _ = train(cube, MNIST_COMPILATION_CACHE="off")
    assert hits(second) == [] and not (cube / "home" / ".cache" / "mnist-mlcube").exists()


def test_damaged_entries_cost_a_compilation_not_the_bits(cube):
    _, digest = train(cube)
    folder = cube / "home" / ".cache" / "mnist-mlcube" / "jax"
    for entry in folder.iterdir():
        entry.write_bytes(entry.read_bytes()[:40] + b"damaged")
    stderr, again = train(cube)
    assert hits(stderr) == [] and "Error reading persistent compilation cache entry" in stderr
    assert again == digest


def test_runs_at_once_share_the_cache(cube):
    """Two cold runs, started together, write the same entries: both finish with the same bits."""
    env = {**os.environ, "HOME": str(cube / "home"), "XDG_CACHE_HOME": ""}
    processes = [subprocess.Popen([sys.executable, str(ROOT / "mnist.py"), "train",
                                   f"--train_config={cube / 'train.yaml'}", f"--data_dir={cube / 'data'}",
                                   f"--model_dir={cube / model}", f"--log_dir={cube / model / 'logs'}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
                 for model in ("a", "b")]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    assert sha256((cube / "a" / "params.msgpack").read_bytes()) == sha256((cube / "b" / "params.msgpack").read_bytes())


def test_the_cache_stays_bounded(tmp_path, monkeypatch):
    """Beyond MAX_CACHE_BYTES, the entries written longest ago go first."""
    monkeypatch.setattr(mnist, "MAX_CACHE_BYTES", 2500)
    for age, name in enumerate(["newest", "newer", "older", "oldest"]):
        (tmp_path / name).write_bytes(bytes(1000))
        os.utime(tmp_path / name, (1e9 - age, 1e9 - age))
    mnist.prune_cache(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["newer", "newest"]


def test_run_local_uses_it(cube):
    ws = cube / "ws"
    ws.mkdir()
    (ws / "train.yaml").write_text((cube / "train.yaml").read_text())
    env = {"MNIST_COMPILATION_CACHE": str(cube / "cache"), "JAX_LOG_COMPILES": "1"}
    for _ in range(2):
        result = nox("-s", "run-local", "--", "train", f"--workspace={ws}", f"--data_dir={cube / 'data'}", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert hits(result.stderr) == sorted(PROGRAMS)


@needs_docker
def test_run_docker_mounts_a_cache_the_caller_owns(cube, image, plain_user, tmp_path):
    """The host folder is made by the runner as the caller, mounted at /cache, and used by the next run."""
    home = plain_user or tmp_path
    ws, cache = home / "cache-test", home / "cache-test" / "jax-cache"
    ws.mkdir()
    (ws / "data").mkdir()
    (ws / "data" / "mnist.npz").write_bytes((cube / "data" / "mnist.npz").read_bytes())
    (ws / "train.yaml").write_text((cube / "train.yaml").read_text())
    if plain_user:
        for path in (ws, *ws.rglob("*")):
            os.chown(path, 4321, 4321)
    owner = (4321, 4321) if plain_user else (os.getuid(), os.getgid())
    env = {"HOME": str(home), "MNIST_COMPILATION_CACHE": str(cache)}
    for run in range(2):
        result = nox("-s", "run-docker", "--", "train", f"--workspace={ws}", "--env=JAX_LOG_COMPILES=1",
                     env=env, user=plain_user)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        if run == 0:
            assert hits(result.stderr) == [] and (cache.stat().st_uid, cache.stat().st_gid) == owner
    assert hits(result.stderr) == sorted(PROGRAMS)
    assert {(p.stat().st_uid, p.stat().st_gid) for p in cache.iterdir()} == {owner}
    assert json.loads((ws / "model" / "model.json").read_text())["epochs_run"] == 1
