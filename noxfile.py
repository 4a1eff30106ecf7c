"""The MNIST MLCube's toolchain. `nox -l` lists the sessions; `nox -s NAME` runs one.

Runners take task names, then options:   nox -s run-docker -- download train --network=host
  --workspace=PATH      where relative paths of mlcube.yaml resolve (default: workspace/)
  --NAME=PATH, NAME=PATH   replace the path of a task parameter, e.g. --data_dir=/scratch/mnist
  --gpus=all|N|device=I,J  give the container GPUs (default: platform.accelerator_count of mlcube.yaml)
  --network=NAME        the container's network, e.g. host
  --env=NAME=VALUE      set a variable for the task (repeatable)
  --build-arg=NAME=VALUE   a Dockerfile ARG, when an image is built (BASE_IMAGE, JAX_EXTRA)
  --from-docker         configure-singularity: convert the Docker image instead of building the recipe
  --dry-run             print the equivalent command line for each task and run nothing
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nox
import yaml

nox.options.sessions = []  # a bare `nox` lists the sessions and runs nothing
nox.options.reuse_existing_virtualenvs = True

for noisy in ("docker", "urllib3"):  # nox shows every logger's debug lines; theirs are not for users
    logging.getLogger(noisy).setLevel(logging.WARNING)

ROOT = Path(__file__).resolve().parent
CUBE = yaml.safe_load((ROOT / "mlcube.yaml").read_text())
TEST_DEPS = ["-r", "requirements.txt", "pytest", "nox", "docker", "spython", "matplotlib"]


class UsageError(Exception):
    """A mistake in a runner's arguments or environment: reported as one line."""


# ------------------------------------------------------------------------ the MLCube contract
@dataclasses.dataclass
class Options:
    tasks: list[str] = dataclasses.field(default_factory=list)
    workspace: Path = ROOT / "workspace"
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    gpus: str | None = None
    network: str | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    build_args: dict[str, str] = dataclasses.field(default_factory=dict)
    from_docker: bool = False
    dry_run: bool = False


@dataclasses.dataclass
class Run:
    """One task with its parameters resolved, as MLCube's reference runners resolve them."""

    task: str
    host_args: list[str]  # --name=/host/path, for a run without a container
    container_args: list[str]  # --name=/mlcube_ioN[/file]
    mounts: dict[str, tuple[str, bool]]  # host folder: (folder in the container, read-only)


def parameters(task: str) -> dict[str, tuple[dict, bool]]:
    """Each parameter of `task`, inputs first: (its spec in mlcube.yaml, whether it is an output)."""
    spec = CUBE["tasks"][task]["parameters"]
    return {**{name: (p, False) for name, p in (spec.get("inputs") or {}).items()},
            **{name: (p, True) for name, p in (spec.get("outputs") or {}).items()}}


def pair(value: str, option: str) -> tuple[str, str]:
    name, eq, rest = value.partition("=")
    if not (name and eq):
        raise UsageError(f"{option} expects NAME=VALUE, got {value!r}")
    return name, rest


def parse_args(args: list[str]) -> Options:
    opts = Options()
    for arg in args:
        if arg in ("--dry-run", "--from-docker"):
            setattr(opts, arg[2:].replace("-", "_"), True)
            continue
        name, eq, value = arg.removeprefix("--").partition("=")
        if not eq:
            if arg.startswith("-"):
                raise UsageError(f"unknown option {arg!r} (options: --workspace, --NAME of a parameter, "
                                 "--gpus, --network, --env, --build-arg, --from-docker, --dry-run)")
            if arg not in CUBE["tasks"]:
                raise UsageError(f"unknown task {arg!r} (tasks: {', '.join(CUBE['tasks'])})")
            opts.tasks.append(arg)
        elif name == "workspace":
            opts.workspace = Path(value).resolve()
        elif name in ("gpus", "network"):
            setattr(opts, name, value)
        elif name in ("env", "build-arg"):
            key, val = pair(value, f"--{name}")
            (opts.env if name == "env" else opts.build_args)[key] = val
        else:
            opts.params[name] = value
    valid = sorted({name for task in opts.tasks for name in parameters(task)})
    for name in opts.params:
        if name not in valid:
            raise UsageError(f"unknown parameter {name!r} for {', '.join(opts.tasks)} "
                             f"(parameters: {', '.join(valid)})")
    return opts


