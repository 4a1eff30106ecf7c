"""The MNIST MLCube's toolchain. `nox -l` lists the sessions; `nox -s NAME` runs one.

Runners take task names, then options (OPTIONS below; `nox -s run-local -- --help` lists them):
    nox -s run-docker -- download train --network=host --data_dir=/scratch/mnist

Reading order: the settings first, LEAST_PRIVILEGE among them (what every container runner gives a
task); then the sessions, each a few lines over the helpers below it; then how a runner carries out the
MLCube contract:
  parse_args   the session's arguments -> Options (tasks, path overrides, the runner's options)
  resolve      a task and Options -> Run: each parameter's host path (relative ones against the
               workspace), its folder mounted once at /mlcube_io<N> (read-only unless an output lands
               there), and the task's arguments with host paths (local) and with container paths
  run_tasks    each task in order, or its command line for --dry-run; the first failure stops it
  Runtime      what a container runner adds: a client, the image's sources and rebuilds, the
               command line and its execution. Docker and Singularity are Runtimes; run-local runs
               host_args in a virtualenv; run-k8s and run-kubeflow (last) turn the same Runs into
               Jobs and pipeline steps, inside their own virtualenvs.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import nox
import yaml

# ----------------------------------------------------------------------------------------- settings
nox.options.sessions = []  # a bare `nox` lists the sessions and runs nothing
nox.options.reuse_existing_virtualenvs = True

for noisy in ("docker", "urllib3"):  # nox shows every logger's debug lines; theirs are not for users
    logging.getLogger(noisy).setLevel(logging.WARNING)
# nox looks for uv before every virtualenv it makes and says so when there is none, which is the news
# of nothing: the sessions use virtualenv and pip.
logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")

ROOT = Path(__file__).resolve().parent  # the cube's folder: mlcube.yaml, mnist.py, the Dockerfile
CUBE = yaml.safe_load((ROOT / "mlcube.yaml").read_text())  # the tasks, their parameters, the image, the platform
IMAGE = CUBE["docker"]["image"]  # the image every container runner runs
SHARED = ROOT.parent / "shared"  # the benchmark's real MNIST and reference anchors, beside the clone
# the tests' virtualenv; scikit-learn for the small real data set and the linear model it is held against
TEST_DEPS = ["-r", "requirements.txt", "pytest", "hypothesis", "nox", "docker", "spython", "scikit-learn"]
MLCUBE = ["mlcube==0.0.9", "mlcube-docker==0.0.9", "mlcube-singularity==0.0.9"]  # MLCube's CLI and local runners
# Their cluster runners, in a virtualenv of their own: kfp 1.8 pins PyYAML 5, which builds on Python 3.11
# only with Cython 2 and no build isolation, and its requests-toolbelt imports what urllib3 2 removed.
MLCUBE_CLUSTER = ["mlcube==0.0.9", "mlcube-k8s==0.0.9", "mlcube-kubeflow==0.0.9", "urllib3<2"]

CONTAINERS = ("configure-docker", "run-docker", "configure-singularity", "run-singularity", "push")  # they build images
CLUSTERS = ("run-k8s", "run-kubeflow")  # their containers pull the image from a registry
LIMITED = ("run-docker", "run-singularity", "run-k8s")  # the runners that limit memory and processors
# sbatch options that run-slurm sets itself, each with the runner's option that sets it (None: none does)
SBATCH_OWN = {"output": None, "error": None, "job-name": None, "ntasks": "--processes", "nodes": "--nodes",
              "partition": "--partition", "time": "--time", "account": "--account", "gpus": "--gpus", "wait": None,
              "parsable": None, "chdir": None, "wrap": None, "cpus-per-task": "--cpus-per-task",
              "gpus-per-task": "--gpus-per-task"}

# An image reference as the cluster runners write it into manifests, NAME[:TAG] or NAME@sha256:DIGEST, by the
# grammar of Docker's distribution/reference: an optional registry host[:port]/, lower-case path components.
IMAGE_REFERENCE = re.compile(r"""
    (?P<name>(?:([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*
                              (?::[0-9]+)?)/)?
             [a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)
    (?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})|@(?P<digest>sha256:[0-9a-f]{64}))?""", re.VERBOSE)
K8S_NAME = r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"  # a Secret's name, say
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a control character: in a path, it ends a line or a field
SYSTEM_ONLY = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")
# SYSTEM_ONLY, and the folders that hold other users' files or the user's own
SYSTEM_FOLDERS = (*SYSTEM_ONLY, "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp", "/var")

SOURCES_LABEL = "org.mlcommons.mnist.sources"  # the Docker image's label of its sources (see `sources`), as JSON
CACHE_VARIABLE = "MNIST_COMPILATION_CACHE"  # the compiled programs' folder, or "off", as mnist.py reads it
CACHE_TARGET = "/cache"  # where a container sees container_cache

K8S_USER = 10001  # any uid but root's: the pods run as it, and the claim is made writable for its group
COORDINATOR_PORT = 8476  # where pod 0 of a training of several pods serves JAX's coordinator
K8S_CACHE = f"{CACHE_TARGET}/jax"  # in the pod's emptyDir, which anyone may write: a folder mnist.py makes its user's
K8S_DELETE = {"Job": "delete_namespaced_job", "Service": "delete_namespaced_service",
              "NetworkPolicy": "delete_namespaced_network_policy",
              "ConfigMap": "delete_namespaced_config_map"}  # each kind's call on its API in k8s_apply
K8S_CONFIG_BYTES = 1024 * 1024  # what one ConfigMap holds, its keys and values together
# The init container's copy of the ConfigMap's files (at configs/) onto the claim (at workspace/), from /:
# each written beside its place under a name of its own, then renamed into it, so no half-written file
# stands at a config's path, and the pods of an Indexed Job, which copy at once, never share a part.
K8S_COPY = """import os, shutil, sys, tempfile
mask = os.umask(0o022)
os.umask(mask)
for path in sys.argv[1:]:
    folder, name = os.path.split(os.path.join("workspace", path))
    os.makedirs(folder, exist_ok=True)
    handle, part = tempfile.mkstemp(dir=folder, prefix="." + name + ".", suffix=".part")
    os.fchmod(handle, 0o666 & ~mask)
    with open(handle, "wb") as out, open(os.path.join("configs", path), "rb") as config:
        shutil.copyfileobj(config, out)
    os.replace(part, os.path.join(folder, name))"""
PIPELINE_NAME = "mnist"  # the Kubeflow pipeline's name, and the start of its package's and runs' names

ONLINE_TASKS = frozenset({"download"})  # the task that fetches data; the others run with no network at all
PARALLEL_TASKS = frozenset({"train"})  # --processes=N: N processes of one run (JAX's collectives); others, one
WORKER_TASKS = frozenset({"sweep"})  # --workers=N: N independent processes that share one output folder
TMPFS_MIB = 256  # the size of /tmp, in memory: HOME in the image, which holds matplotlib's cache


@dataclasses.dataclass(frozen=True)
class Confinement:
    """What a task in a container may do. Every container runner gives it LEAST_PRIVILEGE, each in its
    runtime's terms: docker_confinement (run-docker, and kfp.local's runner), singularity_options and
    k8s_security with k8s_pod's securityContext."""

    as_caller: bool  # it runs as the caller's uid:gid, so what it writes is theirs (a cluster has no caller)
    no_capabilities: bool  # every Linux capability dropped
    no_privilege_gain: bool  # setuid programs and file capabilities raise nothing (no_new_privs)
    read_only_root: bool  # the image's own files cannot change
    read_only_inputs: bool  # a folder where none of the task's outputs lands is mounted read-only
    tmp_mib: int  # a private /tmp in memory, this big
    online_tasks: frozenset[str]  # the tasks given a network; the others get none


LEAST_PRIVILEGE = Confinement(as_caller=True, no_capabilities=True, no_privilege_gain=True, read_only_root=True,
                              read_only_inputs=True, tmp_mib=TMPFS_MIB, online_tasks=ONLINE_TASKS)

# ----------------------------------------------------------------------------------------- sessions
# Every session, in the order `nox -l` lists them. The runners' sessions read their arguments through
# `runner`, which turns a usage mistake into one line.
class UsageError(Exception):
    """A mistake in a runner's arguments or environment: reported as one line."""


def runner(name: str, parse: Callable[[list[str], str], Options] | None = None, **settings):
    """A runner's nox session, its arguments read by `parse` (parse_args by default): `--help` prints the
    options, and a UsageError anywhere in it ends the session with its one line (the one place where they
    become session.error)."""
    def decorate(function):
        @nox.session(name=name, **settings)
        @functools.wraps(function)
        def session(session: nox.Session) -> None:
            if "--help" in session.posargs:
                print(usage())
                return
            try:
                function(session, (parse or parse_args)(session.posargs, name))
            except UsageError as e:
                session.error(str(e))
        return session
    return decorate


@runner("run-local")
def run_local(session: nox.Session, opts: Options) -> None:
    """Run tasks in a virtualenv here, no container: `nox -s run-local -- download train`."""
    if not opts.dry_run:
        session.install("-r", "requirements.txt")
    python = str(Path(session.virtualenv.bin) / "python")

    def command(run: Run, opts: Options) -> list[str]:
        return [python, str(ROOT / "mnist.py"), run.task, *run.host_args]

    def execute(run: Run, opts: Options) -> int:
        """The task's exit code; a sweep's --workers run at once, and the first failure's code."""
        workers = [subprocess.Popen(command(run, opts), env={**os.environ, **opts.env})
                   for _ in range(opts.workers if run.task in WORKER_TASKS else 1)]
        return next((code for code in [worker.wait() for worker in workers] if code), 0)

    run_tasks(session, opts, command, execute)


@runner("configure-docker", python=False)
def configure_docker(session: nox.Session, opts: Options) -> None:
    """Build the Docker image named in mlcube.yaml (`-- --build-arg=BASE_IMAGE=...`)."""
    configure(DOCKER, opts)


@runner("run-docker", python=False)
def run_docker(session: nox.Session, opts: Options) -> None:
    """Run tasks in the Docker image, building it first if missing or stale: `nox -s run-docker -- train`."""
    run_in(session, DOCKER, opts)


