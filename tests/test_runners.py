"""The nox runners: the MLCube contract without a daemon, then run-local and run-docker for real."""
import dataclasses
import json
import ntpath
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import (
    BASE,
    CUBE_FILES,
    IMAGE,
    ROOT,
    chown,
    digits_workspace,
    make_digits,
    needs_docker,
    nox,
    npz_bytes,
    sha256,
    source_workspace,
    start_as_in_a_terminal,
)

sys.path.insert(0, str(ROOT))
import mnist  # noqa: E402
import noxfile  # noqa: E402


# ------------------------------------------------------------------ contract, no daemon needed
def test_parse_args_tasks_overrides_and_options(tmp_path):
    opts = noxfile.parse_args(["download", "train", "--data_dir=/d", "model_dir=m", f"--workspace={tmp_path}",
                               "--gpus=all", "--network=host", "--env=A=1=2", "--build-arg=BASE_IMAGE=b",
                               "--dry-run"])
    assert opts.tasks == ["download", "train"] and opts.params == {"data_dir": "/d", "model_dir": "m"}
    assert opts.workspace == tmp_path and opts.gpus == "all" and opts.network == "host"
    assert opts.env == {"A": "1=2"} and opts.build_args == {"BASE_IMAGE": "b"} and opts.dry_run


def test_mlcube_yaml_and_mnist_py_name_the_same_tasks_and_parameters():
    """The contract has two sides: a task or parameter on one only would fail at run time."""
    cube = {task: {name: (spec["type"], output) for name, (spec, output) in noxfile.parameters(task).items()}
            for task in noxfile.CUBE["tasks"]}
    assert cube == {task: {name: (kind, output) for name, (_, kind, output) in params.items()}
                    for task, (_, params) in mnist.COMMANDS.items()}
    assert list(mnist.TASKS) == list(mnist.COMMANDS)