def resolve(task: str, opts: Options) -> Run:
    """Host paths, mounts and arguments for `task`. Relative paths resolve against the workspace; each
    host folder is mounted once, at /mlcube_io<N>, read-only unless some output is written there."""
    run = Run(task, [], [], {})
    for name, (spec, output) in parameters(task).items():
        path = Path(os.path.expandvars(os.path.expanduser(opts.params.get(name, spec["default"]))))
        path = Path(os.path.abspath(opts.workspace / path))
        folder, file = (path.parent, "/" + path.name) if spec["type"] == "file" else (path, "")
        target, read_only = run.mounts.get(str(folder), (f"/mlcube_io{len(run.mounts)}", True))
        run.mounts[str(folder)] = (target, read_only and not output)
        run.host_args.append(f"--{name}={path}")
        run.container_args.append(f"--{name}={target}{file}")
    return run


def run_tasks(session: nox.Session, opts: Options, command, execute) -> None:
    """Run each task in order through `execute(run, opts)`, or print `command(run, opts)` for
    --dry-run; stop at the first failure, exiting with that task's exit code."""
    if not opts.tasks:
        session.error(f"name at least one task: {', '.join(CUBE['tasks'])}")
    for task in opts.tasks:
        run = resolve(task, opts)
        if opts.dry_run:
            print(shlex.join(command(run, opts)))
            continue
        for folder in run.mounts:
            os.makedirs(folder, exist_ok=True)
        code = execute(run, opts)
        if code:
            session.log(f"task {task} failed with exit code {code}")
            raise SystemExit(code)


def options(session: nox.Session) -> Options:
    try:
        return parse_args(session.posargs)
    except UsageError as e:
        session.error(str(e))


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What a container runner needs of its runtime: a client, whether the image is there, how to
    build it, the command line a task runs as, and how to run it for real."""

    connect: Callable[[], Any]
    has_image: Callable[[Any, Options], bool]
    build: Callable[[Any, Options], None]
    command: Callable[[Run, Options], list[str]]
    execute: Callable[[Any, Run, Options], int]


def configure(session: nox.Session, runtime: Runtime) -> None:
    try:
        runtime.build(runtime.connect(), options(session))
    except UsageError as e:
        session.error(str(e))


def run_in(session: nox.Session, runtime: Runtime) -> None:
    """Run the session's tasks in the runtime's image, building the image first if it is missing."""
    opts = options(session)
    try:
        client = None if opts.dry_run else runtime.connect()
        if client and not runtime.has_image(client, opts):
            runtime.build(client, opts)
    except UsageError as e:
        session.error(str(e))
    run_tasks(session, opts, runtime.command, lambda run, opts: runtime.execute(client, run, opts))


# ------------------------------------------------------------------------------ local runner
@nox.session(name="run-local")
def run_local(session: nox.Session) -> None:
    """Run tasks in a virtualenv here, no container: `nox -s run-local -- download train`."""
    opts = options(session)
    if not opts.dry_run:
        session.install("-r", "requirements.txt")
    python = str(Path(session.virtualenv.bin) / "python")

    def command(run: Run, opts: Options) -> list[str]:
        return [python, str(ROOT / "mnist.py"), run.task, *run.host_args]

    run_tasks(session, opts, command,
              lambda run, opts: subprocess.call(command(run, opts), env={**os.environ, **opts.env}))


# ----------------------------------------------------------------------------- Docker runner
def docker_client():
    try:
        import docker
    except ImportError:
        raise UsageError("the Docker runner needs the Docker SDK for Python: pip install docker") from None
    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as e:
        if "Permission denied" in str(e):
            raise UsageError("no permission on the Docker daemon's socket: add yourself to the docker group "
                             "(sudo usermod -aG docker $USER, then log in again)") from None
        raise UsageError("no Docker daemon answers: start it (sudo systemctl start docker) or set "
                         "DOCKER_HOST to one that runs") from None


def docker_build(client, opts: Options) -> None:
    """Build docker.image from the Dockerfile with the classic builder, streaming its output."""
    docker = CUBE["docker"]
    step = "the start"
    for chunk in client.api.build(path=str(ROOT / docker.get("build_context", ".")),
                                  dockerfile=docker.get("build_file", "Dockerfile"), tag=docker["image"],
                                  buildargs=opts.build_args, rm=True, decode=True):
        text = chunk.get("stream", "")
        sys.stdout.write(text)
        sys.stdout.flush()
        step = text.strip() if text.startswith("Step ") else step
        if "error" in chunk:
            raise UsageError(f"docker build of {docker['image']} failed at {step}: {chunk['error'].strip()}")


def gpus_wanted(opts: Options) -> str | None:
    """--gpus if given, else mlcube.yaml's accelerator_count; None runs on the CPU."""
    count = (CUBE.get("platform") or {}).get("accelerator_count") or 0
    return opts.gpus or (str(count) if count else None)