@runner("push", lambda args, name: push_args(args, name), python=False)  # defined below
def push(session: nox.Session, opts: Options) -> None:
    """Push the Docker image, built first if missing or stale: `nox -s push -- NAME[:TAG]` prints NAME@sha256:..."""
    if opts.dry_run:
        print(shlex.join(["docker", "push", opts.image]))
        return
    pushed = docker_push(fresh_image(session, DOCKER, opts), opts.image)
    session.log(f"pushed {opts.image}; run-k8s and run-kubeflow --image={opts.image} name it by its digest")
    print(pushed)


@runner("configure-singularity", python=False)
def configure_singularity(session: nox.Session, opts: Options) -> None:
    """Build the Singularity image from Singularity.recipe, unprivileged (`-- --from-docker` to convert)."""
    fresh_docker_image(session, opts)
    configure(SINGULARITY, opts)


@runner("run-singularity", python=False)
def run_singularity(session: nox.Session, opts: Options) -> None:
    """Run tasks in the Singularity image, building it first if missing or stale: `nox -s run-singularity -- train`."""
    if opts.dry_run:
        print(singularity_image_plan(opts))
    else:
        fresh_docker_image(session, opts)
    run_in(session, SINGULARITY, opts)


@runner("run-slurm")
def run_slurm(session: nox.Session, opts: Options) -> None:
    """Run tasks as Slurm batch jobs: `nox -s run-slurm -- train --processes=2 [--container=apptainer]`."""
    if not (opts.dry_run or opts.container or opts.venv):
        session.install("-r", "requirements.txt")
    if opts.container and opts.dry_run:
        print(singularity_image_plan(opts))
    elif opts.container:
        fresh_image(session, SINGULARITY, opts)  # built or rebuilt here, on the login node
    python = (opts.venv or Path(session.virtualenv.location)) / "bin" / "python"
    run_tasks(session, opts, lambda run, opts: slurm_script(run, opts, python),
              lambda run, opts: slurm_execute(run, opts, python),
              container_mounts if opts.container else lambda run: run.mounts)


@nox.session
def mlcube(session: nox.Session) -> None:
    """MLCube's reference CLI and runners: `nox -s mlcube -- run --mlcube=. --platform=docker --task=train`."""
    run_mlcube(session, MLCUBE)


@nox.session(name="mlcube-cluster")
def mlcube_cluster(session: nox.Session) -> None:
    """MLCube's k8s and kubeflow runners: `nox -s mlcube-cluster -- show_config --mlcube=. --platform=k8s`."""
    session.install("pip<24.1", "cython<3", "wheel", "setuptools")
    session.install("--no-build-isolation", "pyyaml==5.4.1")
    run_mlcube(session, MLCUBE_CLUSTER)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest; extra arguments go to pytest)."""
    session.install(*TEST_DEPS)
    session.run("pytest", "--durations=15", *session.posargs)  # CI shows where its time goes


@nox.session
def chaos(session: nox.Session) -> None:
    """The chaos test's long run: `nox -s chaos -- 200` kills at random, each followed by a rerun."""
    session.install(*TEST_DEPS)
    kills = session.posargs[0] if session.posargs else "200"
    session.run("pytest", "-s", "tests/test_nothing_lost.py::test_chaos_kills_then_reruns_lose_nothing",
                env={"MNIST_CHAOS_KILLS": kills})


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common mistakes with ruff."""
    session.install("ruff")
    session.run("ruff", "check", "--isolated", "--line-length=120", "--select=E,F,W,I,B",
                "--per-file-ignores=mnist.py:E402",  # it reads its command line before importing JAX
                "mnist.py", "noxfile.py", ".ci/bench.py", "tests", "tests/standin/singularity")


@nox.session
def bench(session: nox.Session) -> None:
    """Time to 99 % beside the references (`-- speed`), accuracy (`-- accuracy`), Conv against nn.Conv (`-- conv`),
    sweeps: trials a minute with 1 and 2 workers, and what pruning saves (`-- sweep`)."""
    data = Path(os.environ.get("MNIST_DATA_DIR", SHARED / "data" / "mnist"))
    if not (data / "mnist.npz").is_file():
        session.error(f"no {data / 'mnist.npz'}: set MNIST_DATA_DIR to a folder holding the real MNIST")
    session.install("-r", "requirements.txt", "torch==2.13.0")  # torch for the PyTorch-shaped reference
    session.run("python", ".ci/bench.py", str(data / "mnist.npz"), f"--anchors={SHARED / 'anchors'}",
                *session.posargs)


@nox.session(name="update-pins")
def update_pins(session: nox.Session) -> None:
    """Move requirements.txt's pins to the newest releases that install together: `nox -s update-pins`."""
    path = ROOT / "requirements.txt"
    lines = path.read_text().splitlines()
    held = [line.split("#")[0].strip() for line in lines if line.endswith("# held")]
    names = [line.split("==")[0] for line in lines if line and not line.startswith("#") and not line.endswith("# held")]
    session.install("--upgrade", *names, *held)
    script = "import sys; from importlib.metadata import version; print(*(version(n) for n in sys.argv[1:]))"
    versions = dict(zip(names, session.run("python", "-c", script, *names, silent=True).split(), strict=True))
    pinned = []
    for line in lines:  # comments and order kept
        name = line.split("==")[0]
        pinned.append(f"{name}=={versions[name]}" if name in versions else line)
    path.write_text("\n".join(pinned) + "\n")
    session.log(f"pinned {', '.join(f'{name}=={version}' for name, version in versions.items())}; now nox -s tests")


@nox.session(name="run-k8s")
def run_k8s(session: nox.Session) -> None:
    """Run tasks as Kubernetes Jobs: `nox -s run-k8s -- train --pvc=NAME [--processes=N] [--dry-run]`."""
    session.install("nox", "pyyaml", "kubernetes", "kubernetes-validate", "docker")  # docker: pinned_image
    # where the client is; its messages on stderr, apart from the manifests that --dry-run prints for kubectl
    session.run("python", str(ROOT / "noxfile.py"), "run-k8s", *session.posargs, stderr=None)


@nox.session(name="run-kubeflow")
def run_kubeflow(session: nox.Session) -> None:
    """Build the tasks as a Kubeflow pipeline: `nox -s run-kubeflow -- download train [--local | --host=URL]`."""
    session.install("nox", "pyyaml", "kfp", "docker")
    session.run("python", str(ROOT / "noxfile.py"), "run-kubeflow", *session.posargs)  # where kfp is

# ------------------------------------------------------------------------------ the MLCube contract
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
    pvc: str = "mnist-workspace"
    create_pvc: bool = False
    namespace: str = "default"
    processes: int = 1
    workers: int = 1
    local: bool = False
    host: str | None = None
    nodes: str | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    container: str | None = None
    venv: Path | None = None
    sbatch: list[str] = dataclasses.field(default_factory=list)
    setup: list[str] = dataclasses.field(default_factory=list)
    cpus_per_task: str | None = None
    gpus_per_task: str | None = None
    image: str | None = None
    pull_secrets: list[str] = dataclasses.field(default_factory=list)


class Mount(NamedTuple):
    """Where a host folder appears in a container, and whether the task may write there."""
    target: str
    read_only: bool

    @property
    def mode(self) -> str:
        return "ro" if self.read_only else "rw"


@dataclasses.dataclass
class Run:
    """One task with its parameters resolved, as MLCube's reference runners resolve them."""

    task: str
    host_args: list[str]  # --name=/host/path, for a run without a container
    container_args: list[str]  # --name=/mlcube_ioN[/file]
    mounts: dict[str, Mount]  # host folder: where it is mounted


def parameters(task: str) -> dict[str, tuple[dict, bool]]:
    """Each parameter of `task`, inputs first: (its spec in mlcube.yaml, whether it is an output)."""
    spec = CUBE["tasks"][task]["parameters"]
    return {**{name: (p, False) for name, p in (spec.get("inputs") or {}).items()},
            **{name: (p, True) for name, p in (spec.get("outputs") or {}).items()}}


def pair(value: str) -> tuple[str, str]:
    name, eq, rest = value.partition("=")
    if not (name and eq):
        raise UsageError(f"expects NAME=VALUE, got {value!r}")
    return name, rest


