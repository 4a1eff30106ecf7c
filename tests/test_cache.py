"""The persistent compilation cache: on by default in every runner, in the user's cache folder (or a
host folder mounted into the container), reused by the next run, off when asked, and safe: shared by
runs at once, and a damaged entry costs a compilation, never a crash or other bits."""
import json
import os
import stat
import sys

import conftest
import pytest
from conftest import digits_workspace, finish, needs_docker, nox, sha256, start_train

import mnist
import noxfile

PROGRAMS = ["jit_init", "jit_train_steps", "jit_score"]


@pytest.fixture
def cache_ws(tmp_path):
    """A workspace with its own home folder (home/), where the cache goes by default."""
    return digits_workspace(tmp_path)


def cache_env(ws, **env) -> dict:
    """The variables of a run with ws/home as its home, JAX logging its compilations."""
    return {"HOME": str(ws / "home"), "XDG_CACHE_HOME": "", "JAX_LOG_COMPILES": "1", **env}


def train(ws, **env):
    """A run that must succeed: (its stderr, the digest of its params.msgpack)."""
    result = finish(start_train(ws, "model", cache_env(ws, **env)), timeout=300)
    assert result.code == 0, result.err[-3000:]
    return result.err, sha256((ws / "model" / "params.msgpack").read_bytes())


def hits(stderr: str) -> list[str]:
    return sorted(name for name in PROGRAMS if f"Persistent compilation cache hit for '{name}'" in stderr)


def test_a_second_run_loads_what_the_first_compiled(cache_ws):
    folder = cache_ws / "home" / ".cache" / "mnist-mlcube" / "jax"
    first, digest = train(cache_ws)
    assert hits(first) == [] and any(name.startswith("jit_train_steps-") for name in os.listdir(folder))
    second, again = train(cache_ws)
    assert hits(second) == sorted(PROGRAMS) and again == digest


def test_xdg_cache_home_and_the_variable_move_it(cache_ws):
    train(cache_ws, XDG_CACHE_HOME=str(cache_ws / "xdg"))
    assert any((cache_ws / "xdg" / "mnist-mlcube" / "jax").iterdir())
    train(cache_ws, MNIST_COMPILATION_CACHE=str(cache_ws / "elsewhere"))
    assert any((cache_ws / "elsewhere").iterdir())


def test_off_keeps_nothing(cache_ws):
    first, _ = train(cache_ws, MNIST_COMPILATION_CACHE="off")
    second, _ = train(cache_ws, MNIST_COMPILATION_CACHE="off")
    assert hits(second) == [] and not (cache_ws / "home" / ".cache" / "mnist-mlcube").exists()


def test_damaged_entries_cost_one_compilation_then_are_replaced(cache_ws):
    """Truncated entries (a run killed while JAX wrote them, in place): the next run warns once and
    compiles, never other bits; JAX would keep the damaged entries for ever, we drop them, so the run
    after that loads every program again."""
    _, digest = train(cache_ws)
    folder = cache_ws / "home" / ".cache" / "mnist-mlcube" / "jax"
    for entry in folder.iterdir():
        entry.write_bytes(entry.read_bytes()[:40] + b"damaged")
    stderr, again = train(cache_ws)
    assert hits(stderr) == [] and "Error reading persistent compilation cache entry" in stderr
    assert "(removed: the next run compiles it afresh)" in stderr and again == digest
    stderr, again = train(cache_ws)
    assert hits(stderr) == sorted(PROGRAMS) and "Error reading" not in stderr and again == digest


def test_runs_at_once_share_the_cache(cache_ws):
    """Two cold runs, started together, write their entries into the one cache folder and both finish
    with the same bits; a third run then loads every program from what they left, to the same bits."""
    folder = cache_ws / "home" / ".cache" / "mnist-mlcube" / "jax"
    processes = [start_train(cache_ws, model, cache_env(cache_ws)) for model in ("a", "b")]
    results = [finish(p, timeout=300) for p in processes]
    assert [r.code for r in results] == [0, 0], [r.err[-3000:] for r in results]
    assert (cache_ws / "a" / "params.msgpack").read_bytes() == (cache_ws / "b" / "params.msgpack").read_bytes()
    written = {entry.name.split("-")[0] for entry in folder.glob("jit_*")}
    assert set(PROGRAMS) <= written, written
    third, digest = train(cache_ws)
    assert hits(third) == sorted(PROGRAMS), third[-3000:]
    assert digest == sha256((cache_ws / "a" / "params.msgpack").read_bytes())


def entry(name: str) -> str:
    """A file name as JAX names its cache entries."""
    return f"jit_{name}-{sha256(name.encode())}-cache"


def test_the_cache_stays_bounded(tmp_path, monkeypatch):
    """Beyond MAX_CACHE_BYTES, the entries written longest ago go first."""
    monkeypatch.setattr(mnist, "MAX_CACHE_BYTES", 2500)
    assert mnist.trusted_cache(str(tmp_path / "cache"))  # made, and tagged as the cube's
    for age, name in enumerate(["newest", "newer", "older", "oldest"]):
        (tmp_path / "cache" / entry(name)).write_bytes(bytes(1000))
        os.utime(tmp_path / "cache" / entry(name), (1e9 - age, 1e9 - age))
    mnist.prune_cache(str(tmp_path / "cache"))
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([mnist.CACHE_TAG, entry("newer"), entry("newest")])