def docker_command(run: Run, opts: Options) -> list[str]:
    """The `docker run` command line equivalent to what docker_execute does through the SDK."""
    gpus = gpus_wanted(opts)
    return ["docker", "run", "--rm", f"--user={os.geteuid()}:{os.getegid()}",
            *([f"--network={opts.network}"] if opts.network else []),
            *([f"--gpus={gpus}"] if gpus else []),
            *(f"--env={key}={value}" for key, value in opts.env.items()),
            *(f"--volume={host}:{target}:{'ro' if ro else 'rw'}" for host, (target, ro) in run.mounts.items()),
            CUBE["docker"]["image"], run.task, *run.container_args]


def device_requests(gpus: str | None) -> list:
    if not gpus:
        return []
    from docker.types import DeviceRequest

    if gpus.startswith("device="):
        return [DeviceRequest(device_ids=gpus.removeprefix("device=").split(","), capabilities=[["gpu"]])]
    return [DeviceRequest(count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]])]


def docker_execute(client, run: Run, opts: Options) -> int:
    """Run the task in a container as the caller's uid:gid, streaming its output; always remove it."""
    container = client.containers.create(
        CUBE["docker"]["image"], [run.task, *run.container_args], user=f"{os.geteuid()}:{os.getegid()}",
        volumes={host: {"bind": target, "mode": "ro" if ro else "rw"} for host, (target, ro) in run.mounts.items()},
        environment=opts.env, network_mode=opts.network, device_requests=device_requests(gpus_wanted(opts)))
    try:
        output = container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)
        container.start()
        for out, err in output:
            for stream, data in ((sys.stdout, out), (sys.stderr, err)):
                if data:
                    stream.buffer.write(data)
                    stream.flush()
        return container.wait()["StatusCode"]
    except KeyboardInterrupt:
        container.stop(timeout=10)  # SIGTERM first: train stops at a safe point, ready to resume
        raise
    finally:
        container.remove(force=True)


DOCKER = Runtime(docker_client, lambda client, opts: bool(client.images.list(name=CUBE["docker"]["image"])),
                 docker_build, docker_command, docker_execute)


@nox.session(name="configure-docker", python=False)
def configure_docker(session: nox.Session) -> None:
    """Build the Docker image named in mlcube.yaml: `-- --build-arg=BASE_IMAGE=...` to pick the base."""
    configure(session, DOCKER)


@nox.session(name="run-docker", python=False)
def run_docker(session: nox.Session) -> None:
    """Run tasks in the Docker image, building it first if missing: `nox -s run-docker -- train`."""
    run_in(session, DOCKER)


# ------------------------------------------------------------------------ Singularity runner
def singularity_client():
    """spython's client, once a Singularity or Apptainer binary is known to be there."""
    if not shutil.which("singularity"):
        if shutil.which("apptainer"):
            raise UsageError("found apptainer but no `singularity` command, which spython runs: link one "
                             "(ln -s \"$(command -v apptainer)\" ~/.local/bin/singularity)")
        raise UsageError("neither apptainer nor singularity is on PATH: install Apptainer "
                         "(https://apptainer.org/docs/admin/main/installation.html) or SingularityCE")
    try:
        from spython.main import Client
    except ImportError:
        raise UsageError("the Singularity runner needs spython: pip install spython") from None
    return Client