def variable(value: str) -> tuple[str, str]:
    """NAME=VALUE for --env, NAME a variable's name: a batch script exports it as it is written."""
    name, rest = pair(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise UsageError(f"expects NAME=VALUE, NAME of letters, digits and _ (not first a digit), got {value!r}")
    return name, rest


def number_of_processes(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"expects a number of processes, 1 or more, got {value!r}")
    return int(value)


def matching(pattern: str, example: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise UsageError(f"expects {example}, got {value!r}")
        return value
    return check


def image_reference(value: str) -> str:
    """An image reference, NAME[:TAG] or NAME@sha256:DIGEST (IMAGE_REFERENCE), for a manifest's image
    field: nothing else gets into one."""
    if not IMAGE_REFERENCE.fullmatch(value):
        raise UsageError(f"expects an image reference such as registry.example:5000/mnist-jax:0.0.1 or "
                         f"NAME@sha256:DIGEST (lower-case path, no spaces), got {value!r}")
    return value


def sbatch_option(value: str) -> str:
    """Another sbatch option for a #SBATCH line: one --name[=value] token with no space or control
    character, and none that run-slurm sets (sbatch takes the start of an option's name for it)."""
    match = re.fullmatch(r"--([a-z][a-z0-9-]*)(=[^\s\x00-\x1f\x7f]*)?", value)
    if not match:
        raise UsageError(f"expects one option such as --mem=8G (--name or --name=value, no spaces), got {value!r}")
    for own, instead in SBATCH_OWN.items():
        if own.startswith(match[1]):
            raise UsageError(f"{value!r} would set --{own}, which run-slurm sets itself"
                             + (f": use its {instead}" if instead else ""))
    return value


def setup_line(value: str) -> str:
    """A shell line of the user's own for the batch script, written there as it is: one line, so no
    newline or other control character in it can add another line or end the script's."""
    if not value.strip() or CONTROL.search(value):
        raise UsageError(f"expects one shell line such as 'module load cuda/12' (no newline or other control "
                         f"character), got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Option:
    """A runner option: its help line, the Options field it sets, how its value is read (None: a flag,
    which takes no value), and the sessions it belongs to (none named: every runner's)."""
    help: str
    field: str
    read: Callable[[str], Any] | None = str
    runners: tuple[str, ...] = ()


OPTIONS = {  # every runner's options, in the order --help lists them; --NAME=PATH sets a parameter
    "workspace": Option("=PATH  where mlcube.yaml's relative paths resolve (default: workspace/)", "workspace",
                        lambda value: Path(value).resolve()),
    "env": Option("=NAME=VALUE  set a variable for the task (repeatable)", "env", variable),
    "gpus": Option("=all|N|device=I,J  give the tasks GPUs (default: platform.accelerator_count)", "gpus",
                   runners=("run-docker", "run-singularity", "run-k8s", "run-kubeflow", "run-slurm")),
    "network": Option("=NAME  the container's network (default: none, but for download)", "network",
                      runners=("run-docker", "run-singularity")),
    "memory": Option("=SIZE  limit the container's memory", "memory",
                     matching(r"[0-9]+[bkmgBKMG]?", "a size such as 8g or 512m"), LIMITED),
    "cpus": Option("=N  limit the container's processors", "cpus",
                   matching(r"[0-9]*\.?[0-9]+", "a number of processors such as 2 or 1.5"), LIMITED),
    "build-arg": Option("=NAME=VALUE  a Dockerfile ARG when an image is built", "build_args", pair, CONTAINERS),
    "from-docker": Option("  configure-singularity: convert the Docker image, not the recipe", "from_docker", None,
                          ("configure-singularity", "run-singularity")),
    "pvc": Option("=NAME  run-k8s: the workspace's PersistentVolumeClaim", "pvc", runners=("run-k8s",)),
    "create-pvc": Option("  run-k8s: make the claim first", "create_pvc", None, ("run-k8s",)),
    "namespace": Option("=NAME  run-k8s: where the Jobs go", "namespace", runners=("run-k8s",)),
    "processes": Option("=N  run-k8s, run-slurm: train across N processes (pods, Slurm tasks)", "processes",
                        number_of_processes, ("run-k8s", "run-slurm")),
    "workers": Option("=N  run-local, run-slurm, run-k8s: the sweep task as N processes sharing its sweep_dir "
                      "(a job array, an Indexed Job)", "workers", number_of_processes,
                      ("run-local", "run-slurm", "run-k8s")),
    "local": Option("  run-kubeflow: run the pipeline here, on Docker", "local", None, ("run-kubeflow",)),
    "host": Option("=URL  run-kubeflow: submit the pipeline to Kubeflow at URL", "host", runners=("run-kubeflow",)),
    "nodes": Option("=N  run-slurm: spread the processes over N nodes", "nodes",
                    matching(r"[1-9][0-9]*(-[1-9][0-9]*)?", "a number of nodes such as 2 or 1-4"), ("run-slurm",)),
    "partition": Option("=NAME  run-slurm: the partition (queue) the jobs go to", "partition",
                        matching(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*", "partition names such as gpu or gpu,cpu"),
                        ("run-slurm",)),
    "time": Option("=LIMIT  run-slurm: each job's time limit, as sbatch takes it (30:00)", "time",
                   matching(r"([0-9]+-)?[0-9]+(:[0-9]+){0,2}|(?i:infinite|unlimited)",
                            "a time such as 30, 30:00, 4:00:00 or 1-12:00"), ("run-slurm",)),
    "account": Option("=NAME  run-slurm: the account charged", "account",
                      matching(r"[A-Za-z0-9_.-]+", "an account name such as proj-42"), ("run-slurm",)),
    "container": Option("=apptainer|singularity  run-slurm: run the cube's image, not its virtualenv", "container",
                        matching(r"apptainer|singularity", "apptainer or singularity"), ("run-slurm",)),
    "venv": Option("=PATH  run-slurm: the virtualenv on the shared file system (default: the session's)", "venv",
                   lambda value: Path(value).resolve(), ("run-slurm",)),
    "sbatch": Option("=OPTION  run-slurm: another sbatch option, e.g. --sbatch=--mem=8G (repeatable)", "sbatch",
                     sbatch_option, ("run-slurm",)),
    "setup": Option("=LINE  run-slurm: a shell line the batch script runs before the task, e.g. "
                    "--setup='module load cuda/12' (repeatable)", "setup", setup_line, ("run-slurm",)),
    "cpus-per-task": Option("=N  run-slurm: the processors of each Slurm task", "cpus_per_task",
                            matching(r"[1-9][0-9]*", "a number of processors such as 4"), ("run-slurm",)),
    "gpus-per-task": Option("=N  run-slurm: the GPUs of each of train's Slurm tasks", "gpus_per_task",
                            matching(r"[1-9][0-9]*", "a number of GPUs such as 1"), ("run-slurm",)),
    "image": Option("=NAME[:TAG|@sha256:DIGEST]  run-k8s, run-kubeflow: the image the cluster pulls (default: "
                    "mlcube.yaml's)", "image", image_reference, CLUSTERS),
    "pull-secret": Option("=NAME  run-k8s: a Secret the pods pull the image with (repeatable)", "pull_secrets",
                          matching(K8S_NAME, "a Kubernetes name such as regcred"), ("run-k8s",)),
    "dry-run": Option("  print what each task would run, and run nothing", "dry_run", None),
}


def usage() -> str:
    return "\n".join(["options, after the task names:", "  --NAME=PATH  replace the path of a task parameter",
                      *(f"  --{name}{option.help}" for name, option in OPTIONS.items())])


def parse_args(args: list[str], runner: str | None = None) -> Options:
    """The runners' arguments, read with OPTIONS: task names, --NAME=PATH (or --NAME PATH) parameters,
    options; an option of another runner than `runner` is refused, not ignored."""
    opts = Options()
    for arg in joined(args):
        name, eq, value = arg.removeprefix("--").partition("=")
        option = OPTIONS.get(name) if arg.startswith("--") else None
        if option and runner and option.runners and runner not in option.runners:
            raise UsageError(f"--{name} is an option of {' and '.join(option.runners)}, not of {runner}")
        if not arg.startswith("-") and not eq:
            if arg not in CUBE["tasks"]:
                raise UsageError(f"unknown task {arg!r} (tasks: {', '.join(CUBE['tasks'])})")
            opts.tasks.append(arg)
        elif option and option.read is None and not eq:
            setattr(opts, option.field, True)
        elif option and option.read is not None and eq:
            set_option(opts, name, option, value)
        elif eq and not option:  # --NAME=PATH, or NAME=PATH as MLCube writes it
            opts.params[name] = value
        else:
            raise UsageError(f"unknown option {arg!r}; nox -s run-local -- --help lists them")
    valid = sorted({name for task in opts.tasks for name in parameters(task)})
    for name in opts.params:
        if name not in valid:
            raise UsageError(f"unknown parameter {name!r} for {', '.join(opts.tasks)} "
                             f"(parameters: {', '.join(valid)})")
    if opts.workers > 1 and not WORKER_TASKS & set(opts.tasks):
        raise UsageError(f"--workers applies to {', '.join(sorted(WORKER_TASKS))} only, not {', '.join(opts.tasks)}")
    return opts


def joined(args: list[str]) -> list[str]:
    """The arguments with --NAME VALUE written --NAME=VALUE, for a parameter or an option that takes a
    value, as most command lines accept both."""
    takes_value = {name for task in CUBE["tasks"] for name in parameters(task)}
    takes_value |= {name for name, option in OPTIONS.items() if option.read is not None}
    out, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg.startswith("--") and arg[2:] in takes_value and rest:
            arg = f"{arg}={rest.pop(0)}"
        out.append(arg)
    return out


def push_args(args: list[str], runner: str) -> Options:
    """push's arguments: the reference to push to, NAME[:TAG] (by default the tag of mlcube.yaml's image),
    as Options.image, and the options (--build-arg) for a build."""
    names = [arg for arg in joined(args) if not arg.startswith("-")]
    if len(names) != 1:
        raise UsageError("name the image to push, once: nox -s push -- registry.example:5000/mnist-jax[:TAG]")
    match = IMAGE_REFERENCE.fullmatch(names[0])
    if not match:
        raise UsageError(f"push takes an image reference, NAME[:TAG] (lower-case path, no spaces), not {names[0]!r}")
    if match["digest"]:
        raise UsageError(f"push takes NAME[:TAG], not a digest, which the registry gives: {names[0]!r}")
    opts = parse_args([arg for arg in joined(args) if arg != names[0]], runner)
    opts.image = f"{match['name']}:{match['tag'] or IMAGE_REFERENCE.fullmatch(IMAGE)['tag'] or 'latest'}"
    return opts


def set_option(opts: Options, name: str, option: Option, value: str) -> None:
    try:
        read = option.read(value)
    except UsageError as e:
        raise UsageError(f"--{name} {e}") from None
    if isinstance(read, tuple):  # NAME=VALUE, for a dictionary of them
        getattr(opts, option.field)[read[0]] = read[1]
    elif isinstance(getattr(opts, option.field), list):  # a repeatable option
        getattr(opts, option.field).append(read)
    else:
        setattr(opts, option.field, read)


def resolve(task: str, opts: Options) -> Run:
    """Host paths, mounts and arguments for `task`. Relative paths resolve against the workspace; each
    host folder is mounted once, at /mlcube_io<N>, read-only unless some output is written there."""
    run = Run(task, [], [], {})
    for name, (spec, output) in parameters(task).items():
        path = Path(os.path.expandvars(os.path.expanduser(opts.params.get(name, spec["default"]))))
        path = Path(os.path.abspath(opts.workspace / path))
        folder, file = (path.parent, "/" + path.name) if spec["type"] == "file" else (path, "")
        new = Mount(f"/mlcube_io{len(run.mounts)}", LEAST_PRIVILEGE.read_only_inputs)
        target, read_only = run.mounts.get(str(folder), new)
        run.mounts[str(folder)] = Mount(target, read_only and not output)
        run.host_args.append(f"--{name}={path}")
        run.container_args.append(f"--{name}={target}{file}")
    return run


def host_paths(run: Run) -> dict[str, str]:
    """Each parameter's host path, by name."""
    return dict(arg.removeprefix("--").split("=", 1) for arg in run.host_args)


def mount_fault(host: str, mount: Mount) -> str | None:
    """Why a container runner may not mount `host` as `mount`, or None. A character that the runtimes'
    mount syntax reads as a separator (`:` in Docker's --volume, `,` between Apptainer's --bind
    entries; a drive letter's colon is not one) or a control character; the root, the user's home or
    a system folder, which would hand the container the host's own files; to write, a folder in one
    of SYSTEM_ONLY. Symbolic links are followed, as the runtimes follow them."""
    if CONTROL.search(host) or {":", ","} & set(os.path.splitdrive(host)[1]):
        return "it holds a control character, ':' or ',', which the runtimes read as separators"
    real, home = os.path.realpath(host), os.path.realpath(os.path.expanduser("~"))
    named = {home: "your home folder", os.path.realpath(os.sep): "the root folder"}
    if real in named or real in SYSTEM_FOLDERS:
        return f"it is {named.get(real, 'a system folder')}"
    if home.startswith(real + os.sep):
        return "it holds your home folder"
    inside = [folder for folder in SYSTEM_ONLY if real.startswith(folder + os.sep)]
    if inside and not mount.read_only:
        return f"it is in the system folder {inside[0]}, where a task may not write"
    return None


def checked_mounts(mounts: dict[str, Mount]) -> dict[str, Mount]:
    """`mounts`, once mount_fault finds fault with none: every container runner's mounts, and
    Kubernetes' claim paths, pass through here."""
    for host, mount in mounts.items():
        fault = mount_fault(host, mount)
        if fault:
            raise UsageError(f"will not mount {host!r} into a container: {fault}; give the task's paths "
                             "a folder of their own")
    return mounts


def require_tasks(opts: Options) -> list[str]:
    """The tasks to run: a runner needs one at least."""
    if not opts.tasks:
        raise UsageError(f"name at least one task: {', '.join(CUBE['tasks'])}")
    return opts.tasks


def run_tasks(session: nox.Session, opts: Options, command, execute,
              mounts: Callable[[Run], dict[str, Mount]] = lambda run: run.mounts) -> None:
    """Run each task in order through `execute(run, opts)`, its `mounts(run)` made first, or print
    `command(run, opts)` for --dry-run; stop at the first failure, exiting with that task's exit code."""
    for task in require_tasks(opts):
        run = resolve(task, opts)
        shown = command(run, opts)  # a command line, or a batch script's text
        if opts.dry_run:
            print(shown if isinstance(shown, str) else shlex.join(shown))
            continue
        make_folders(mounts(run))
        code = execute(run, opts)
        if code:
            mounted = [f"{mount.target} is {host}" for host, mount in mounts(run).items()
                       if mount.target in str(shown)]
            session.log(f"task {task} failed with exit code {code}" + (f" ({'; '.join(mounted)})" if mounted else ""))
            raise SystemExit(code)


def make_folders(mounts: dict[str, Mount]) -> None:
    """The host folders of a task's mounts, made if missing; the containers' cache only its user's."""
    for folder, mount in mounts.items():
        os.makedirs(folder, mode=0o700 if mount.target == CACHE_TARGET else 0o777, exist_ok=True)

# ------------------------------------------------------------------------------- container runtimes
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
    when given: an image built with --build-arg=JAX_EXTRA=cuda12 serves later runs that name none. An
    image that records no sources was built by another tool (`mlcube configure` sets no label)."""
    if recorded is None:
        return "there is no image yet"
    if not recorded.get("files"):
        return "the image in place records no sources (built by another tool, such as mlcube configure)"
    files = recorded["files"]
    changed = sorted(name for name in {*files, *wanted["files"]} if files.get(name) != wanted["files"].get(name))
    args = sorted(name for name, value in wanted["build_args"].items()
                  if recorded.get("build_args", {}).get(name) != value)
    if changed or args:
        return "changed since it was built: " + ", ".join(changed + [f"--build-arg={name}" for name in args])
    return None


def configure(runtime: Runtime, opts: Options) -> None:
    runtime.build(runtime.connect(), opts, sources(runtime, opts))


def run_in(session: nox.Session, runtime: Runtime, opts: Options) -> None:
    """Run the session's tasks in the runtime's image, (re)built first if it must be."""
    client = None if opts.dry_run else fresh_image(session, runtime, opts)
    run_tasks(session, opts, runtime.command, lambda run, opts: runtime.execute(client, run, opts),
              container_mounts)


def fresh_image(session: nox.Session, runtime: Runtime, opts: Options):
    """The runtime's client, once its image is built from the sources as they are now: (re)built when it
    is missing or was built from other sources, saying why in one line."""
    client = runtime.connect()
    wanted = sources(runtime, opts)
    reason = why_rebuild(runtime.built_from(client, opts), wanted)
    if reason:
        session.log(f"building the image: {reason}")
        runtime.build(client, opts, wanted)
    return client


# what a runner says when a package it imports is missing, by the package's name
MISSING = {"docker": "the Docker runner needs the Docker SDK for Python: pip install docker",
           "spython": "the Singularity runner needs spython: pip install spython"}


def imported(module: str):
    """The module, imported; where its package is not installed, a UsageError that says which, and how to
    install it (MISSING), and no traceback."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(MISSING[module.partition(".")[0]]) from None


# ------------------------------------------------------------------------------------------- Docker
def docker_client():
    docker = imported("docker")
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


def docker_sources(context: Path | None = None) -> list[str]:
    """The build context's files (mlcube.yaml's, or `context`), as the Docker SDK selects them with
    .dockerignore."""
    exclude_paths = imported("docker.utils.build").exclude_paths
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
    """The task's network: --network if given; else none, unless LEAST_PRIVILEGE gives the task one
    (None: the runtime's default)."""
    return opts.network or (None if run.task in LEAST_PRIVILEGE.online_tasks else "none")


def task_env(run: Run, opts: Options, image: str) -> dict[str, str]:
    """The variables of a task in a container that the runner made: see task_variables."""
    cached = any(mount.target == CACHE_TARGET for mount in container_mounts(run).values())
    return task_variables(opts, image, CACHE_TARGET if cached else None)


def task_variables(opts: Options, image: str, cache: str | None) -> dict[str, str]:
    """A container's task variables: the image, which the outputs record; where compiled programs are
    kept (`cache`, None: nowhere); platform_variables; then the caller's --env."""
    return {"MNIST_IMAGE": image, CACHE_VARIABLE: cache or "off", **platform_variables(opts), **opts.env}


def platform_variables(opts: Options) -> dict[str, str]:
    """JAX_PLATFORMS=cpu when no GPU is wanted, for every runner that sets a task's variables: a GPU
    build of JAX would probe for CUDA, noisily. Nothing when GPUs are wanted."""
    return {} if gpus_wanted(opts) else {"JAX_PLATFORMS": "cpu"}


def compilation_cache_folder() -> str | None:
    """Where local runs keep compiled programs: $MNIST_COMPILATION_CACHE, None for "off", by default
    the user's cache folder. mnist.py holds the same rule (importing it would import JAX, which the
    toolchain does not install); tests/test_cache.py keeps the two in step."""
    setting = os.environ.get(CACHE_VARIABLE, "")
    if setting == "off":
        return None
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return setting or os.path.join(user_cache, "mnist-mlcube", "jax")


def container_cache() -> str | None:
    """The host folder where containers keep compiled programs between runs: compilation_cache_folder
    with -containers added (None for "off"). Never that folder itself: its programs are native code
    that local runs load and run, and a container must not be able to plant any there."""
    cache = compilation_cache_folder()
    return os.path.abspath(cache) + "-containers" if cache else None


def container_mounts(run: Run) -> dict[str, Mount]:
    """The task's mounts and, read-write for a task that compiles, the containers' cache of compiled
    programs; each one checked (checked_mounts)."""
    cache = container_cache() if run.task not in ONLINE_TASKS else None  # download compiles nothing
    return checked_mounts({**run.mounts, **({cache: Mount(CACHE_TARGET, False)} if cache else {})})


def caller() -> str | None:
    """The uid:gid that containers run as, the caller's; None on Windows, which has none (Docker
    Desktop chooses)."""
    return f"{os.geteuid()}:{os.getegid()}" if hasattr(os, "geteuid") else None


def docker_confinement(network: str | None) -> dict:
    """LEAST_PRIVILEGE keyed by `docker run`'s options, with the container's `network` (None: Docker's
    default); an option the policy does not ask for is None."""
    policy = LEAST_PRIVILEGE
    return {"user": caller() if policy.as_caller else None, "network": network,
            "cap-drop": "ALL" if policy.no_capabilities else None,
            "security-opt": "no-new-privileges" if policy.no_privilege_gain else None,
            "read-only": policy.read_only_root, "tmpfs": f"/tmp:size={policy.tmp_mib}m"}


def container_settings(run: Run, opts: Options, image: str) -> dict:
    """The one table of a task's container, keyed by `docker run`'s options: docker_confinement, the
    limits and GPUs asked for, the task's variables and its mounts. docker_command prints it,
    docker_execute hands it to the SDK (sdk_settings)."""
    return {**docker_confinement(network(run, opts)), "memory": opts.memory, "cpus": opts.cpus,
            "gpus": gpus_wanted(opts), "env": task_env(run, opts, image), "volume": container_mounts(run)}


def docker_command(run: Run, opts: Options, image: str = IMAGE) -> list[str]:
    """The `docker run` command line of the task's container: what --dry-run prints."""
    flags = []
    for name, value in container_settings(run, opts, image).items():
        if name == "env":
            flags += [f"--env={key}={item}" for key, item in value.items()]
        elif name == "volume":
            flags += [f"--volume={host}:{mount.target}:{mount.mode}" for host, mount in value.items()]
        elif value is True:
            flags.append(f"--{name}")
        elif value:
            flags.append(f"--{name}={value}")
    return ["docker", "run", "--rm", *flags, IMAGE, run.task, *run.container_args]


def sdk_settings(settings: dict) -> dict:
    """container_settings in the Docker SDK's terms."""
    cpus = settings["cpus"]
    return dict(**sdk_confinement(settings), mem_limit=settings["memory"],
                nano_cpus=int(float(cpus) * 1e9) if cpus else None, device_requests=device_requests(settings["gpus"]),
                environment=settings["env"],
                volumes={host: {"bind": m.target, "mode": m.mode} for host, m in settings["volume"].items()})


def sdk_confinement(settings: dict) -> dict:
    """docker_confinement's options in the Docker SDK's terms: run-docker's and kfp.local's containers."""
    tmpfs, _, tmpfs_options = settings["tmpfs"].partition(":")
    return dict(user=settings["user"], network_mode=settings["network"], cap_drop=listed(settings["cap-drop"]),
                security_opt=listed(settings["security-opt"]), read_only=settings["read-only"],
                tmpfs={tmpfs: tmpfs_options})


def listed(value: str | None) -> list[str]:
    """An option's value as the SDK's list of them: none for None."""
    return [value] if value else []


def limit_options(opts: Options) -> list[str]:
    """--memory and --cpus, as Singularity spells them (as Docker does), where they are asked for."""
    limits = {"memory": opts.memory, "cpus": opts.cpus}
    return [f"--{name}={value}" for name, value in limits.items() if value]


def device_requests(gpus: str | None) -> list:
    if not gpus:
        return []
    from docker.types import DeviceRequest

    if gpus.startswith("device="):
        return [DeviceRequest(device_ids=gpus.removeprefix("device=").split(","), capabilities=[["gpu"]])]
    return [DeviceRequest(count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]])]


def docker_execute(client, run: Run, opts: Options) -> int:
    """docker_command's container through the SDK, streaming its output; always removed."""
    settings = sdk_settings(container_settings(run, opts, client.images.get(IMAGE).id))
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


def registry_of(name: str) -> str:
    """The registry an image's name points at, as Docker reads it: its first component when that holds a
    '.' or ':', is localhost or is not lower case; else Docker Hub."""
    first, slash, _ = name.partition("/")
    return first if slash and ({".", ":"} & set(first) or first == "localhost" or first != first.lower()) \
        else "docker.io"


def docker_push(client, reference: str) -> str:
    """The cube's image tagged as `reference` (NAME:TAG) and pushed, its progress streamed: by digest,
    NAME@sha256:..., from the push's answer (else the image's RepoDigests)."""
    import docker

    name, tag = reference.rsplit(":", 1)
    client.images.get(IMAGE).tag(name, tag)
    failed = f"docker push of {reference} to {registry_of(name)} failed"
    digest, shown = None, {}
    try:
        for chunk in client.api.push(name, tag=tag, stream=True, decode=True):
            if "error" in chunk:
                raise UsageError(f"{failed}: {chunk['error'].strip()}")
            digest = (chunk.get("aux") or {}).get("Digest", digest)
            layer, status = chunk.get("id"), chunk.get("status")
            if status and shown.get(layer) != status:  # each layer's steps, not every byte's
                shown[layer] = status
                print(f"{layer}: {status}" if layer else status, flush=True)
    except docker.errors.APIError as e:
        raise UsageError(f"{failed}: {e.explanation or e}") from None
    pushed = f"{name}@{digest}" if digest else repo_digest(client, reference)
    if not pushed:
        raise UsageError(f"{failed}: the registry gave no digest")
    return pushed


def repo_digest(client, reference: str) -> str | None:
    """NAME@sha256:... for the local image `reference` (NAME[:TAG]) names, where its RepoDigests hold a
    digest for NAME's repository (this machine pushed or pulled it there); else None."""
    import docker

    name = IMAGE_REFERENCE.fullmatch(reference)["name"]
    try:
        image = client.images.get(reference)
    except docker.errors.ImageNotFound:
        return None
    return next((entry for entry in image.attrs.get("RepoDigests") or [] if entry.partition("@")[0] == name), None)


def image_of(opts: Options) -> str:
    """The image a cluster runner's containers run: --image, else mlcube.yaml's."""
    return opts.image or IMAGE


def pinned_image(opts: Options, runner: str) -> str:
    """image_of(opts) as the cluster runners write it: a tag that --image names is replaced by the digest
    this machine pushed it as (repo_digest), said in one line on stderr; anything else as it is."""
    reference = image_of(opts)
    if opts.image is None or IMAGE_REFERENCE.fullmatch(reference)["digest"]:
        return reference
    try:
        client = docker_client()
    except UsageError:
        return reference  # no Docker here: the tag is all that is known
    pinned = repo_digest(client, reference)
    if pinned:
        print(f"{runner}: {reference} is {pinned}, which this machine pushed: the manifests name that",
              file=sys.stderr)
    return pinned or reference


DOCKER = Runtime(connect=docker_client, source_files=lambda opts: docker_sources(), built_from=docker_built_from,
                 build=docker_build, command=docker_command, execute=docker_execute)

# -------------------------------------------------------------------------------------- Singularity
def singularity_client():
    """spython's client, once a Singularity or Apptainer binary is known to be there."""
    if not shutil.which("singularity"):
        if shutil.which("apptainer"):
            raise UsageError("found apptainer but no `singularity` command, which spython runs: link one "
                             "(ln -s \"$(command -v apptainer)\" ~/.local/bin/singularity)")
        raise UsageError("neither apptainer nor singularity is on PATH: install Apptainer "
                         "(https://apptainer.org/docs/admin/main/installation.html) or SingularityCE")
    return imported("spython.main").Client


def singularity_image(opts: Options) -> Path:
    """Where the image lives: workspace/.image/, as MLCube's Singularity runner keeps it."""
    return opts.workspace / ".image" / CUBE["singularity"]["image"]


def fresh_docker_image(session: nox.Session, opts: Options) -> None:
    """With --from-docker, the Docker image that is converted, built first from the sources as they are
    now when it is missing or stale (fresh_image): the Singularity image records those sources as its own."""
    if opts.from_docker:
        fresh_image(session, DOCKER, opts)


def singularity_sources(opts: Options) -> list[str]:
    """The recipe and the files its %files section copies in (the recipe too, for the image's record of
    its sources); the Docker image's with --from-docker."""
    if opts.from_docker:
        return docker_sources()
    parsers = imported("spython.main.parse.parsers")
    recipe = parsers.SingularityParser(str(ROOT / "Singularity.recipe")).recipe["spython-base"]
    return sorted({"Singularity.recipe", *(line.split()[0] for line in recipe.files)})


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


def singularity_build_command(opts: Options) -> list[str]:
    """The `singularity build` command line: from Singularity.recipe without root (--fakeroot), or from
    the Docker image."""
    recipe = f"docker-daemon://{IMAGE}" if opts.from_docker else str(ROOT / "Singularity.recipe")
    return ["singularity", "build", "--force", *([] if opts.from_docker else ["--fakeroot"]),
            str(singularity_image(opts)), recipe]


def singularity_image_plan(opts: Options) -> str:
    """What the Singularity route does to its image before any task, as --dry-run prints it first
    (run-singularity, run-slurm --container): '#' lines saying why it builds (the reason fresh_image
    gives; with --from-docker, that the Docker image comes first) or that the image is up to date, then
    the build command line that fresh_image would run, if any: the output stays a shell script."""
    docker = f"# --from-docker: {IMAGE} is built first if missing or stale, as run-docker builds it"
    plan = [docker] if opts.from_docker else []
    reason = why_rebuild(singularity_built_from(None, opts), sources(SINGULARITY, opts))
    if reason is None:
        return "\n".join([*plan, f"# {singularity_image(opts)} is up to date: nothing to build"])
    return "\n".join([*plan, f"# building the image first: {reason}", shlex.join(singularity_build_command(opts))])


def singularity_build(client, opts: Options, sources: dict) -> None:
    """Run singularity_build_command through spython, streaming its output, and record the sources."""
    stream_command = imported("spython.utils").stream_command
    command = singularity_build_command(opts)
    singularity_image(opts).parent.mkdir(parents=True, exist_ok=True)
    print(shlex.join(command), flush=True)
    try:
        for line in stream_command(command):
            print(line, end="", flush=True)
    except subprocess.CalledProcessError as e:
        raise UsageError(f"{shlex.join(command)} failed with exit code {e.returncode}") from None
    singularity_record(opts).write_text(json.dumps(sources))


def singularity_binds(run: Run) -> list[str]:
    return [f"{host}:{mount.target}:{mount.mode}" for host, mount in container_mounts(run).items()]


def singularity_options(run: Run, opts: Options) -> list[str]:
    """LEAST_PRIVILEGE in Singularity's options, then the limits asked for and the task's variables.
    Unprivileged, Singularity runs a task as its caller, with no capabilities, no privilege gain and a
    read-only image by itself; --containall adds a private /tmp, home and environment (Singularity sizes
    that /tmp, not tmp_mib) and PID and IPC namespaces of its own, --no-home keeps the caller's home
    out, and --net --network=none takes the network from a task the policy gives none."""
    net = network(run, opts)
    variables = task_env(run, opts, singularity_image_id(opts))
    split = [key for key, value in variables.items() if "," in value]
    if split:  # Apptainer's --env reads NAME=A,NAME2=B as two variables
        raise UsageError(f"--env={split[0]}=...: Singularity would split its value at ','; give it without one")
    return ["--containall", "--no-home",
            *(["--net", f"--network={net}"] if net and net != "host" else []),
            *limit_options(opts),
            *(option for key, value in variables.items() for option in ("--env", f"{key}={value}"))]


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


SINGULARITY = Runtime(connect=singularity_client, source_files=singularity_sources, built_from=singularity_built_from,
                      build=singularity_build, command=singularity_command, execute=singularity_execute)

# -------------------------------------------------------------------------------------------- Slurm
# Each task is a batch job: a script kept in workspace/slurm/ (a run is described by its folder),
# submitted with sbatch, its output followed until it ends. `train --processes=N` is N Slurm tasks,
# one JAX process each, which srun starts and JAX's own Slurm detection connects: no launcher of ours.


def slurm_job(run: Run, opts: Options) -> Options:
    """The options the task's job runs with, by the one rule of resources per task kind.
    A task of PARALLEL_TASKS takes --processes, --nodes, --gpus and --gpus-per-task; one of WORKER_TASKS
    runs one process a worker (an array task), each with --gpus and --gpus-per-task; any other task is
    one process, one Slurm task on one node with none of them (mlcube.yaml's accelerator_count holds)."""
    if run.task in PARALLEL_TASKS:
        return opts
    if run.task in WORKER_TASKS:
        return dataclasses.replace(opts, processes=1, nodes="1")
    return dataclasses.replace(opts, processes=1, nodes="1", gpus=None, gpus_per_task=None)


def slurm_folder(opts: Options) -> Path:
    return opts.workspace / "slurm"


def slurm_path(path: Path | str) -> str:
    """A path that a batch script names, once nothing in it could change the script: a control
    character would end its line, and `%` is a pattern in Slurm's file names."""
    if CONTROL.search(str(path)) or "%" in str(path):
        raise UsageError(f"run-slurm takes no path with a control character or '%' (a Slurm file name pattern): "
                         f"{str(path)!r}")
    return str(path)


def slurm_directives(run: Run, opts: Options) -> dict[str, Any]:
    """The task's #SBATCH directives: their values checked when read (OPTIONS), the output's path here;
    none may hold a space, where sbatch would end it."""
    gpus = gpus_wanted(opts)
    if gpus and not gpus.isdigit():
        raise UsageError(f"run-slurm takes --gpus=N, a number of GPUs, not {gpus!r}")
    array = run.task in WORKER_TASKS and opts.workers > 1  # a job array, one task a worker, appending to one output
    output = f"{slurm_path(slurm_folder(opts))}/{run.task}-{'%A' if array else '%j'}.out"
    if re.search(r"\s", output):
        raise UsageError(f"run-slurm writes its output's path into a #SBATCH line, which a space would end: {output!r}")
    return {"job-name": f"mnist-{run.task}", "output": output, "ntasks": opts.processes, "nodes": opts.nodes,
            "cpus-per-task": opts.cpus_per_task, "gpus-per-task": opts.gpus_per_task, "partition": opts.partition,
            "time": opts.time, "account": opts.account, "gpus": gpus,
            "array": array and f"0-{opts.workers - 1}", "open-mode": array and "append"}


def slurm_script(run: Run, opts: Options, python: Path) -> str:
    """The batch script of a task: Slurm's directives for its kind (slurm_job), the user's --setup
    lines, the task's variables, then srun of mnist.py in the virtualenv at `python`, or of the cube's
    image with run-singularity's binds and confinement. Every path in it passes slurm_path; every
    variable's value is quoted; a setup line is one line (setup_line), run before `set -u` as site
    scripts may read unset variables."""
    job = slurm_job(run, opts)
    directives = slurm_directives(run, job)
    # --gpus-per-task alone gives the task GPUs as --gpus does: --nv, and no JAX_PLATFORMS=cpu
    job = dataclasses.replace(job, gpus=gpus_wanted(job) or job.gpus_per_task)
    paths = [python, ROOT / "mnist.py", *host_paths(run).values(), *(container_mounts(run) if opts.container else ())]
    for path in paths:
        slurm_path(path)
    if opts.container:
        command = [opts.container, *singularity_command(run, job)[1:]]
        variables = {}  # singularity_command hands them to the container
    else:
        command = [str(python), str(ROOT / "mnist.py"), run.task, *run.host_args]
        variables = {**platform_variables(job), **opts.env}
    again = shlex.join(["sbatch", f"{slurm_folder(opts) / run.task}.sbatch"])
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH --{name}={value}" for name, value in directives.items() if value),
        *(f"#SBATCH {option}" for option in opts.sbatch),
        f"# Written by `nox -s run-slurm` from mlcube.yaml; `{again}` runs it again.",
        "set -eo pipefail",
        *opts.setup,
        "set -u",
        *(f"export {name}={shlex.quote(value)}" for name, value in variables.items()),
        "srun " + shlex.join(command), ""])