@pytest.mark.parametrize("args, message", [
    (["fit"], "unknown task 'fit' (tasks: download, train, evaluate, infer, sweep)"),
    (["train", "--fast"], "unknown option '--fast'"),
    (["train", "--data_config=x"], "unknown parameter 'data_config' for train (parameters: data_dir, log_dir,"),
    (["download", "--env=NOVALUE"], "--env expects NAME=VALUE"),
])
def test_parse_args_errors(args, message):
    with pytest.raises(noxfile.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        noxfile.parse_args(args)


def test_resolve_download_mounts_and_args(tmp_path):
    run = noxfile.resolve("download", noxfile.parse_args(["download", f"--workspace={tmp_path}"]))
    assert run.container_args == ["--data_config=/mlcube_io0/data.yaml", "--data_dir=/mlcube_io1",
                                  "--log_dir=/mlcube_io2"]
    assert run.mounts == {str(tmp_path): ("/mlcube_io0", True), str(tmp_path / "data"): ("/mlcube_io1", False),
                          str(tmp_path / "logs"): ("/mlcube_io2", False)}
    assert run.host_args == [f"--data_config={tmp_path}/data.yaml", f"--data_dir={tmp_path}/data",
                             f"--log_dir={tmp_path}/logs"]


def test_resolve_overrides_and_shared_folders(tmp_path):
    opts = noxfile.parse_args(["train", f"--workspace={tmp_path}", "--data_dir=/abs/data", "log_dir=/abs/data",
                               "train_config=~/t.yaml"])
    run = noxfile.resolve("train", opts)
    # log_dir shares data_dir's folder: one mount, writable because an output lands there.
    assert run.mounts == {"/abs/data": ("/mlcube_io0", False), os.path.expanduser("~"): ("/mlcube_io1", True),
                          str(tmp_path / "model"): ("/mlcube_io2", False)}
    assert run.container_args == ["--data_dir=/mlcube_io0", "--train_config=/mlcube_io1/t.yaml",
                                  "--log_dir=/mlcube_io0", "--model_dir=/mlcube_io2"]


def test_docker_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_COMPILATION_CACHE", str(tmp_path / "cache"))
    opts = noxfile.parse_args(["train", f"--workspace={tmp_path}", "--network=host", "--gpus=all", "--env=X=1",
                               "--memory=2g", "--cpus=1.5"])
    assert noxfile.docker_command(noxfile.resolve("train", opts), opts) == [
        "docker", "run", "--rm", f"--user={os.geteuid()}:{os.getegid()}", "--network=host", "--cap-drop=ALL",
        "--security-opt=no-new-privileges", "--read-only", "--tmpfs=/tmp:size=256m", "--memory=2g", "--cpus=1.5",
        "--gpus=all", f"--env=MNIST_IMAGE={IMAGE}", "--env=MNIST_COMPILATION_CACHE=/cache", "--env=X=1",
        f"--volume={tmp_path / 'data'}:/mlcube_io0:ro", f"--volume={tmp_path}:/mlcube_io1:ro",
        f"--volume={tmp_path / 'logs'}:/mlcube_io2:rw", f"--volume={tmp_path / 'model'}:/mlcube_io3:rw",
        f"--volume={tmp_path / 'cache-containers'}:/cache:rw",
        IMAGE, "train", "--data_dir=/mlcube_io0", "--train_config=/mlcube_io1/train.yaml",
        "--log_dir=/mlcube_io2", "--model_dir=/mlcube_io3"]
    monkeypatch.setenv("MNIST_COMPILATION_CACHE", "off")
    command = noxfile.docker_command(noxfile.resolve("train", opts), opts)
    assert "--env=MNIST_COMPILATION_CACHE=off" in command and not any(":/cache:" in arg for arg in command)


def test_build_context_holds_only_what_the_image_needs(tmp_path, monkeypatch):
    """.dockerignore, as the Docker SDK applies it, on a copy of the cube with data and a venv in it."""
    cube = tmp_path / "cube"
    shutil.copytree(ROOT, cube, ignore=shutil.ignore_patterns(".git", ".nox", ".gpu"))
    for junk in ("workspace/data/mnist.npz", "workspace/model/params.msgpack", ".nox/tests/bin/python", ".git/HEAD"):
        (cube / junk).parent.mkdir(parents=True, exist_ok=True)
        (cube / junk).write_text("x")
    monkeypatch.setattr(noxfile, "ROOT", cube)
    assert noxfile.docker_sources(cube) == [".dockerignore", "Dockerfile", "mnist.py", "requirements.txt"]


def test_why_rebuild_names_what_changed():
    """Go-task's `sources:` check: files by digest, build arguments only where this run names them."""
    built = {"files": {"mnist.py": "a", "Dockerfile": "b"}, "build_args": {"JAX_EXTRA": "cuda12"}}
    same = {"files": {"mnist.py": "a", "Dockerfile": "b"}, "build_args": {}}
    assert noxfile.why_rebuild(built, same) is None
    assert noxfile.why_rebuild(built, {**same, "build_args": {"JAX_EXTRA": "cuda12"}}) is None
    assert noxfile.why_rebuild(None, same) == "there is no image yet"
    assert noxfile.why_rebuild(built, {"files": {"mnist.py": "c", "Dockerfile": "b", "requirements.txt": "d"},
                                       "build_args": {"JAX_EXTRA": ""}}) == (
        "changed since it was built: mnist.py, requirements.txt, --build-arg=JAX_EXTRA")
    assert noxfile.why_rebuild({}, same) == ("the image in place records no sources (built by another tool, "
                                             "such as mlcube configure)")


@pytest.mark.parametrize("option, message", [
    ("--cpus=two", "--cpus expects a number of processors such as 2 or 1.5, got 'two'"),
    ("--memory=8GB", "--memory expects a size such as 8g or 512m, got '8GB'"),
])
def test_limits_are_checked(option, message):
    with pytest.raises(noxfile.UsageError, match=message):
        noxfile.parse_args(["train", option])


def test_values_may_follow_their_option_after_a_space(tmp_path):
    opts = noxfile.parse_args(["train", "--data_dir", "/d", "--network", "host", "--workspace", str(tmp_path),
                               "--dry-run"], "run-docker")
    assert opts.params == {"data_dir": "/d"} and opts.network == "host" and opts.workspace == tmp_path
    assert opts.dry_run and opts.tasks == ["train"]


@pytest.mark.parametrize("runner, option, owner", [
    ("run-docker", "--pvc=x", "run-k8s"),
    ("run-local", "--network=host", "run-docker and run-singularity"),
    ("run-k8s", "--local", "run-kubeflow"),
    ("configure-docker", "--from-docker", "configure-singularity and run-singularity"),
])
def test_another_runners_option_is_refused_not_ignored(runner, option, owner):
    with pytest.raises(noxfile.UsageError, match=f"^{option.split('=')[0]} is an option of {owner}, not of {runner}$"):
        noxfile.parse_args(["train", option], runner)
    result = nox("-s", runner, "--", "train", option, "--dry-run")
    assert result.returncode == 1 and f"is an option of {owner}, not of {runner}" in result.stdout + result.stderr


def test_only_download_gets_a_network():
    opts = noxfile.parse_args(["download", "train"])
    assert [noxfile.network(noxfile.resolve(task, opts), opts) for task in opts.tasks] == [None, "none"]
    opts = noxfile.parse_args(["train", "--network=bridge"])
    assert noxfile.network(noxfile.resolve("train", opts), opts) == "bridge"


def test_every_container_runner_takes_its_privileges_from_the_one_policy(tmp_path, monkeypatch):
    """LEAST_PRIVILEGE, changed in its one place, changes Docker's command line and SDK settings,
    Singularity's network and the pods' /tmp and NetworkPolicy alike."""
    wider = dataclasses.replace(noxfile.LEAST_PRIVILEGE, tmp_mib=64, online_tasks=frozenset({"download", "train"}))
    monkeypatch.setattr(noxfile, "LEAST_PRIVILEGE", wider)
    opts = noxfile.parse_args(["train", f"--workspace={tmp_path}"])
    run = noxfile.resolve("train", opts)
    command = noxfile.docker_command(run, opts)
    assert "--tmpfs=/tmp:size=64m" in command and not any(arg.startswith("--network") for arg in command)
    assert noxfile.sdk_settings(noxfile.container_settings(run, opts, "x"))["tmpfs"] == {"/tmp": "size=64m"}
    assert "--network=none" not in noxfile.singularity_command(run, opts)
    network_policy, job = noxfile.k8s_manifests(run, opts, "mnist-job")
    volumes = job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}} in volumes
    assert network_policy["spec"]["egress"] == [{}]


