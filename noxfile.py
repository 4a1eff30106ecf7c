"""The MNIST MLCube's toolchain. `nox -l` lists the sessions; `nox -s NAME` runs one.

Runners take task names, then options:   nox -s run-docker -- download train --network=host
  --workspace=PATH      where relative paths of mlcube.yaml resolve (default: workspace/)
  --NAME=PATH, NAME=PATH   replace the path of a task parameter, e.g. --data_dir=/scratch/mnist
  --gpus=all|N|device=I,J  give the container GPUs (default: platform.accelerator_count of mlcube.yaml)
  --network=NAME        the container's network (default: none, but for download, which fetches data)
  --memory=SIZE, --cpus=N  limit the container's memory (e.g. 8g) and processors (e.g. 2.5)
  --env=NAME=VALUE      set a variable for the task (repeatable)
  --build-arg=NAME=VALUE   a Dockerfile ARG, when an image is built (BASE_IMAGE, JAX_EXTRA)
  --from-docker         configure-singularity: convert the Docker image instead of building the recipe
  --dry-run             print the equivalent command line for each task and run nothing
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
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
TEST_DEPS = ["-r", "requirements.txt", "pytest", "hypothesis", "nox", "docker", "spython"]


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
    memory: str | None = None
    cpus: str | None = None
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
                                 "--gpus, --network, --memory, --cpus, --env, --build-arg, --from-docker, --dry-run)")
            if arg not in CUBE["tasks"]:
                raise UsageError(f"unknown task {arg!r} (tasks: {', '.join(CUBE['tasks'])})")
            opts.tasks.append(arg)
        elif name == "workspace":
            opts.workspace = Path(value).resolve()
        elif name in ("gpus", "network", "memory", "cpus"):
            setattr(opts, name, value)
        elif name in ("env", "build-arg"):
            key, val = pair(value, f"--{name}")
            (opts.env if name == "env" else opts.build_args)[key] = val
        else:
            opts.params[name] = value
    if opts.cpus is not None and not re.fullmatch(r"[0-9]*\.?[0-9]+", opts.cpus):
        raise UsageError(f"--cpus expects a number of processors such as 2 or 1.5, got {opts.cpus!r}")
    if opts.memory is not None and not re.fullmatch(r"[0-9]+[bkmgBKMG]?", opts.memory):
        raise UsageError(f"--memory expects a size such as 8g or 512m, got {opts.memory!r}")
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
        for folder in container_mounts(run):
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
    """What a container runner needs of its runtime: a client, the files an image is built from, what
    the image in place records of its sources (None: no image), how to build one that records them,
    the command line a task runs as, and how to run it for real."""

    connect: Callable[[], Any]
    source_files: Callable[[Options], list[str]]
    built_from: Callable[[Any, Options], dict | None]
    build: Callable[[Any, Options, dict], None]
    command: Callable[[Run, Options], list[str]]
    execute: Callable[[Any, Run, Options], int]


def sources(runtime: Runtime, opts: Options) -> dict:
    """What an image is built from, as Go-task's `sources:` fingerprint: each file's SHA-256, and the
    build arguments."""
    files = {name: hashlib.sha256((ROOT / name).read_bytes()).hexdigest() for name in runtime.source_files(opts)}
    return {"files": files, "build_args": opts.build_args}


def why_rebuild(recorded: dict | None, wanted: dict) -> str | None:
    """Why the image in place does not fit the sources, or None when it does. Build arguments count
    when given: an image built with --build-arg=JAX_EXTRA=cuda12 serves later runs that name none."""
    if recorded is None:
        return "there is no image yet"
    files = recorded.get("files", {})
    changed = sorted(name for name in {*files, *wanted["files"]} if files.get(name) != wanted["files"].get(name))
    args = sorted(name for name, value in wanted["build_args"].items()
                  if recorded.get("build_args", {}).get(name) != value)
    if changed or args:
        return "changed since it was built: " + ", ".join(changed + [f"--build-arg={name}" for name in args])
    return None


def configure(session: nox.Session, runtime: Runtime) -> None:
    opts = options(session)
    try:
        runtime.build(runtime.connect(), opts, sources(runtime, opts))
    except UsageError as e:
        session.error(str(e))


def run_in(session: nox.Session, runtime: Runtime) -> None:
    """Run the session's tasks in the runtime's image, (re)building it first when it is missing or was
    built from other sources, and saying why in one line."""
    opts = options(session)
    try:
        client = None if opts.dry_run else runtime.connect()
        if client:
            wanted = sources(runtime, opts)
            reason = why_rebuild(runtime.built_from(client, opts), wanted)
            if reason:
                session.log(f"building the image: {reason}")
                runtime.build(client, opts, wanted)
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


IMAGE = CUBE["docker"]["image"]
SOURCES_LABEL = "org.mlcommons.mnist.sources"  # the image's sources (see `sources`), as JSON
ONLINE_TASKS = {"download"}  # the task that fetches data; the others run with no network at all
TMPFS_SIZE = "256m"  # of /tmp, HOME in the image, which holds matplotlib's cache
CACHE_VARIABLE, CACHE_TARGET = "MNIST_COMPILATION_CACHE", "/cache"  # see host_cache


def docker_sources(context: Path | None = None) -> list[str]:
    """The build context's files (mlcube.yaml's, or `context`), as the Docker SDK selects them with
    .dockerignore."""
    from docker.utils.build import exclude_paths

    context = context or ROOT / CUBE["docker"].get("build_context", ".")
    lines = (line.strip() for line in (context / ".dockerignore").read_text().splitlines())
    patterns = [line for line in lines if line and not line.startswith("#")]
    files = exclude_paths(str(context), patterns, dockerfile=CUBE["docker"].get("build_file", "Dockerfile"))
    return sorted(str((context / name).relative_to(ROOT)) for name in files)


def docker_built_from(client, opts: Options) -> dict | None:
    images = client.images.list(name=IMAGE)
    return json.loads(images[0].labels.get(SOURCES_LABEL, "{}")) if images else None


def docker_build(client, opts: Options, sources: dict) -> None:
    """Build docker.image from the Dockerfile with the classic builder, streaming its output, and
    label it with its sources."""
    docker = CUBE["docker"]
    step = "the start"
    for chunk in client.api.build(path=str(ROOT / docker.get("build_context", ".")),
                                  dockerfile=docker.get("build_file", "Dockerfile"), tag=IMAGE,
                                  buildargs=opts.build_args, labels={SOURCES_LABEL: json.dumps(sources)},
                                  rm=True, decode=True):
        text = chunk.get("stream", "")
        sys.stdout.write(text)
        sys.stdout.flush()
        step = text.strip() if text.startswith("Step ") else step
        if "error" in chunk:
            raise UsageError(f"docker build of {IMAGE} failed at {step}: {chunk['error'].strip()}")


def gpus_wanted(opts: Options) -> str | None:
    """--gpus if given, else mlcube.yaml's accelerator_count; None runs on the CPU."""
    count = (CUBE.get("platform") or {}).get("accelerator_count") or 0
    return opts.gpus or (str(count) if count else None)