def slurm_execute(run: Run, opts: Options, python: Path) -> int:
    """Write the task's batch script, submit it, and print its output as it comes until the job ends;
    its exit status is the job's. Ctrl-C cancels the job: none is left behind."""
    folder = slurm_folder(opts)
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"{run.task}.sbatch"
    write_replacing(script, slurm_script(run, opts, python))
    submit = subprocess.Popen(["sbatch", "--wait", "--parsable", str(script)], stdout=subprocess.PIPE, text=True)
    job = submit.stdout.readline().strip().split(";")[0]
    if not job:  # sbatch refused it, and said why
        return submit.wait() or 1
    try:
        follow(folder / f"{run.task}-{job}.out", lambda: submit.poll() is not None)
        return submit.wait()
    except KeyboardInterrupt:
        subprocess.run(["scancel", job])
        submit.wait()
        raise


def write_replacing(path: Path, text: str) -> None:
    """Write `text` to a new file beside `path` (mkstemp: O_CREAT|O_EXCL, only its user may read it),
    then rename it over `path`: whatever stands at `path`, a symbolic link included, is replaced, never
    written through, and no reader sees half of it."""
    fd, new = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(new, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new)
        raise


def follow(path: Path, ended: Callable[[], bool]) -> None:
    """Print what is written to `path` as it comes, until `ended()` (and then the rest)."""
    offset = 0
    while True:
        done = ended()
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        if done:
            return
        time.sleep(0.2)