def test_gpus_from_option_or_accelerator_count(monkeypatch):
    assert noxfile.gpus_wanted(noxfile.Options()) is None  # CPU by default: mlcube.yaml asks for none
    assert noxfile.gpus_wanted(noxfile.Options(gpus="device=1")) == "device=1"
    monkeypatch.setitem(noxfile.CUBE["platform"], "accelerator_count", 2)
    assert noxfile.gpus_wanted(noxfile.Options()) == "2"
    assert noxfile.device_requests("all")[0]["Count"] == -1
    assert noxfile.device_requests("2")[0]["Count"] == 2
    assert noxfile.device_requests("device=0,3")[0]["DeviceIDs"] == ["0", "3"]
    assert noxfile.device_requests(None) == []


# Each container runner's line for a task: Docker's, Singularity's, Slurm's container route, Kubernetes'.
CONTAINER_RUNNERS = {
    "run-docker": lambda run, opts: noxfile.docker_command(run, opts),
    "run-singularity": lambda run, opts: noxfile.singularity_command(run, opts),
    "run-slurm --container": lambda run, opts: noxfile.slurm_script(
        run, dataclasses.replace(opts, container="apptainer"), Path(sys.executable)),
    "run-k8s": lambda run, opts: noxfile.k8s_manifests(run, opts, "mnist-job"),
}


