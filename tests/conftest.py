"""Shared fixtures and helpers: a real HTTP server on 127.0.0.1, small synthetic MNIST files, the real
data (whole, or a small sample of it), workspaces laid out as workspace/ is, one way to run a task in
this process and one to run it as its own process, and the runners run for real (nox, a Docker image,
a plain user)."""
import collections
import contextlib
import grp
import hashlib
import http.server
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mnist  # noqa: E402
import noxfile  # noqa: E402

IMAGE = noxfile.CUBE["docker"]["image"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_mnist(n_train=64, n_test=16, seed=0) -> dict:
    """Random arrays in the MNIST layout: as valid as the real thing, and tiny."""
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "y_test": rng.integers(0, 10, n_test, dtype=np.uint8)}


def npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00000803 (or 01 for labels), sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


Route = collections.namedtuple("Route", "body fail status truncate stall endless trickle location")


class Quiet(http.server.ThreadingHTTPServer):
    """Clients that give up (the timeout tests) break pipes; that is expected, not news."""
    daemon_threads, block_on_close = True, False

    def handle_error(self, request, client_address):
        pass


class Server:
    """A real HTTP server on 127.0.0.1 in a thread; each test sets what each path answers."""

    def __init__(self):
        self.routes, self.hits = {}, collections.Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] += 1
                route = server.routes.get(self.path)
                if route is None:
                    return self.send_error(404)
                if server.hits[self.path] <= route.fail:
                    return self.send_error(500)
                time.sleep(route.stall)
                self.send_response(route.status)
                if route.location:  # a redirect
                    self.send_header("Location", route.location)
                if route.endless:  # no Content-Length: the body ends when the connection does, never
                    self.end_headers()
                    while True:
                        self.wfile.write(route.body)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if route.trickle:  # a byte at a time, `trickle` seconds apart
                    for byte in route.body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(route.trickle)
                    return
                self.wfile.write(route.body[:len(route.body) - route.truncate])
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, path, body, fail=0, status=200, truncate=0, stall=0.0, endless=False, trickle=0.0,
              location=None) -> str:
        self.routes[path] = Route(body, fail, status, truncate, stall, endless, trickle, location)
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def url(self, path) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


class Terminal(io.StringIO):
    """A stand-in for stderr on a terminal (isatty() is true) that records what the tasks draw. Set
    it in the test's body: capsys replaces sys.stderr after the fixtures are set up."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def quick_network(monkeypatch):
    """Keep retries and timeouts short so the fault tests take seconds, not minutes."""
    monkeypatch.setattr(mnist, "HTTP_TIMEOUT", 0.5)
    monkeypatch.setattr(mnist, "RETRY_DELAY", 0.01)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real MNIST files (four IDX .gz and mnist.npz), from $MNIST_DATA_DIR."""
    folder = os.environ.get("MNIST_DATA_DIR")
    if not folder or not (Path(folder) / "mnist.npz").is_file():
        pytest.skip("real MNIST not found: set MNIST_DATA_DIR to a folder with mnist.npz and the IDX files")
    return Path(folder)


SAMPLE_TRAIN = 15_000  # real_sample's training images: at batch 64, one epoch (234 steps) passes 0.95


@pytest.fixture(scope="session")
def real_sample(real_data) -> bytes:
    """An npz of real MNIST, small: the first SAMPLE_TRAIN training images and the whole test set (so
    that predictions still line up with the IDX test files). For tests that need a model that has
    learnt, not a fully trained one; the tests of full accuracy train on all of mnist.npz."""
    with np.load(real_data / "mnist.npz") as full:
        return npz_bytes({"x_train": full["x_train"][:SAMPLE_TRAIN], "y_train": full["y_train"][:SAMPLE_TRAIN],
                          "x_test": full["x_test"], "y_test": full["y_test"]})