# ---------------------------------------------------------------------------------- MLCube's own CLI
def run_mlcube(session: nox.Session, packages: list[str]) -> None:
    """`mlcube` with the session's arguments, from its virtualenv holding `packages`."""
    session.install("pip<24.1")  # MLCube pins omegaconf 2.1, whose metadata newer pips reject
    session.install(*packages)
    # MLCube writes its settings to ~/mlcube.yaml unless told otherwise: keep them in its virtualenv.
    settings = os.environ.get("MLCUBE_SYSTEM_SETTINGS", str(Path(session.virtualenv.location) / "mlcube.yaml"))
    session.run("mlcube", *session.posargs, env={"MLCUBE_SYSTEM_SETTINGS": settings})

# --------------------------------------------------------------------------------------- Kubernetes
# Each task is a batch/v1 Job running the image, the workspace on a PersistentVolumeClaim, its network
# limited by a NetworkPolicy of its own; `train --processes=N` is an Indexed Job of N pods and a headless
# Service, through which the pods find pod 0, JAX's coordinator. The manifests are plain dictionaries;
# the official client sends them.
def quantity(size: str) -> str:
    """A size as mlcube.yaml or Docker write it (8GB, 512m, 2GiB) as a Kubernetes quantity (8G, 512M, 2Gi)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtTpP]?)(i?)[bB]?\s*", str(size))
    if not match:
        raise UsageError(f"{size!r} is not a size such as 8GB or 512M")
    number, unit, binary = match.groups()
    if not unit:
        return number
    if binary:
        return number + unit.upper() + "i"  # Ki, Mi, Gi, ...
    return number + ("k" if unit in "kK" else unit.upper())  # Kubernetes writes kilo in lower case only


def claim_path(host: str, opts: Options) -> str:
    """A host path of the workspace as a path inside the claim ('' for its root)."""
    relative = os.path.relpath(host, opts.workspace)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise UsageError(f"{host} is outside the workspace {opts.workspace}: run-k8s takes paths inside it, "
                         "which lives on the claim")
    return "" if relative == os.curdir else relative


def k8s_resources(opts: Options) -> dict:
    """What a pod asks for: memory (limited to what it asks), processors if --cpus says, GPUs."""
    platform = CUBE.get("platform") or {}
    requests = {"memory": quantity(opts.memory or platform.get("host_memory") or "2GB")}
    requests.update({"cpu": opts.cpus} if opts.cpus else {})
    gpus = gpus_wanted(opts)
    if gpus and not gpus.isdigit():
        raise UsageError(f"run-k8s takes --gpus as a number of GPUs per pod, got {gpus!r}")
    limits = {"memory": requests["memory"], **({"nvidia.com/gpu": gpus} if gpus else {})}
    return {"requests": requests, "limits": limits}


def k8s_on_claim(run: Run, opts: Options) -> dict[str, Mount]:
    """The task's mounts by their paths in the claim, once checked (checked_mounts)."""
    return {claim_path(host, opts): mount for host, mount in checked_mounts(run.mounts).items()}