def test_pruning_deletes_nothing_of_a_users_folder(cache_ws, monkeypatch):
    """The variable pointed at a folder of the user's: their files stay, the old entries too, as the
    folder is not one the cube made; in the cube's own folder, only JAX's entries go."""
    monkeypatch.setattr(mnist, "MAX_CACHE_BYTES", 1000)
    users = cache_ws / "thesis"
    users.mkdir()
    (users / "thesis.tex").write_text("\\documentclass{book}")
    with open(users / "big.bin", "wb") as f:
        f.truncate(120 << 20)  # sparse: 120 MB that take no disk
    (users / entry("old")).write_bytes(bytes(2000))
    train(cache_ws, MNIST_COMPILATION_CACHE=str(users))
    kept = set(os.listdir(users))
    assert {"thesis.tex", "big.bin", entry("old")} <= kept and mnist.CACHE_TAG not in kept
    assert mnist.trusted_cache(str(cache_ws / "ours"))
    (cache_ws / "ours" / "notes.txt").write_bytes(bytes(2000))
    (cache_ws / "ours" / entry("old")).write_bytes(bytes(2000))
    mnist.prune_cache(str(cache_ws / "ours"))
    assert sorted(os.listdir(cache_ws / "ours")) == sorted([mnist.CACHE_TAG, "notes.txt"])


def test_a_folder_others_may_write_is_not_used(cache_ws):
    """Its entries are native code the task runs: a cache that another user may write is left alone."""
    shared = cache_ws / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    stderr, _ = train(cache_ws, MNIST_COMPILATION_CACHE=str(shared))
    assert f"compiling without a cache: {shared} is writable by another user" in stderr
    assert os.listdir(shared) == [] and hits(stderr) == []


def test_containers_get_a_folder_beside_the_one_local_runs_use(monkeypatch, tmp_path):
    """The toolchain's copy of mnist.py's rule agrees with it, whatever the variables say, and mounts
    into containers a folder beside that one, never the one local runs load."""
    assert noxfile.CACHE_VARIABLE == mnist.CACHE_VARIABLE
    for variables in ({}, {"XDG_CACHE_HOME": str(tmp_path)}, {"MNIST_COMPILATION_CACHE": str(tmp_path / "c")},
                      {"MNIST_COMPILATION_CACHE": "off"}):
        for name in ("XDG_CACHE_HOME", "MNIST_COMPILATION_CACHE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        assert noxfile.compilation_cache_folder() == mnist.compilation_cache_folder()
        if noxfile.compilation_cache_folder():
            assert noxfile.container_cache() == mnist.compilation_cache_folder() + "-containers"
    assert noxfile.compilation_cache_folder() is None and noxfile.container_cache() is None


def test_sessions_without_docker_need_no_docker_group(monkeypatch, tmp_path):
    """On a machine without a docker group (grp.getgrnam raises KeyError), the harness still runs the
    sessions that need no Docker, such as run-local below, as the caller and as a plain user; only a
    plain user's session in the docker group is skipped, with the reason."""
    def no_such_group(name):
        raise KeyError(f"getgrnam(): name not found: '{name}'")

    commands = []
    monkeypatch.setattr(conftest.grp, "getgrnam", no_such_group)
    monkeypatch.setattr(conftest.subprocess, "run", lambda command, **_: commands.append(command))
    nox("-s", "run-local", "--", "--help")
    nox("-s", "run-local", "--", "--help", user=tmp_path, docker_group=False)
    caller, plain = commands
    assert caller[:2] == [sys.executable, "-m"] and caller[-4:] == ["-s", "run-local", "--", "--help"]
    assert plain[:4] == ["setpriv", "--reuid=4321", "--regid=4321", "--clear-groups"]
    assert plain[4] == str(tmp_path / "venv" / "bin" / "python") and plain[-4:] == caller[-4:]
    with pytest.raises(pytest.skip.Exception, match="no docker group on this machine"):
        nox("-s", "run-docker", "--", "download", user=tmp_path)
    assert len(commands) == 2  # nothing run


def test_run_local_uses_it(cache_ws):
    ws = cache_ws / "ws"
    ws.mkdir()
    (ws / "train.yaml").write_text((cache_ws / "train.yaml").read_text())
    env = {"MNIST_COMPILATION_CACHE": str(cache_ws / "cache"), "JAX_LOG_COMPILES": "1"}
    for _ in range(2):
        result = nox("-s", "run-local", "--", "train", f"--workspace={ws}", f"--data_dir={cache_ws / 'data'}", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert hits(result.stderr) == sorted(PROGRAMS), result.stderr[-3000:]


@needs_docker
def test_run_docker_mounts_a_cache_the_caller_owns(image, plain_user, tmp_path):
    """The containers' host folder is made by the runner as the caller, private, mounted at /cache,
    and used by the next run; the folder local runs use is never made or mounted."""
    home = plain_user or tmp_path
    ws = digits_workspace(home / "cache-test")
    local, cache = ws / "jax-cache", ws / "jax-cache-containers"
    if plain_user:
        for path in (ws, *ws.rglob("*")):
            os.chown(path, 4321, 4321)
    owner = (4321, 4321) if plain_user else (os.getuid(), os.getgid())
    env = {"HOME": str(home), "MNIST_COMPILATION_CACHE": str(local)}
    for run in range(2):
        result = nox("-s", "run-docker", "--", "train", f"--workspace={ws}", "--env=JAX_LOG_COMPILES=1",
                     env=env, user=plain_user)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        if run == 0:
            assert hits(result.stderr) == [] and (cache.stat().st_uid, cache.stat().st_gid) == owner
            assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and not local.exists()
    assert hits(result.stderr) == sorted(PROGRAMS), result.stderr[-3000:]
    assert {(p.stat().st_uid, p.stat().st_gid) for p in cache.iterdir()} == {owner}
    assert json.loads((ws / "model" / "model.json").read_text())["epochs_run"] == 1