@pytest.mark.parametrize("runner", CONTAINER_RUNNERS)
@pytest.mark.parametrize("args, fault", [
    (["infer", "--predictions=/predictions.json"], "'/' into a container: it is the root folder"),
    (["train", "--log_dir=~"], "it is your home folder"),
    (["train", "--model_dir=/etc"], "'/etc' into a container: it is a system folder"),
    (["train", "--data_dir=/usr"], "'/usr' into a container: it is a system folder"),  # read-only too
    (["train", "--model_dir=/etc/cron.d"], "it is in the system folder /etc, where a task may not write"),
    (["train", "--model_dir=link/cron.d"], "it is in the system folder /etc, where a task may not write"),
    (["train", "--data_dir=/x,/etc"], "'/x,/etc' into a container: it holds a control character, ':' or ','"),
    (["train", "--data_dir=/x:/etc"], "'/x:/etc' into a container: it holds a control character, ':' or ','"),
    (["train", "--data_dir=/x\n/etc"], "'/x\\n/etc' into a container: it holds a control character"),
    (["train", "--data_dir=/tmp"], "'/tmp' into a container: it is a system folder"),
    (["train", "--log_dir=~/.."], "into a container: it holds your home folder"),
])
def test_a_mount_wider_than_the_task_needs_is_refused(runner, args, fault, tmp_path, monkeypatch):
    """What an attacker would hand a runner, a path or a folder linked elsewhere: every container
    runner refuses it in one line, before anything runs or is written."""
    monkeypatch.setenv("HOME", str(tmp_path.parent / f"{tmp_path.name}-home"))  # beside the workspace, not in it
    (tmp_path / "link").symlink_to("/etc")
    opts = noxfile.parse_args([*args, f"--workspace={tmp_path}"])
    with pytest.raises(noxfile.UsageError) as refused:
        CONTAINER_RUNNERS[runner](noxfile.resolve(args[0], opts), opts)
    assert fault in str(refused.value) and "\n" not in str(refused.value)
    assert "give the task's paths a folder of their own" in str(refused.value)


def test_what_a_task_may_have_is_mounted():
    """Reading from a system folder's own folders, or writing where users keep their files, stays open."""
    opts = noxfile.parse_args(["train", "--train_config=/usr/share/mnist/train.yaml", "--model_dir=/srv/mnist/m",
                               "--log_dir=/var/tmp/logs"])
    mounts = noxfile.container_mounts(noxfile.resolve("train", opts))
    assert mounts["/usr/share/mnist"].read_only and not mounts["/srv/mnist/m"].read_only


def test_a_drive_letters_colon_is_no_separator(monkeypatch):
    """Windows paths, by Windows's rules: C: is the drive; a colon after it still separates."""
    monkeypatch.setattr(os.path, "splitdrive", ntpath.splitdrive)
    mount = noxfile.Mount("/mlcube_io0", False)
    assert noxfile.mount_fault(r"C:\Users\me\ws\model", mount) is None
    assert "':' or ','" in noxfile.mount_fault(r"C:\Users\me\ws:C:\Windows", mount)


def test_a_refused_mount_ends_the_dry_run_in_one_line(tmp_path):
    result = nox("-s", "run-docker", "--", "infer", "--predictions=/predictions.json", f"--workspace={tmp_path}",
                 "--dry-run")
    assert result.returncode == 1 and "Traceback" not in result.stderr and "docker run" not in result.stdout
    assert "run-docker aborted: will not mount '/' into a container: it is the root folder" in result.stderr