def k8s_security() -> dict:
    """LEAST_PRIVILEGE as a container's securityContext (the pod's names the user: k8s_pod). A new
    dictionary each time, or the YAML would hold anchors."""
    policy = LEAST_PRIVILEGE
    return {"allowPrivilegeEscalation": not policy.no_privilege_gain, "readOnlyRootFilesystem": policy.read_only_root,
            "capabilities": {"drop": ["ALL"] if policy.no_capabilities else []}}


def k8s_container(run: Run, opts: Options, job: str, processes: int) -> dict:
    """The task's container: its folders on the claim (inputs read-only), and a cache of compiled
    programs and a /tmp of the pod's own (emptyDir volumes), never on the claim that other pods share."""
    mounts = [{"name": "workspace", "mountPath": mount.target, "readOnly": mount.read_only,
               **({"subPath": sub_path} if sub_path else {})} for sub_path, mount in k8s_on_claim(run, opts).items()]
    mounts += [{"name": "cache", "mountPath": CACHE_TARGET}, {"name": "tmp", "mountPath": "/tmp"}]
    env = task_variables(opts, image_of(opts), K8S_CACHE)
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"{job}-0.{job}:{COORDINATOR_PORT}", JAX_NUM_PROCESSES=str(processes))
    index = {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
    return {"name": run.task, "image": image_of(opts), "args": [run.task, *run.container_args],
            "env": [{"name": k, "value": v} for k, v in env.items()] + ([index] if processes > 1 else []),
            "resources": k8s_resources(opts), "securityContext": k8s_security(), "volumeMounts": mounts}


def k8s_pod(run: Run, opts: Options, job: str, processes: int, sent: dict[str, str]) -> dict:
    """The pod template: the task's container (k8s_container) with no service account token (it talks to
    no API), its folders on the claim made first by an init container, and the files `sent` (k8s_sent)
    copied there from the Job's ConfigMap by another (k8s_copy). A cluster has no caller for
    LEAST_PRIVILEGE's user: its pods run as K8S_USER, never root, with /tmp in memory. Every container
    runs image_of(opts), pulled with the --pull-secret Secrets."""
    folders = sorted(os.path.join("/workspace", sub_path) for sub_path in k8s_on_claim(run, opts))
    return {
        "metadata": {"labels": {"app": "mnist", "mnist/task": run.task}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            **({"subdomain": job} if processes > 1 else {}),
            **({"imagePullSecrets": [{"name": name} for name in opts.pull_secrets]} if opts.pull_secrets else {}),
            "securityContext": {"runAsNonRoot": True, "runAsUser": K8S_USER, "runAsGroup": K8S_USER,
                                "fsGroup": K8S_USER, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [{"name": "folders", "image": image_of(opts), "securityContext": k8s_security(),
                                "command": ["python3", "-c", "import os, sys; [os.makedirs(f, exist_ok=True) "
                                            "for f in sys.argv[1:]]", *folders],
                                "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}]},
                               *k8s_copy(sent, opts)],
            "containers": [k8s_container(run, opts, job, processes)],
            "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": opts.pvc}},
                        {"name": "cache", "emptyDir": {"sizeLimit": "256Mi"}},
                        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": f"{LEAST_PRIVILEGE.tmp_mib}Mi"}},
                        *([{"name": "configs", "configMap": {"name": job, "items": [
                            {"key": key, "path": path} for path, key in k8s_keys(sent).items()]}}] if sent else [])],
        },
    }