def make_digits(n_train=512, n_test=128, seed=0) -> dict:
    """Learnable stand-ins for digits: class k is a bright bar across rows 2k+4..2k+5, on noise."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 80, (n, 28, 28), dtype=np.uint8)
        for row in (4, 5):
            images[np.arange(n), 2 * labels + row, :] = 255
        return images, labels

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


MNIST_SPEC = mnist.Spec((28, 28), 10, 255)  # MNIST's, and make_mnist's and make_digits's


def create_state(config: dict, total_steps: int, spec: "mnist.Spec" = MNIST_SPEC):
    """A run's first TrainState, as train makes it, from a config's keys (the epochs and batch size,
    which the state does not depend on, may be left out)."""
    config = mnist.TrainConfig(**{"train_epochs": 1, "batch_size": 32, **config})
    return mnist.jax.jit(mnist.state_initializer(config, total_steps, spec))(config.seed)


# ------------------------------------------------------------------------ workspaces and tasks
TRAIN_CONFIG = {"optimizer": "adam", "train_epochs": 1, "batch_size": 64}
TASK_PATHS = {  # each task's parameters, at their places in a workspace laid out as workspace/ is
    "download": {"data_config": "data.yaml", "data_dir": "data", "log_dir": "logs"},
    "train": {"train_config": "train.yaml", "data_dir": "data", "model_dir": "model", "log_dir": "logs"},
    "evaluate": {"data_dir": "data", "model_dir": "model", "log_dir": "logs"},
    "infer": {"model_dir": "model", "images": "data/mnist.npz", "predictions": "predictions.json"},
}


def write_config(path: Path, config: dict | str) -> Path:
    """A YAML config file: a mapping, or text as it is (for configs that are wrong on purpose)."""
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def digits_workspace(ws: Path, n_train=512, n_test=128, **config) -> Path:
    """A workspace as download leaves it: learnable digits (make_digits) in data/mnist.npz, and a
    train.yaml of TRAIN_CONFIG with `config`'s changes."""
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "mnist.npz").write_bytes(npz_bytes(make_digits(n_train, n_test)))
    write_config(ws / "train.yaml", {**TRAIN_CONFIG, **config})
    return ws


def source_workspace(ws: Path, body: bytes, server: "Server | None" = None, digest: str | None = None,
                     **config) -> Path:
    """A workspace before download: data.yaml names `body`, served at /mnist.npz by `server` (the test's
    HTTP server) or else a copy beside it (a plain-path uri: the offline route), with its SHA-256 unless
    `digest` gives another; train.yaml as in digits_workspace."""
    ws.mkdir(parents=True)
    if server is None:
        uri = "mnist.npz"
        (ws / uri).write_bytes(body)
    else:
        uri = server.serve("/mnist.npz", body)
    write_config(ws / "data.yaml", {"uri": uri, "hash": digest or sha256(body)})
    write_config(ws / "train.yaml", {**TRAIN_CONFIG, **config})
    return ws


def task_args(task: str, ws: Path, **paths) -> list[str]:
    """The task's command line in workspace `ws`: each parameter at its place there unless `paths`
    gives another."""
    return [task, *(f"--{name}={paths.get(name, ws / place)}" for name, place in TASK_PATHS[task].items())]


class Result(NamedTuple):
    """How a task ended: its exit code and what it printed."""
    code: int
    out: str
    err: str