def network(run: Run, opts: Options) -> str | None:
    """--network if given; else none, unless the task fetches data (None: the runtime's default)."""
    return opts.network or (None if run.task in ONLINE_TASKS else "none")


def task_env(run: Run, opts: Options, image: str) -> dict[str, str]:
    """The task's variables: the image it runs in, which its outputs record, where it keeps compiled
    programs, then the caller's --env."""
    cached = any(target == CACHE_TARGET for target, _ in container_mounts(run).values())
    return {"MNIST_IMAGE": image, CACHE_VARIABLE: CACHE_TARGET if cached else "off", **opts.env}


def host_cache() -> str | None:
    """The host folder where containers keep compiled programs between runs, by mnist.py's rule:
    $MNIST_COMPILATION_CACHE ("off" for none), else the user's cache folder, which local runs share."""
    setting = os.environ.get(CACHE_VARIABLE, "")
    if setting == "off":
        return None
    return setting or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-mlcube" / "jax")


def container_mounts(run: Run) -> dict[str, tuple[str, bool]]:
    """The task's mounts and, read-write for a task that compiles, the cache of compiled programs."""
    cache = host_cache() if run.task not in ONLINE_TASKS else None  # download compiles nothing
    return {**run.mounts, **({cache: (CACHE_TARGET, False)} if cache else {})}