def k8s_sent(run: Run, opts: Options) -> dict[str, str]:
    """The files of this workspace that the task reads, by their paths on the claim, which may not hold
    them yet: its input files that no earlier task writes and the local data that data.yaml names. A
    file this workspace lacks is not sent: the task reads the claim's own."""
    earlier = opts.tasks[:opts.tasks.index(run.task)]
    written = [path for task in earlier for name, path in host_paths(resolve(task, opts)).items()
               if parameters(task)[name][1]]
    files = []
    for name, path in host_paths(run).items():
        spec, output = parameters(run.task)[name]
        if output or spec["type"] != "file" or any(os.path.commonpath([path, out]) == out for out in written):
            continue
        if k8s_entry(path, opts) == "file":
            files += [path, *(k8s_named_data(path, opts) if name == "data_config" else [])]
    return {claim_path(path, opts): path for path in files}


def k8s_entry(host: str, opts: Options) -> str:
    """What `host` is, by os.lstat: "file" (a regular file whose real path lies in the workspace),
    "folder" (likewise), or "" where nothing is there (the task reads the claim's own). A symbolic link,
    a device, a FIFO or a socket, or a path that a linked folder leads out of the workspace, is refused
    in one line, unread: mnist.py follows no link either."""
    try:
        mode = os.lstat(host).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return ""
    real, workspace = os.path.realpath(host), os.path.realpath(opts.workspace)
    fault = None
    if stat.S_ISLNK(mode):
        fault = "is a symbolic link"
    elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        fault = "is not a regular file (a device, FIFO or socket)"
    elif os.path.commonpath([real, workspace]) != workspace:
        fault = f"lies outside the workspace {opts.workspace} by its real path, {real}"
    if fault:
        raise UsageError(f"{host} {fault}: run-k8s sends the workspace's regular files only, and follows no link; "
                         "put the file itself there")
    return "folder" if stat.S_ISDIR(mode) else "file"


def k8s_folder_files(folder: str, opts: Options) -> list[str]:
    """The files under `folder`, in its subfolders too, each checked by k8s_entry before any is read."""
    files = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        kind = k8s_entry(entry.path, opts)
        if kind == "folder":
            files += k8s_folder_files(entry.path, opts)
        elif kind:
            files.append(entry.path)
    return files