def run_task(task: str, ws: Path, capsys, **paths) -> Result:
    """The task in this process, through mnist.main as its command line runs it."""
    code = mnist.main(task_args(task, ws, **paths))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def start_mnist(*args: str, env: dict | None = None, run_as: tuple = ()) -> subprocess.Popen:
    """`python mnist.py ARGS` as its own process, not yet finished (to signal it, or to run several at
    once), optionally under a command that changes its user (`run_as`)."""
    command = [*run_as, sys.executable, str(ROOT / "mnist.py"), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def start_task(task: str, ws: Path, env: dict | None = None, run_as: tuple = (), **paths) -> subprocess.Popen:
    """start_mnist for a task in workspace `ws` (see task_args)."""
    return start_mnist(*task_args(task, ws, **paths), env=env, run_as=run_as)


def start_train(ws: Path, model: str, env: dict | None = None, **paths) -> subprocess.Popen:
    """start_task for train, writing to model_dir MODEL and log_dir logs/MODEL, so that runs in one
    workspace keep apart."""
    return start_task("train", ws, env, **{"model_dir": ws / model, "log_dir": ws / "logs" / model, **paths})


def finish(process: subprocess.Popen, timeout: float = 600) -> Result:
    out, err = process.communicate(timeout=timeout)
    return Result(process.returncode, out, err)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A workspace after download and train: learnable digits fetched through a plain-path data.yaml,
    a model trained on them for two epochs, the logs. Tests that change it work on a copy."""
    ws = source_workspace(tmp_path_factory.mktemp("trained") / "ws", npz_bytes(make_digits()), train_epochs=2)
    for task in ("download", "train"):
        assert mnist.main(task_args(task, ws)) == 0
    return ws


# ------------------------------------------------------------------- the runners, run for real
def nox(*args, env=None, user=None, docker_group=True):
    """Run a nox session of this repo as a user would, or as `user` (see plain_user) when given: in the
    docker group, or in no group at all (docker_group=False). Only a plain user's session looks the
    group up, so the sessions that need no Docker run on a machine that has none."""
    python, cube, run_as = (sys.executable, ROOT, []) if user is None else (
        user / "venv" / "bin" / "python", user / "cube",
        ["setpriv", "--reuid=4321", "--regid=4321", docker_groups() if docker_group else "--clear-groups"])
    command = [*run_as, str(python), "-m", "nox", "-f", str(cube / "noxfile.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=1200)


def docker_groups() -> str:
    """setpriv's option that puts a plain user in the docker group; the test skips where there is no
    such group (Docker's socket is then root's alone, and no plain user can be let in)."""
    try:
        return f"--groups={grp.getgrnam('docker').gr_gid}"
    except KeyError:
        pytest.skip("no docker group on this machine: a plain user cannot be given Docker's socket")


@contextlib.contextmanager
def as_in_a_terminal():
    """Processes started within are ones that Ctrl-C (SIGINT) interrupts, as in a terminal. A shell
    starts its background jobs with Ctrl-C ignored (CI's tests may run as one), and a child inherits
    that, but not a handler: with one here, the child starts with Ctrl-C at its default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_as_in_a_terminal(command: list[str], **popen) -> subprocess.Popen:
    with as_in_a_terminal():
        return subprocess.Popen(command, **popen)


def docker_ready():
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:
        return False


needs_docker = pytest.mark.skipif(not docker_ready(), reason="no Docker daemon answers (start dockerd)")
BASE = ["--build-arg=BASE_IMAGE=" + os.environ["MNIST_BASE_IMAGE"]] if "MNIST_BASE_IMAGE" in os.environ else []


@pytest.fixture(scope="session")
def image():
    """The image, built through `nox -s configure-docker` (from $MNIST_BASE_IMAGE where set)."""
    result = nox("-s", "configure-docker", "--", *BASE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Successfully tagged " + IMAGE in result.stdout  # the build streamed its output
    return IMAGE


CUBE_FILES = ("noxfile.py", "mlcube.yaml", "Dockerfile", ".dockerignore", "requirements.txt", "mnist.py",
              "Singularity.recipe")


@pytest.fixture(scope="session")
def plain_user():
    """Run as root (as CI does), files owned by the caller would prove nothing. So, as root, make a
    home for uid 4321 holding a copy of the cube and a Python with the runners' needs, and run the
    session as that user; otherwise the caller is the plain user."""
    if os.getuid() != 0:
        yield None
        return
    home = Path(tempfile.mkdtemp(prefix="mnist-user-"))
    subprocess.run(["/usr/bin/python3", "-m", "venv", home / "venv"], check=True)
    subprocess.run([home / "venv" / "bin" / "pip", "install", "-q", "nox", "pyyaml", "docker"], check=True)
    (home / "cube").mkdir()
    for name in CUBE_FILES:
        shutil.copy(ROOT / name, home / "cube" / name)
    chown(home, 4321)
    yield home
    shutil.rmtree(home)


def exited_containers() -> set[str]:
    """The stopped containers: MLCube's runner passes no --rm, so its runs leave them. Not filtered by
    the image's tag, which a rebuild moves to another image, away from the containers of the old one."""
    return set(subprocess.run(["docker", "ps", "-aq", "--filter", "status=exited"],
                              capture_output=True, text=True).stdout.split())


def pulls_since(start: float) -> list[str]:
    """The images the Docker engine pulled from `start` (a time.time()) until now."""
    events = subprocess.run(["docker", "events", f"--since={start:.3f}", f"--until={time.time():.3f}",
                             "--filter=type=image", "--filter=event=pull", "--format={{.Actor.ID}}"],
                            capture_output=True, text=True, check=True)
    return events.stdout.split()


def built_sources(folder: Path) -> dict[str, str]:
    """Each file the image is built from (the runners' list), and its SHA-256 in `folder`: what the
    image records of itself, and the outputs after it."""
    return {name: sha256((folder / name).read_bytes()) for name in noxfile.docker_sources()}


def remove_containers(ids: set[str]) -> None:
    if ids:
        subprocess.run(["docker", "rm", *ids], capture_output=True)


def chown(folder, uid):
    for path in (folder, *folder.rglob("*")):
        os.chown(path, uid, uid, follow_symlinks=False)