def test_containers_get_a_cache_of_their_own(tmp_path, monkeypatch):
    """Never the folder local runs load compiled programs from, which a container could fill with code
    of its choosing: a folder beside it, which the runner makes its user's alone."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("MNIST_COMPILATION_CACHE", raising=False)
    local, own = tmp_path / "home/.cache/mnist-mlcube/jax", tmp_path / "home/.cache/mnist-mlcube/jax-containers"
    assert noxfile.compilation_cache_folder() == str(local) and noxfile.container_cache() == str(own)
    opts = noxfile.parse_args(["train", f"--workspace={tmp_path / 'ws'}"])
    mounts = noxfile.container_mounts(noxfile.resolve("train", opts))
    assert mounts[str(own)] == ("/cache", False) and str(local) not in mounts
    noxfile.make_folders(mounts)
    assert own.stat().st_mode & 0o777 == 0o700 and not local.exists()
    dry = nox("-s", "run-docker", "--", "train", f"--workspace={tmp_path / 'ws'}", "--dry-run",
              env={"HOME": str(tmp_path / "home"), "MNIST_COMPILATION_CACHE": str(tmp_path / "c")})
    assert f"--volume={tmp_path / 'c-containers'}:/cache:rw" in dry.stdout and f"{tmp_path / 'c'}:" not in dry.stdout
    monkeypatch.setenv("MNIST_COMPILATION_CACHE", "off")
    assert noxfile.container_cache() is None


def test_a_caller_without_a_uid_leaves_the_user_to_docker(monkeypatch):
    """Windows has no os.geteuid: Docker Desktop chooses the user."""
    monkeypatch.delattr(os, "geteuid")
    assert noxfile.caller() is None


# ------------------------------------------------------------------------- runners, for real
def test_dry_run_prints_and_runs_nothing(tmp_path):
    result = nox("-s", "run-docker", "--", "download", f"--workspace={tmp_path}", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"docker run --rm --user={os.geteuid()}:{os.getegid()} --cap-drop=ALL" in result.stdout
    assert f"--volume={tmp_path}:/mlcube_io0:ro" in result.stdout
    assert os.listdir(tmp_path) == []


def test_run_local_every_task(tmp_path, server):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()), server, train_epochs=2)
    result = nox("-s", "run-local", "--", "download", "train", "evaluate", "infer", f"--workspace={ws}")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((ws / "model" / "model.json").read_text())
    assert summary["epochs_run"] == 2 and summary["test_accuracy"] > 0.5
    assert (ws / "logs" / "mnist_download.log").exists() and (ws / "logs" / "train_metrics.jsonl").exists()
    assert json.loads((ws / "logs" / "evaluate_metrics.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    assert len(json.loads((ws / "predictions" / "predictions.json").read_text())["predictions"]) == 128


def test_run_local_stops_at_first_failure_with_its_code(tmp_path, server):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()), server, digest="f" * 64)
    result = nox("-s", "run-local", "--", "download", "train", f"--workspace={ws}")
    assert result.returncode == 1 and "SHA-256 mismatch" in result.stderr
    assert "task download failed with exit code 1" in result.stderr
    assert not (ws / "model").exists() and not (ws / "logs" / "mnist_train.log").exists()


# ------------------------------------------------------------ Docker, against a real engine
def containers():
    return subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={IMAGE}"], capture_output=True,
                          text=True).stdout.split()


@needs_docker
def test_run_docker_download_and_train_real_mnist(tmp_path, server, real_sample, image, plain_user):
    """download of real digits (real_sample) with the host's network (the test's server is on its
    loopback), then the other tasks with none: they train, write every output as the caller, and
    record the image they ran in."""
    body = real_sample
    home = plain_user or tmp_path
    ws = source_workspace(home / "work" / "ws", body, server, batch_size=64)
    if plain_user:
        chown(home / "work", 4321)
    owner = (4321, 4321) if plain_user else (os.getuid(), os.getgid())
    for tasks in (["download", "--network=host"], ["train", "evaluate", "infer"]):
        result = nox("-s", "run-docker", "--", *tasks, f"--workspace={ws}", env={"HOME": str(home)}, user=plain_user)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sha256((ws / "data" / "mnist.npz").read_bytes()) == sha256(body)
    summary = json.loads((ws / "model" / "model.json").read_text())
    assert summary["test_accuracy"] > 0.95 and summary["backend"] == "cpu"
    image_id = subprocess.run(["docker", "image", "inspect", "--format={{.Id}}", IMAGE], capture_output=True,
                              text=True).stdout.strip()
    metrics = json.loads((ws / "logs" / "evaluate_metrics.json").read_text())
    assert metrics["test_accuracy"] == summary["test_accuracy"]
    assert summary["image"] == metrics["image"] == image_id
    assert len(json.loads((ws / "predictions" / "predictions.json").read_text())["predictions"]) == 10000
    for picture in ("training_curves.png", "confusion_matrix.png", "mistakes.png"):  # matplotlib is in the image
        assert (ws / "logs" / picture).read_bytes().startswith(b"\x89PNG")
    written = [p for d in ("data", "logs", "model", "predictions") for p in (ws / d, *(ws / d).iterdir())]
    assert {(p.stat().st_uid, p.stat().st_gid) for p in written} == {owner}
    assert "epoch 1/1" in result.stdout  # the container's output streamed through
    assert containers() == []


PROBE = """
import json, pathlib, sys, urllib.request
def attempt(action):
    try:
        action()
        return "ok"
    except Exception as e:
        return type(e).__name__