def singularity_image(opts: Options) -> Path:
    """Where the image lives: workspace/.image/, as MLCube's Singularity runner keeps it."""
    return opts.workspace / ".image" / CUBE["singularity"]["image"]


def singularity_build(client, opts: Options) -> None:
    """Build the image from Singularity.recipe without root (--fakeroot), or from the Docker image."""
    image = singularity_image(opts)
    image.parent.mkdir(parents=True, exist_ok=True)
    recipe = f"docker-daemon://{CUBE['docker']['image']}" if opts.from_docker else str(ROOT / "Singularity.recipe")
    try:
        _, output = client.build(recipe=recipe, image=str(image), sudo=False, force=True, stream=True,
                                 options=[] if opts.from_docker else ["--fakeroot"])
        for line in output:
            print(line, end="", flush=True)
    except subprocess.CalledProcessError as e:
        raise UsageError(f"singularity build of {image} from {recipe} failed with exit code {e.returncode}") from None


def singularity_binds(run: Run) -> list[str]:
    return [f"{host}:{target}:{'ro' if ro else 'rw'}" for host, (target, ro) in run.mounts.items()]


def singularity_options(opts: Options) -> list[str]:
    return [option for key, value in opts.env.items() for option in ("--env", f"{key}={value}")]


def singularity_command(run: Run, opts: Options) -> list[str]:
    """The `singularity run` command line that spython runs for singularity_execute."""
    return ["singularity", "run", *(["--nv"] if gpus_wanted(opts) else []),
            *(arg for bind in singularity_binds(run) for arg in ("--bind", bind)), *singularity_options(opts),
            str(singularity_image(opts)), run.task, *run.container_args]


def singularity_execute(client, run: Run, opts: Options) -> int:
    """Run the task through spython, streaming its output; return its exit code."""
    try:
        for line in client.run(str(singularity_image(opts)), args=[run.task, *run.container_args],
                               bind=singularity_binds(run), nv=bool(gpus_wanted(opts)),
                               options=singularity_options(opts), stream=True, stream_type="both"):
            print(line, end="", flush=True)
        return 0
    except subprocess.CalledProcessError as e:
        return e.returncode


SINGULARITY = Runtime(singularity_client, lambda client, opts: singularity_image(opts).exists(),
                      singularity_build, singularity_command, singularity_execute)


@nox.session(name="configure-singularity", python=False)
def configure_singularity(session: nox.Session) -> None:
    """Build the Singularity image from Singularity.recipe, unprivileged (`-- --from-docker` to convert)."""
    configure(session, SINGULARITY)


@nox.session(name="run-singularity", python=False)
def run_singularity(session: nox.Session) -> None:
    """Run tasks in the Singularity image, building it first if missing: `nox -s run-singularity -- train`."""
    run_in(session, SINGULARITY)


# ------------------------------------------------------------------------------- benchmark
SHARED = ROOT.parent / "shared"


@nox.session
def bench(session: nox.Session) -> None:
    """Time to 99 % beside the reference trainers (`-- speed`), default-config accuracy (`-- accuracy`)."""
    data = Path(os.environ.get("MNIST_DATA_DIR", SHARED / "data" / "mnist"))
    if not (data / "mnist.npz").is_file():
        session.error(f"no {data / 'mnist.npz'}: set MNIST_DATA_DIR to a folder holding the real MNIST")
    session.install("-r", "requirements.txt", "torch==2.13.0")  # torch for the PyTorch-shaped reference
    session.run("python", ".ci/bench.py", str(data / "mnist.npz"), f"--anchors={SHARED / 'anchors'}",
                *session.posargs)


# ------------------------------------------------------------------------------ development
@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest; extra arguments go to pytest)."""
    session.install(*TEST_DEPS)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common mistakes with ruff."""
    session.install("ruff")
    session.run("ruff", "check", "--isolated", "--line-length=120", "--select=E,F,W,I,B",
                "mnist.py", "noxfile.py", ".ci/bench.py", "tests", "tests/standin/singularity")