def docker_command(run: Run, opts: Options, image: str = IMAGE) -> list[str]:
    """The `docker run` command line equivalent to what docker_execute does through the SDK. Least
    privilege: the caller's uid:gid, no capabilities, no privilege gain, a read-only root file
    system with a small /tmp, no network unless the task needs one, read-only inputs."""
    gpus = gpus_wanted(opts)
    return ["docker", "run", "--rm", f"--user={os.geteuid()}:{os.getegid()}",
            *([f"--network={network(run, opts)}"] if network(run, opts) else []),
            "--cap-drop=ALL", "--security-opt=no-new-privileges", "--read-only", f"--tmpfs=/tmp:size={TMPFS_SIZE}",
            *([f"--memory={opts.memory}"] if opts.memory else []), *([f"--cpus={opts.cpus}"] if opts.cpus else []),
            *([f"--gpus={gpus}"] if gpus else []),
            *(f"--env={key}={value}" for key, value in task_env(run, opts, image).items()),
            *(f"--volume={host}:{target}:{mode(ro)}" for host, (target, ro) in container_mounts(run).items()),
            IMAGE, run.task, *run.container_args]


def mode(read_only: bool) -> str:
    return "ro" if read_only else "rw"


def device_requests(gpus: str | None) -> list:
    if not gpus:
        return []
    from docker.types import DeviceRequest

    if gpus.startswith("device="):
        return [DeviceRequest(device_ids=gpus.removeprefix("device=").split(","), capabilities=[["gpu"]])]
    return [DeviceRequest(count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]])]


def container_settings(run: Run, opts: Options, image_id: str) -> dict:
    """docker_command's settings in the Docker SDK's terms, but for the image and its arguments."""
    return dict(
        user=f"{os.geteuid()}:{os.getegid()}", network_mode=network(run, opts), cap_drop=["ALL"],
        security_opt=["no-new-privileges"], read_only=True, tmpfs={"/tmp": f"size={TMPFS_SIZE}"},
        mem_limit=opts.memory, nano_cpus=int(float(opts.cpus) * 1e9) if opts.cpus else None,
        device_requests=device_requests(gpus_wanted(opts)), environment=task_env(run, opts, image_id),
        volumes={host: {"bind": target, "mode": mode(ro)} for host, (target, ro) in container_mounts(run).items()})


def docker_execute(client, run: Run, opts: Options) -> int:
    """docker_command's container through the SDK, streaming its output; always removed."""
    settings = container_settings(run, opts, client.images.get(IMAGE).id)
    container = client.containers.create(IMAGE, [run.task, *run.container_args], **settings)
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


DOCKER = Runtime(docker_client, lambda opts: docker_sources(), docker_built_from, docker_build, docker_command,
                 docker_execute)


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


def singularity_sources(opts: Options) -> list[str]:
    """The recipe and the files its %files section copies in; the Docker image's with --from-docker."""
    if opts.from_docker:
        return docker_sources()
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(ROOT / "Singularity.recipe")).recipe["spython-base"]
    return sorted(["Singularity.recipe", *(line.split()[0] for line in recipe.files)])


def singularity_record(opts: Options) -> Path:
    """Where an image's sources are kept: beside it, as a SIF file holds no labels we can add at build."""
    return singularity_image(opts).with_name(singularity_image(opts).name + ".sources.json")


def singularity_built_from(client, opts: Options) -> dict | None:
    if not singularity_image(opts).exists():
        return None
    try:
        return json.loads(singularity_record(opts).read_text())
    except (OSError, ValueError):
        return {}


def singularity_build(client, opts: Options, sources: dict) -> None:
    """Build the image from Singularity.recipe without root (--fakeroot), or from the Docker image."""
    image = singularity_image(opts)
    image.parent.mkdir(parents=True, exist_ok=True)
    recipe = f"docker-daemon://{IMAGE}" if opts.from_docker else str(ROOT / "Singularity.recipe")
    try:
        _, output = client.build(recipe=recipe, image=str(image), sudo=False, force=True, stream=True,
                                 options=[] if opts.from_docker else ["--fakeroot"])
        for line in output:
            print(line, end="", flush=True)
    except subprocess.CalledProcessError as e:
        raise UsageError(f"singularity build of {image} from {recipe} failed with exit code {e.returncode}") from None
    singularity_record(opts).write_text(json.dumps(sources))