url, *folders = sys.argv[1:]
status = dict(line.split(":\t") for line in pathlib.Path("/proc/self/status").read_text().splitlines() if ":\t" in line)
print(json.dumps({
    "network": attempt(lambda: urllib.request.urlopen(url, timeout=5).read()),
    "writes": {f: attempt(lambda f=f: pathlib.Path(f, "probe").write_text("x")) for f in folders},
    "capabilities": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "user": f"{status['Uid'].split()[0]}:{status['Gid'].split()[0]}"}))
"""


@needs_docker
def test_run_docker_tasks_get_least_privilege(tmp_path, server, image):
    """train's container, exactly as run-docker makes it, with a probe in mnnist.py's place: it reaches
    no server (a host-network twin does: the probe can tell), writes only its outputs and /tmp, holds
    no capability, cannot gain privileges, and runs as the caller."""
    import docker

    client = docker.from_env()
    url = server.serve("/ping", b"pong")
    results = {}
    for network in ([], ["--network=host"]):
        opts = noxfile.parse_args(["train", f"--workspace={tmp_path}", *network])
        run = noxfile.resolve("train", opts)
        for folder in run.mounts:
            os.makedirs(folder, exist_ok=True)
        folders = ["/", "/mlcube", "/tmp", *(target for target, _ in run.mounts.values())]
        output = client.containers.run(IMAGE, [url, *folders], entrypoint=["python3", "-c", PROBE], remove=True,
                                       **noxfile.sdk_settings(noxfile.container_settings(run, opts, "probe")))
        results[bool(network)] = json.loads(output)
    confined, open_twin = results[False], results[True]
    assert confined["network"] == "URLError" and open_twin["network"] == "ok"
    assert confined["writes"] == {"/": "OSError", "/mlcube": "OSError", "/tmp": "ok",
                                  "/mlcube_io0": "OSError", "/mlcube_io1": "OSError",  # data_dir, train_config
                                  "/mlcube_io2": "ok", "/mlcube_io3": "ok"}  # log_dir, model_dir
    assert confined["capabilities"] == "0000000000000000" and confined["no_new_privs"] == "1"
    assert confined["user"] == f"{os.geteuid()}:{os.getegid()}"


@needs_docker
def test_run_docker_rebuilds_a_stale_image_and_says_why(tmp_path, server, image):
    """A copy of the cube whose mnist.py differs: its first run rebuilds the image, saying why in one
    line; its second finds the image built from the same sources and starts at once."""
    cube = tmp_path / "cube"
    cube.mkdir()
    for name in CUBE_FILES:
        shutil.copy(ROOT / name, cube / name)
    with open(cube / "mnist.py", "a") as f:
        f.write("# edited\n")
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()), server)
    command = [sys.executable, "-m", "nox", "-f", str(cube / "noxfile.py"), "-s", "run-docker", "--", "download",
               f"--workspace={ws}", "--network=host", *BASE]
    stale = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert stale.returncode == 0, stale.stdout[-3000:] + stale.stderr[-3000:]
    assert "building the image: changed since it was built: mnist.py" in stale.stderr
    fresh = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0 and "building the image" not in fresh.stderr
    edited = subprocess.run(["docker", "run", "--rm", "--entrypoint=tail", IMAGE, "-1", "/mlcube/mnist.py"],
                            capture_output=True, text=True).stdout
    assert edited == "# edited\n"


@needs_docker
def test_run_local_and_run_docker_train_the_same_bits(tmp_path, server, image):
    """Same seed, same data, same JAX on the same CPU: the same params.msgpack, in or out of Docker."""
    body = npz_bytes(make_digits())
    outputs = {}
    for runner, extra in (("run-local", []), ("run-docker", ["--network=host"])):
        ws = source_workspace(tmp_path / runner / "ws", body, server, train_epochs=2)
        result = nox("-s", runner, "--", "download", "train", f"--workspace={ws}", *extra)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        outputs[runner] = (json.loads((ws / "model" / "model.json").read_text()),
                           (ws / "model" / "params.msgpack").read_bytes())
    (local, local_params), (docker, docker_params) = outputs["run-local"], outputs["run-docker"]
    if local["versions"] != docker["versions"]:
        pytest.skip(f"JAX, Flax or Optax differ: {local['versions']} here, {docker['versions']} in the image")
    assert (local["config"], local["data_sha256"]) == (docker["config"], docker["data_sha256"])
    assert local_params == docker_params


@needs_docker
def test_run_docker_failing_task_propagates_its_code(tmp_path, server, image):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()), server, digest="e" * 64)
    result = nox("-s", "run-docker", "--", "download", "train", f"--workspace={ws}", "--network=host")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "SHA-256 mismatch" in result.stderr and "task download failed with exit code 1" in result.stderr
    assert not (ws / "data" / "mnist.npz").exists() and not (ws / "model").exists()
    assert containers() == []


@needs_docker
def test_run_docker_interrupted_leaves_no_container(tmp_path, image):
    ws = digits_workspace(tmp_path / "ws", 4096, 64, train_epochs=500, batch_size=32)
    command = [sys.executable, "-m", "nox", "-f", str(ROOT / "noxfile.py"), "-s", "run-docker", "--", "train",
               f"--workspace={ws}"]
    process = start_as_in_a_terminal(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not containers() and time.time() < deadline:
        time.sleep(0.5)
    assert containers(), "the container never started"
    time.sleep(3)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    out = process.communicate(timeout=60)[0].decode()
    assert process.returncode != 0, out[-3000:]
    assert containers() == []


@needs_docker
def test_failed_build_names_the_step(image):
    result = nox("-s", "configure-docker", "--", "--build-arg=BASE_IMAGE=mnist-no-such-base:0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert f"docker build of {IMAGE} failed at Step 2/" in line and ": FROM ${BASE_IMAGE}: " in line


@needs_docker
def test_no_permission_on_the_socket_is_one_clear_line(plain_user):
    if plain_user is None:
        pytest.skip("needs root, to run the session as a user outside the docker group")
    result = nox("-s", "run-docker", "--", "download", f"--workspace={plain_user}", user=plain_user,
                 docker_group=False, env={"HOME": str(plain_user)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no permission on the Docker daemon's socket: add yourself to the docker group" in result.stderr


def test_no_daemon_is_one_clear_line(tmp_path):
    result = nox("-s", "run-docker", "--", "download", f"--workspace={tmp_path}",
                 env={"DOCKER_HOST": f"unix://{tmp_path}/nothing.sock"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no Docker daemon answers: start it" in result.stderr


def test_help_lists_every_option():
    result = nox("-s", "run-local", "--", "--help")
    assert result.returncode == 0
    assert [line.split("=")[0].split()[0] for line in result.stdout.splitlines() if line.startswith("  --")] == [
        "--NAME", *(f"--{name}" for name in noxfile.OPTIONS)]
    with pytest.raises(noxfile.UsageError, match="unknown option '--dry-run=yes'"):
        noxfile.parse_args(["train", "--dry-run=yes"])  # a flag takes no value


def test_requirements_pin_what_the_suite_runs():
    """Every runtime dependency pinned (==) to the version this suite runs with: an image built later
    installs the same, and the pinned params digest (test_train) keeps meaning what it says."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line and line[0] != "#"]
    pins = dict(line.split("==") for line in lines)
    assert len(pins) == len(lines) and {"jax", "flax", "optax"} <= set(pins)
    assert pins == {name: version(name) for name in pins}


def test_a_relative_cache_variable_names_a_folder_not_a_docker_volume(tmp_path, monkeypatch):
    """Docker reads a --volume source without a slash as a named volume: the containers' cache folder
    is absolute, whatever the variable says."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(noxfile.CACHE_VARIABLE, "mycache")
    assert noxfile.container_cache() == str(tmp_path / "mycache") + "-containers"


def test_a_comma_in_a_variable_is_refused_under_singularity(tmp_path):
    """Apptainer's --env reads A=x,B=y as two variables: a value with a comma is refused in one line."""
    opts = noxfile.parse_args(["train", "--env=A=x,B=y", f"--workspace={tmp_path}"], "run-singularity")
    with pytest.raises(noxfile.UsageError, match="Singularity would split its value at ','"):
        noxfile.singularity_command(noxfile.resolve("train", opts), opts)