def k8s_read(host: str) -> bytes:
    """The bytes of `host`, a regular file (k8s_entry), opened without following a link (O_NOFOLLOW)
    or waiting on a FIFO: one swapped in since the check is refused in one line."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        with open(os.open(host, flags), "rb") as file:
            if stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return file.read()
    except OSError as e:
        raise UsageError(f"{host}: {e.strerror}: run-k8s sends regular files only; put the file itself there") from None
    raise UsageError(f"{host} is not a regular file: run-k8s sends regular files only; put the file itself there")


def k8s_named_data(data_config: str, opts: Options) -> list[str]:
    """The local files that data.yaml names by a path relative to it (its uri, or its files' uris), a
    folder's files included: on the claim they lie beside it as here. A path of this machine is refused,
    and so is a link or special file (k8s_entry)."""
    if os.path.getsize(data_config) > K8S_CONFIG_BYTES:
        return []  # too big to send: k8s_config_map refuses it
    try:
        config = yaml.safe_load(k8s_read(data_config).decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"{data_config}: not a YAML file ({' '.join(str(e).split())})") from None
    files = config.get("files") if isinstance(config, dict) else None
    entries = [config, *(files.values() if isinstance(files, dict) else [])]
    paths = []
    for uri in (entry["uri"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("uri"), str)):
        scheme = urllib.parse.urlsplit(uri).scheme
        if scheme in ("http", "https"):
            continue
        if scheme or os.path.isabs(uri):
            raise UsageError(f"{data_config}: uri {uri!r} is a path of this machine, which a pod cannot open: name "
                             "the data relative to data.yaml (it goes to the claim beside it) or by an https:// URL")
        path = os.path.join(os.path.dirname(data_config), uri)
        kind = k8s_entry(path, opts)
        if kind == "folder":
            paths += k8s_folder_files(path, opts)
        elif kind:
            paths.append(path)
    return paths


def k8s_keys(sent: dict[str, str]) -> dict[str, str]:
    """Each sent file's key in the ConfigMap, by its path on the claim: the path in the characters a key
    may hold, numbered where two paths would share one, and numbered on until the key is free."""
    keys, used = {}, set()
    for index, path in enumerate(sorted(sent)):
        key = name = re.sub(r"[^-._a-zA-Z0-9]|^\.", "_", path)
        while key in used:
            key, index = f"{index}-{name}", index + 1
        keys[path] = key
        used.add(key)
    return keys


def k8s_config_map(sent: dict[str, str], meta: dict) -> dict:
    """The ConfigMap of the files sent to a task's claim (k8s_sent): text as data, exactly as it is here,
    the rest as binaryData. More than a ConfigMap holds is refused in one line that says what to do."""
    keys = k8s_keys(sent)
    size = sum(len(key) + os.path.getsize(sent[path]) for path, key in keys.items())
    if size > K8S_CONFIG_BYTES:
        path, host = max(sent.items(), key=lambda item: os.path.getsize(item[1]))
        raise UsageError(f"the files run-k8s sends to the claim come to {size:,} bytes, more than the "
                         f"{K8S_CONFIG_BYTES:,} a ConfigMap holds; the largest is {host}: put it on the claim at "
                         f"{path} yourself (kubectl cp, through a pod that mounts it) and run from a --workspace "
                         "without it, or, for data that data.yaml names, serve it over https:// and name that URL")
    data, binary = {}, {}
    for path, key in keys.items():
        content = k8s_read(sent[path])
        try:
            data[key] = content.decode("utf-8")
        except UnicodeDecodeError:
            binary[key] = base64.b64encode(content).decode("ascii")
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "immutable": True,
            **({"data": data} if data else {}), **({"binaryData": binary} if binary else {})}


def k8s_copy(sent: dict[str, str], opts: Options) -> list[dict]:
    """The init container that copies the sent files from the Job's ConfigMap (mounted read-only) onto the
    claim, before the task starts; none when nothing is sent."""
    if not sent:
        return []
    return [{"name": "configs", "image": image_of(opts), "securityContext": k8s_security(), "workingDir": "/",
             "command": ["python3", "-c", K8S_COPY, *sorted(sent)],
             "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"},
                              {"name": "configs", "mountPath": "/configs", "readOnly": True}]}]


def k8s_network_policy(run: Run, meta: dict, processes: int) -> dict:
    """What the Job's pods may reach, and be reached from: download, anywhere (it fetches data), and
    nothing may reach it; a training of several pods, its own pods on any port (JAX's coordinator,
    and the processes' collectives on ports they pick) and DNS, for pod 0's name; any other task,
    nothing at all."""
    def pods() -> dict:  # a new dictionary each time, or the YAML would hold anchors
        return {"podSelector": {"matchLabels": {"job-name": meta["name"]}}}

    ingress, egress = [], []
    if run.task in LEAST_PRIVILEGE.online_tasks:
        egress = [{}]
    elif processes > 1:
        ingress = [{"from": [pods()]}]
        egress = [{"to": [pods()]}, {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
            "spec": {**pods(), "policyTypes": ["Ingress", "Egress"], "ingress": ingress, "egress": egress}}


def k8s_manifests(run: Run, opts: Options, job: str) -> list[dict]:
    """The Job for one task, last, after its NetworkPolicy, the ConfigMap of the files it is sent (when
    there are any) and, for a training of several pods, the headless Service that names them."""
    if opts.processes > 1 and not PARALLEL_TASKS & set(opts.tasks):
        raise UsageError(f"--processes applies to {', '.join(sorted(PARALLEL_TASKS))} only, "
                         f"not {', '.join(opts.tasks)}")
    processes = opts.processes if run.task in PARALLEL_TASKS else 1
    meta = {"name": job, "namespace": opts.namespace, "labels": {"app": "mnist", "mnist/task": run.task}}
    sent = k8s_sent(run, opts)
    spec = {"backoffLimit": 0, "template": k8s_pod(run, opts, job, processes, sent)}
    if processes > 1:
        spec.update(completionMode="Indexed", completions=processes, parallelism=processes)
    if run.task in WORKER_TASKS and opts.workers > 1:  # independent pods, one worker each, on the claim's sweep_dir
        spec.update(completionMode="Indexed", completions=opts.workers, parallelism=opts.workers)
    manifests = [*([k8s_config_map(sent, meta)] if sent else []), k8s_network_policy(run, meta, processes),
                 {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}]
    if processes > 1:
        manifests.insert(0, {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
            "clusterIP": "None", "selector": {"job-name": job},
            "ports": [{"name": "coordinator", "port": COORDINATOR_PORT}]}})
    return manifests


def k8s_claim(opts: Options) -> dict:
    """The workspace's claim, for --create-pvc: ReadWriteMany when several pods share a model_dir."""
    size = quantity((CUBE.get("platform") or {}).get("host_disk_space") or "2GB")
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": opts.pvc, "namespace": opts.namespace, "labels": {"app": "mnist"}},
            "spec": {"accessModes": ["ReadWriteMany" if max(opts.processes, opts.workers) > 1 else "ReadWriteOnce"],
                     "resources": {"requests": {"storage": size}}}}


def k8s_job_name(task: str) -> str:
    return f"mnist-{task}-{os.urandom(3).hex()}"


def k8s_main(opts: Options) -> int:
    """run-k8s inside its virtualenv, where the Kubernetes client is: print the manifests for
    --dry-run, else apply them task by task, streaming each pod's log, and delete what was made. The
    image is named by digest where this machine pushed it (pinned_image)."""
    require_tasks(opts)
    opts = dataclasses.replace(opts, image=pinned_image(opts, "run-k8s"))
    plans = [k8s_manifests(resolve(task, opts), opts, k8s_job_name(task)) for task in opts.tasks]
    manifests = ([k8s_claim(opts)] if opts.create_pvc else []) + [m for plan in plans for m in plan]
    for manifest in manifests:
        k8s_validate(manifest)
    if opts.dry_run:
        print(yaml.dump_all(manifests, Dumper=Manifests, sort_keys=False), end="")
        return 0
    return k8s_apply(opts, plans)


class Manifests(yaml.SafeDumper):
    """YAML as people write manifests: a text of several lines (a ConfigMap's file, a script) as a block
    of lines (|) where YAML lets it be one with the same characters, else as a quoted string."""


Manifests.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def k8s_validate(manifest: dict) -> None:
    """Check a manifest against the OpenAPI schemas of the newest Kubernetes release that
    kubernetes-validate holds, strictly (no field Kubernetes does not have), before anything is sent."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        name = f"{manifest['kind']} {manifest['metadata']['name']}"
        raise UsageError(f"{name}: not valid Kubernetes ({e.message})") from None


def k8s_apply(opts: Options, plans: list[list[dict]]) -> int:
    """The exit code of the tasks applied to the cluster in turn, each followed and then deleted: the
    first failing task's, else 0. The calls to the cluster are kept thin: no cluster runs where the
    tests run."""
    from kubernetes import client, config, utils, watch

    try:
        if "KUBERNETES_SERVICE_HOST" in os.environ:  # in a pod
            config.load_incluster_config()
        else:
            config.load_kube_config()
    except config.ConfigException as e:
        raise UsageError(f"no Kubernetes cluster to talk to ({e})") from None
    api, core, batch = client.ApiClient(), client.CoreV1Api(), client.BatchV1Api()
    apis = {"Job": batch, "Service": core, "ConfigMap": core, "NetworkPolicy": client.NetworkingV1Api()}
    if opts.create_pvc:
        with contextlib.suppress(utils.FailToCreateError):  # it exists: use it
            utils.create_from_dict(api, k8s_claim(opts))
    for manifests in plans:
        job = manifests[-1]["metadata"]["name"]
        try:
            for manifest in manifests:
                utils.create_from_dict(api, manifest)
            code = k8s_follow(core, batch, watch, job, opts.namespace)
        finally:  # Ctrl-C too
            k8s_delete(apis, manifests)
        if code:
            print(f"run-k8s: task {manifests[-1]['metadata']['labels']['mnist/task']} failed with exit code {code}",
                  file=sys.stderr)
            return code
    return 0


def k8s_delete(apis: dict, manifests: list[dict]) -> None:
    """Delete what a task's manifests made, the Job first (its pods go with it), its NetworkPolicy
    and Service after; one that was never made (its creation failed) is passed over."""
    for manifest in reversed(manifests):
        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        extra = {"propagation_policy": "Background"} if manifest["kind"] == "Job" else {}
        try:
            getattr(apis[manifest["kind"]], K8S_DELETE[manifest["kind"]])(name, namespace, **extra)
        except Exception as e:  # the client's ApiException: 404 for what does not exist
            if getattr(e, "status", None) != 404:
                raise


def k8s_follow(core, batch, watch, job: str, namespace: str) -> int:
    """Stream the log of the Job's first pod, then wait for the Job; the task's exit code."""
    selector = f"job-name={job}"
    pods = watch.Watch().stream(core.list_namespaced_pod, namespace, label_selector=selector, timeout_seconds=600)
    for event in pods:
        pod = event["object"]
        if pod.status.phase in ("Running", "Succeeded", "Failed"):
            break
    for line in watch.Watch().stream(core.read_namespaced_pod_log, pod.metadata.name, namespace, follow=True):
        print(line, flush=True)
    status = batch.read_namespaced_job_status(job, namespace).status
    while not (status.succeeded or status.failed):
        time.sleep(1)
        status = batch.read_namespaced_job_status(job, namespace).status
    codes = []
    for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
        for container in pod.status.container_statuses or []:
            if container.state.terminated:
                codes.append(container.state.terminated.exit_code)
    return max(codes, default=0 if status.succeeded else 1)

# ----------------------------------------------------------------------------------------- Kubeflow
# The tasks, in the order given, as one Kubeflow Pipelines (v2) pipeline built with the kfp SDK: each
# task a container component whose inputs and outputs are artifacts. A folder a task reads comes from
# the earlier task that wrote it; the rest (the configs, images) is imported from the workspace.
# Runs the task, then reports its output artifacts in the executor output file, as KFP's Python
# executor does for Python components (kfp.local finds a container component's artifacts only there),
# then writes `status`. $0 is the executor input, $1 the status file.
KFP_REPORT = """import json, os, sys
outputs = json.loads(sys.argv[1])["outputs"]
artifacts = {name: {"artifacts": [{"name": a["artifacts"][0]["name"], "uri": a["artifacts"][0]["uri"], "metadata": {}}]}
             for name, a in outputs.get("artifacts", {}).items()}
os.makedirs(os.path.dirname(outputs["outputFile"]), exist_ok=True)
with open(outputs["outputFile"], "w") as f:
    json.dump({"artifacts": artifacts}, f)"""
KFP_WRAPPER = ('executor_input="$0"; status="$1"; shift; python3 /mlcube/mnist.py "$@" && '
               f'python3 -c \'{KFP_REPORT}\' "$executor_input" && echo 0 > "$status"')

def kfp_component(task: str, image: str):
    """A task as a container component, from mlcube.yaml. It also writes `status`, only when the task
    succeeded: kfp.local counts a container that was gone before it was asked for its exit code as a
    success, and the runner checks `status` instead."""
    from kfp import components

    params = parameters(task)
    args = [arg for name, (_, output) in params.items()
            for arg in (f"--{name}", {"outputPath" if output else "inputPath": name})]
    spec = {"name": task, "description": f"mnist.py {task}",
            "inputs": [{"name": name, "type": "Artifact"} for name, (_, output) in params.items() if not output],
            "outputs": [*({"name": name, "type": "Artifact"} for name, (_, output) in params.items() if output),
                        {"name": "status", "type": "String"}],
            "implementation": {"container": {"image": image, "command": [
                "sh", "-c", KFP_WRAPPER, {"executorInput": None}, {"outputPath": "status"}, task, *args]}}}
    return components.load_component_from_text(yaml.safe_dump(spec))


def kfp_imports(opts: Options) -> dict[str, str]:
    """The host path of each input that no earlier task writes: what the pipeline imports."""
    imported, produced = {}, set()
    for task in opts.tasks:
        paths = host_paths(resolve(task, opts))
        for name, (_, output) in parameters(task).items():
            if output:
                produced.add(name)
            elif name not in produced and name not in imported:
                imported[name] = paths[name]
    return imported


def kfp_import_folders(opts: Options) -> list[str]:
    """The host folders of what the pipeline imports, for kfp.local to mount: a file's folder, as every
    runner mounts it (the offline route's data lies beside data.yaml). Each import must be there, as
    Docker mounts nothing that is missing."""
    kinds = {name: spec["type"] for task in opts.tasks for name, (spec, _) in parameters(task).items()}
    imported = kfp_imports(opts)
    for path in imported.values():
        if not os.path.exists(path):
            raise UsageError(f"the pipeline imports {path}, which does not exist")
    return sorted({os.path.dirname(path) if kinds[name] == "file" else path for name, path in imported.items()})


def kfp_pipeline(opts: Options):
    from kfp import dsl

    @dsl.pipeline(name=PIPELINE_NAME, description=CUBE.get("description", ""))
    def pipeline():
        imported, produced = kfp_imports(opts), {}
        for task in opts.tasks:
            inputs = {}
            for name, (_, output) in parameters(task).items():
                if output:
                    continue
                if name not in produced:
                    produced[name] = dsl.importer(artifact_uri=imported[name], artifact_class=dsl.Artifact).output
                inputs[name] = produced[name]
            step = kfp_component(task, image_of(opts))(**inputs)
            produced.update({name: step.outputs[name] for name, (_, output) in parameters(task).items() if output})

    return pipeline


def kfp_main(opts: Options) -> int:
    """run-kubeflow inside its virtualenv, where the kfp SDK is: write the compiled pipeline to the
    workspace, then run it here (--local) or submit it (--host)."""
    require_tasks(opts)  # a usage error first, before the SDK's import
    from kfp import compiler

    opts = dataclasses.replace(opts, image=pinned_image(opts, "run-kubeflow"))
    package = opts.workspace / f"{PIPELINE_NAME}-pipeline.yaml"
    opts.workspace.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(kfp_pipeline(opts), str(package))
    print(f"run-kubeflow: wrote {package}")
    if opts.local:
        return kfp_run_locally(opts)
    if opts.host:
        import kfp

        run = kfp.Client(host=opts.host).create_run_from_pipeline_package(str(package), arguments={})
        print(f"run-kubeflow: submitted run {run.run_id} to {opts.host}")
    return 0


def kfp_root(opts: Options) -> Path:
    """kfp.local's pipeline root, which its containers may write: a folder of the workspace's own."""
    return opts.workspace / "kubeflow"


def kfp_run_locally(opts: Options) -> int:
    """The exit code of the pipeline run on this machine's Docker engine: that of the first task that did
    not succeed, else 0. Each container gets docker_confinement, writes only in kfp_root (kfp.local
    mounts it read-write) and sees the folders of what the pipeline imports read-only at their own
    paths; kfp.local's one runner serves every step, so each has Docker's default network, which
    download needs."""
    from docker.types import Mount as DockerMount
    from kfp import local

    root = kfp_root(opts)
    imports = {folder: Mount(folder, True) for folder in kfp_import_folders(opts)}
    checked_mounts({str(root): Mount(str(root), False), **imports})
    # kfp.local hands the component's command to Docker as CMD, after the image's ENTRYPOINT, where
    # Kubernetes replaces the ENTRYPOINT with it; env runs the command as Kubernetes would.
    runner = local.DockerRunner(entrypoint=["/usr/bin/env"], **sdk_confinement(docker_confinement(None)),
                                environment={CACHE_VARIABLE: "off"},
                                mounts=[DockerMount(path, path, type="bind", read_only=True) for path in imports])
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=False)
    before = set(root.glob(f"{PIPELINE_NAME}-20*"))  # a run's folder is named for its date
    kfp_pipeline(opts)()
    runs = sorted(set(root.glob(f"{PIPELINE_NAME}-20*")) - before)
    for task in opts.tasks:
        if not runs or not (runs[-1] / task / "status").is_file():
            print(f"run-kubeflow: task {task} failed (see its log above)", file=sys.stderr)
            return 1
    print(f"run-kubeflow: the tasks' outputs are in {runs[-1]}")
    return 0


def main_in_virtualenv(name: str, args: list[str]) -> int:
    """run-k8s or run-kubeflow, run again by its session inside its own virtualenv, where its client
    is: the sessions' --help, and a usage error as one line, as runner() gives them."""
    if "--help" in args:
        print(usage())
        return 0
    try:
        return {"run-k8s": k8s_main, "run-kubeflow": kfp_main}[name](parse_args(args, name))
    except UsageError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main_in_virtualenv(sys.argv[1], sys.argv[2:]))