def singularity_binds(run: Run) -> list[str]:
    return [f"{host}:{target}:{mode(ro)}" for host, (target, ro) in container_mounts(run).items()]


def singularity_options(run: Run, opts: Options) -> list[str]:
    """Least privilege that an unprivileged user may ask for: --containall (no host /tmp, home or
    environment; own PID and IPC namespaces), --no-home, no network unless the task needs one, the
    limits asked for, and the task's variables."""
    net = network(run, opts)
    return ["--containall", "--no-home",
            *(["--net", f"--network={net}"] if net and net != "host" else []),
            *([f"--memory={opts.memory}"] if opts.memory else []), *([f"--cpus={opts.cpus}"] if opts.cpus else []),
            *(option for key, value in task_env(run, opts, singularity_image_id(opts)).items()
              for option in ("--env", f"{key}={value}"))]


def singularity_image_id(opts: Options) -> str:
    """The image's path and what it was built from: a SIF's own digest would take a read of the whole file."""
    recorded = json.dumps(singularity_built_from(None, opts) or {}, sort_keys=True).encode()
    return f"{singularity_image(opts)} (sources {hashlib.sha256(recorded).hexdigest()[:16]})"


def singularity_command(run: Run, opts: Options) -> list[str]:
    """The `singularity run` command line that spython runs for singularity_execute."""
    return ["singularity", "run", *(["--nv"] if gpus_wanted(opts) else []),
            *(arg for bind in singularity_binds(run) for arg in ("--bind", bind)), *singularity_options(run, opts),
            str(singularity_image(opts)), run.task, *run.container_args]


def singularity_execute(client, run: Run, opts: Options) -> int:
    """Run the task through spython, streaming its output; return its exit code."""
    try:
        for line in client.run(str(singularity_image(opts)), args=[run.task, *run.container_args],
                               bind=singularity_binds(run), nv=bool(gpus_wanted(opts)),
                               options=singularity_options(run, opts), stream=True, stream_type="both"):
            print(line, end="", flush=True)
        return 0
    except subprocess.CalledProcessError as e:
        return e.returncode


SINGULARITY = Runtime(singularity_client, singularity_sources, singularity_built_from, singularity_build,
                      singularity_command, singularity_execute)


@nox.session(name="configure-singularity", python=False)
def configure_singularity(session: nox.Session) -> None:
    """Build the Singularity image from Singularity.recipe, unprivileged (`-- --from-docker` to convert)."""
    configure(session, SINGULARITY)


@nox.session(name="run-singularity", python=False)
def run_singularity(session: nox.Session) -> None:
    """Run tasks in the Singularity image, building it first if missing: `nox -s run-singularity -- train`."""
    run_in(session, SINGULARITY)


# ---------------------------------------------------------------------------- MLCube's own CLI
MLCUBE = ["mlcube==0.0.9", "mlcube-docker==0.0.9", "mlcube-singularity==0.0.9"]


@nox.session
def mlcube(session: nox.Session) -> None:
    """MLCube's reference CLI and runners: `nox -s mlcube -- run --mlcube=. --platform=docker --task=train`."""
    session.install("pip<24.1")  # MLCube pins omegaconf 2.1, whose metadata newer pips reject
    session.install(*MLCUBE)
    # MLCube writes its settings to ~/mlcube.yaml unless told otherwise: keep them in its virtualenv.
    settings = os.environ.get("MLCUBE_SYSTEM_SETTINGS", str(Path(session.virtualenv.location) / "mlcube.yaml"))
    session.run("mlcube", *session.posargs, env={"MLCUBE_SYSTEM_SETTINGS": settings})


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
    session.run("pytest", "--durations=15", *session.posargs)  # CI shows where its time goes


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common mistakes with ruff."""
    session.install("ruff")
    session.run("ruff", "check", "--isolated", "--line-length=120", "--select=E,F,W,I,B",
                "mnist.py", "noxfile.py", ".ci/bench.py", "tests", "tests/standin/singularity")
