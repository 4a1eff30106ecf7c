"""The Slurm runner on a real Slurm: a one-node cluster of this machine (Debian's slurm-wlm and munge,
which .ci/run installs), started for these tests and stopped after them. Download then train with two
processes, evaluate, a failing task, Ctrl-C, --dry-run and usage errors; the Apptainer route up to the
binary, through the Singularity STAND-IN (tests/standin/singularity), named so."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    digits_workspace,
    free_port,
    make_digits,
    nox,
    npz_bytes,
    source_workspace,
    start_as_in_a_terminal,
)

import noxfile

SETTINGS = """ClusterName=cube
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldPort={controller}
SlurmdPort={node}
ReturnToService=2
KillWait=10
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The cluster's variables (SLURM_CONF): munged with a key of its own, slurmctld and slurmd."""
    if os.geteuid() != 0 or not all(shutil.which(name) for name in ("munged", "slurmctld", "slurmd", "sbatch")):
        pytest.skip("needs root, and Debian's slurm-wlm and munge (.ci/run installs them)")
    folder = tmp_path_factory.mktemp("slurm")
    for name in ("state", "spool"):
        (folder / name).mkdir()
    subprocess.run(["mungekey", "-c", "-f", "-k", folder / "munge.key"], check=True, capture_output=True)
    subprocess.run(["munged", "--force", f"--socket={folder}/munge.socket", f"--key-file={folder}/munge.key",
                    f"--log-file={folder}/munged.log", f"--pid-file={folder}/munged.pid",
                    f"--seed-file={folder}/munged.seed"], check=True)
    conf = folder / "slurm.conf"
    conf.write_text(SETTINGS.format(host=socket.gethostname().split(".")[0], folder=folder, cpus=os.cpu_count(),
                                    controller=free_port(), node=free_port()))
    env = {"SLURM_CONF": str(conf)}
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon, "-f", conf], check=True, env={**os.environ, **env})
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                       env={**os.environ, **env}).stdout:
        assert time.time() < deadline, (folder / "slurmctld.log").read_text()[-2000:]
        time.sleep(0.5)
    yield env
    subprocess.run(["scontrol", "shutdown"], env={**os.environ, **env}, capture_output=True)
    subprocess.run(["munged", "--stop", f"--socket={folder}/munge.socket"], capture_output=True)


def queue(env) -> list[str]:
    """The jobs Slurm still holds, pending or running."""
    return subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True,
                          env={**os.environ, **env}).stdout.splitlines()


def run_slurm(*args, env):
    return nox("-s", "run-slurm", "--", *args, env=env)


def job_record(ws: Path, task: str, env) -> dict[str, str]:
    """What Slurm holds of the task's last job (`scontrol show job`), KEY=VALUE by key; the job's ID read
    from the name of its output file, TASK-JOBID.out."""
    [output] = (ws / "slurm").glob(f"{task}-*.out")
    shown = subprocess.run(["scontrol", "show", "job", "-o", output.stem.split("-")[-1]], capture_output=True,
                           text=True, env={**os.environ, **env}, check=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def test_download_then_train_on_two_processes_as_a_local_run_does(tmp_path, slurm):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits(2048, 256)), train_epochs=2, batch_size=64)
    result = run_slurm("download", "train", "--processes=2", f"--workspace={ws}", env=slurm)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[process 0/2] epoch 2/2" in result.stdout and "[process 1/2] epoch 2/2" in result.stdout
    summary = json.loads((ws / "model" / "model.json").read_text())
    alone = tmp_path / "alone"
    shutil.copytree(ws / "data", alone / "data")
    (alone / "train.yaml").write_text((ws / "train.yaml").read_text())
    local = nox("-s", "run-local", "--", "train", f"--workspace={alone}")
    assert local.returncode == 0, local.stderr[-3000:]
    one_process = json.loads((alone / "model" / "model.json").read_text())
    assert abs(summary["test_accuracy"] - one_process["test_accuracy"]) <= 0.005 and summary["epochs_run"] == 2
    assert sorted(p.name for p in (ws / "slurm").glob("*.sbatch")) == ["download.sbatch", "train.sbatch"]
    assert "#SBATCH --ntasks=2" in (ws / "slurm" / "train.sbatch").read_text()
    train_logs = [p.read_text().splitlines() for p in (ws / "logs").glob("*train*.log*")]  # process 0 alone writes:
    assert len(train_logs) == 1 and train_logs[0] and all("[process 0/2] " in line for line in train_logs[0])
    assert queue(slurm) == []
    evaluated = run_slurm("evaluate", f"--workspace={ws}", env=slurm)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    assert json.loads((ws / "logs" / "evaluate_metrics.json").read_text())["test_accuracy"] == summary["test_accuracy"]


def test_setup_lines_run_in_the_job_before_the_task(tmp_path, slurm):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    marker = tmp_path / "set up"
    result = run_slurm("download", f"--workspace={ws}", '--setup=echo "setup in job $SLURM_JOB_ID"',
                       f"--setup=touch {shlex.quote(str(marker))}", env=slurm)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job = job_record(ws, "download", slurm)["JobId"]
    assert marker.exists() and result.stdout.index(f"setup in job {job}\n") < result.stdout.index("started download")
    assert (ws / "data" / "mnist.npz").is_file()
    failed = run_slurm("download", f"--workspace={ws}", "--setup=false", env=slurm)
    assert failed.returncode == 1 and "started download" not in failed.stdout, failed.stdout[-3000:]


def test_cpus_per_task_reaches_the_job(tmp_path, slurm):
    if os.cpu_count() < 2:
        pytest.skip("the one-node cluster has one processor: 2 per task could not be given")
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    result = run_slurm("download", f"--workspace={ws}", "--cpus-per-task=2",
                       '--setup=echo "cpus per task: $SLURM_CPUS_PER_TASK"', env=slurm)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cpus per task: 2\n" in result.stdout and job_record(ws, "download", slurm)["CPUs/Task"] == "2"


def test_download_is_one_task_on_one_node_whatever_train_asks_for(tmp_path, slurm):
    """train's --processes, --nodes and --gpus are train's: download's job has one task on one node and no
    GPU (the one-node cluster has none, so a job that asked for one would be refused)."""
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    trains = ["--processes=2", "--nodes=1-2", "--gpus=1", "--gpus-per-task=1"]
    result = run_slurm("download", f"--workspace={ws}", *trains, env=slurm)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job = job_record(ws, "download", slurm)
    assert (job["NumNodes"], job["NumTasks"], job.get("TresPerJob"), job.get("TresPerTask")) == ("1", "1", None, None)
    planned = run_slurm("download", "train", f"--workspace={ws}", *trains, "--dry-run", env=slurm).stdout
    train = planned[planned.index("#SBATCH --job-name=mnist-train"):]
    for line in ("#SBATCH --ntasks=2", "#SBATCH --nodes=1-2", "#SBATCH --gpus=1", "#SBATCH --gpus-per-task=1"):
        assert line in train and line not in planned[:len(planned) - len(train)]


def test_each_sweep_worker_is_an_array_task_with_the_gpus_asked_for(tmp_path, slurm):
    """sweep --workers=2 --gpus=1: an array of two one-process tasks, each with the GPU asked for (a worker
    trains alone, so it is its own), where a one-process task such as download gets none."""
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    shutil.copy(ROOT / "workspace" / "sweep.yaml", ws / "sweep.yaml")
    planned = run_slurm("sweep", "--workers=2", "--gpus=1", f"--workspace={ws}", "--dry-run", env=slurm)
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    script = planned.stdout[planned.stdout.index("#SBATCH --job-name=mnist-sweep"):]
    for line in ("#SBATCH --array=0-1", "#SBATCH --ntasks=1", "#SBATCH --nodes=1", "#SBATCH --gpus=1"):
        assert line in script
    assert "JAX_PLATFORMS=cpu" not in script


def test_a_failing_task_ends_the_session_with_its_status_and_line(tmp_path, slurm):
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()), digest="d" * 64)
    result = run_slurm("download", "train", f"--workspace={ws}", env=slurm)
    assert result.returncode == 1 and "SHA-256 mismatch" in result.stdout
    assert "task download failed with exit code 1" in result.stderr and not (ws / "slurm" / "train.sbatch").exists()
    assert queue(slurm) == []


def test_ctrl_c_cancels_the_job_and_the_rerun_resumes(tmp_path, slurm):
    ws = digits_workspace(tmp_path / "ws", 8192, 256, train_epochs=40, batch_size=32)  # long enough to stop
    command = [os.sys.executable, "-m", "nox", "-f", str(ROOT / "noxfile.py"), "-s", "run-slurm", "--", "train",
               f"--workspace={ws}"]
    session = start_as_in_a_terminal(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **slurm})
    metrics = ws / "logs" / "train_metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().strip()) and session.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    assert session.poll() is None, "train ended before it could be stopped"
    session.send_signal(signal.SIGINT)
    output = session.communicate(timeout=120)[0]
    assert session.returncode != 0, output[-3000:]
    deadline = time.time() + 60
    while queue(slurm) and time.time() < deadline:
        time.sleep(0.5)
    assert queue(slurm) == []  # scancel'd: nothing left behind
    again = run_slurm("train", f"--workspace={ws}", env=slurm)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stdout[-3000:]


def test_dry_run_prints_the_script_that_sbatch_accepts(tmp_path, slurm):
    options = ["--processes=2", "--time=10:00", "--sbatch=--comment=cube", "--env=X=1"]
    result = run_slurm("train", f"--workspace={tmp_path}", *options, "--dry-run", env=slurm)
    assert result.returncode == 0, result.stderr
    script = result.stdout[result.stdout.index("#!/bin/bash"):]
    for line in ("#SBATCH --ntasks=2", "#SBATCH --time=10:00", "#SBATCH --comment=cube", "export X=1",
                 "export JAX_PLATFORMS=cpu", f"{ROOT / 'mnist.py'} train --data_dir={tmp_path / 'data'}"):
        assert line in script
    (tmp_path / "train.sbatch").write_text(script)
    accepted = subprocess.run(["sbatch", "--test-only", tmp_path / "train.sbatch"], capture_output=True, text=True,
                              env={**os.environ, **slurm})
    assert accepted.returncode == 0, accepted.stderr
    assert queue(slurm) == []


@pytest.mark.parametrize("option, message", [
    ("--gpus=all", "run-slurm takes --gpus=N, a number of GPUs, not 'all'"),
    ("--container=docker", "--container expects apptainer or singularity, got 'docker'"),
    ("--pvc=x", "--pvc is an option of run-k8s, not of run-slurm"),
    ("--partition=gpu\ntouch /tmp/x", "--partition expects partition names such as gpu or gpu,cpu, got 'gpu\\ntouch"),
    ("--account=acct --output=/root/.bashrc", "--account expects an account name such as proj-42, got 'acct --output"),
    ("--time=10:00 --output=/root/.bashrc", "--time expects a time such as 30, 30:00, 4:00:00 or 1-12:00, got"),
    ("--env=A;id>/tmp/y;B=1", "--env expects NAME=VALUE, NAME of letters, digits and _ (not first a digit), got"),
    ("--sbatch=--output=/root/.bashrc", "--sbatch '--output=/root/.bashrc' would set --output, which run-slurm sets"),
    ("--sbatch=--part=debug", "--sbatch '--part=debug' would set --partition, which run-slurm sets itself: use its"),
    ("--sbatch=--mem=8G --output=/root/.bashrc", "--sbatch expects one option such as --mem=8G"),
    ("--sbatch=-o/root/.bashrc", "--sbatch expects one option such as --mem=8G"),
    ("--data_dir=/data/%u", "run-slurm takes no path with a control character or '%' (a Slurm file name pattern)"),
    ("--setup=module load cuda\ntouch /tmp/x", "--setup expects one shell line such as 'module load cuda/12' (no "
                                                "newline or other control character), got 'module load cuda\\ntouch"),
    ("--setup=true\rtouch /tmp/x", "--setup expects one shell line such as 'module load cuda/12'"),
    ("--setup= ", "--setup expects one shell line such as 'module load cuda/12'"),
    ("--cpus-per-task=0", "--cpus-per-task expects a number of processors such as 4, got '0'"),
    ("--gpus-per-task=all", "--gpus-per-task expects a number of GPUs such as 1, got 'all'"),
    ("--sbatch=--cpus-per-task=4", "would set --cpus-per-task, which run-slurm sets itself: use its --cpus-per-task"),
])
def test_usage_errors_are_one_line(tmp_path, option, message):
    result = nox("-s", "run-slurm", "--", "train", f"--workspace={tmp_path}", option, "--dry-run")
    aborted = [line for line in result.stderr.splitlines() if "run-slurm aborted: " in line]
    assert result.returncode == 1 and len(aborted) == 1 and message in aborted[0], result.stderr
    assert "Traceback" not in result.stderr and "#!/bin/bash" not in result.stdout


STUBS = """#!/bin/sh
# STAND-IN for srun: the script's command is not run, only the script around it
exit 0
"""


@pytest.mark.parametrize("attack", [
    ["--partition=gpu\ntouch {marker}"],
    ["--env=A;touch {marker};B=1"],
    ["--account=acct\ntouch {marker}"],
    ["--time=10\ntouch {marker}"],
    ["--sbatch=--comment=x\ntouch {marker}"],
    ["--workspace={tmp}/ws\ntouch {marker}\n"],
    ["--setup=true\ntouch {marker}"],
    ["--setup=true\x00touch {marker}"],
])
def test_an_attackers_value_never_runs_as_a_command(tmp_path, attack):
    """The reviewer's attack: the batch script run-slurm makes of these values, run by bash with a
    STAND-IN srun on PATH; the runner refuses each one first, so the marker never appears."""
    marker, stub = tmp_path / "marker", tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text(STUBS)
    stub.chmod(0o755)
    args = [arg.format(marker=marker, tmp=tmp_path) for arg in attack]
    try:
        opts = noxfile.parse_args(["train", f"--workspace={tmp_path / 'ws'}", *args], "run-slurm")
        script = noxfile.slurm_script(noxfile.resolve("train", opts), opts, Path(sys.executable))
    except noxfile.UsageError as refused:
        assert "\n" not in str(refused)
        script = None
    if script is not None:  # what the attack did before the runner refused it
        (tmp_path / "train.sbatch").write_text(script)
        subprocess.run(["bash", tmp_path / "train.sbatch"], env={**os.environ, "PATH": f"{stub.parent}:/usr/bin:/bin"},
                       capture_output=True)
    assert not marker.exists()
    assert script is None


def test_values_that_fit_their_fields_pass(tmp_path):
    opts = noxfile.parse_args(["train", f"--workspace={tmp_path}", "--partition=gpu,debug", "--account=proj-4.2",
                               "--time=1-12:00:00", "--nodes=1-2", "--sbatch=--mem=8G", "--sbatch=--exclusive",
                               "--env=XLA_FLAGS=--xla_dump_to=/tmp a b", "--env=_X=it's"], "run-slurm")
    script = noxfile.slurm_script(noxfile.resolve("train", opts), opts, Path(sys.executable))
    for line in ("#SBATCH --partition=gpu,debug", "#SBATCH --account=proj-4.2", "#SBATCH --time=1-12:00:00",
                 "#SBATCH --mem=8G", "#SBATCH --exclusive", "export XLA_FLAGS='--xla_dump_to=/tmp a b'",
                 "export _X='it'\"'\"'s'"):
        assert line in script.splitlines()


def test_the_script_replaces_a_symlink_at_its_path_never_writes_through_it(tmp_path, monkeypatch):
    """A symbolic link planted at workspace/slurm/train.sbatch, pointing at a file elsewhere: the
    runner puts its script in the link's place; the file it pointed at is as it was. A STAND-IN sbatch
    refuses the job: the script is what is checked here."""
    ws, elsewhere = tmp_path / "ws", tmp_path / "elsewhere"
    (ws / "slurm").mkdir(parents=True)
    elsewhere.write_text("the user's own file\n")
    (ws / "slurm" / "train.sbatch").symlink_to(elsewhere)
    stub = tmp_path / "bin" / "sbatch"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    opts = noxfile.parse_args(["train", f"--workspace={ws}"], "run-slurm")
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    assert noxfile.slurm_execute(noxfile.resolve("train", opts), opts, Path(sys.executable)) == 1
    script = ws / "slurm" / "train.sbatch"
    assert not script.is_symlink() and script.read_text().startswith("#!/bin/bash\n")
    assert elsewhere.read_text() == "the user's own file\n"
    assert sorted(os.listdir(ws / "slurm")) == ["train.sbatch"]  # no temporary file left


def test_standin_container_route_runs_the_image_with_run_singularitys_confinement(tmp_path, slurm):
    """STAND-IN for Apptainer (tests/standin/singularity): the image is built on the login node, and the
    job runs it with run-singularity's binds and options; Slurm is real."""
    log = tmp_path / "standin.log"
    log.touch()
    env = {**slurm, "PATH": f"{ROOT / 'tests' / 'standin'}:{os.environ['PATH']}", "STANDIN_LOG": str(log),
           "MNIST_COMPILATION_CACHE": "off"}
    ws = digits_workspace(tmp_path / "ws")
    result = run_slurm("train", "--container=singularity", f"--workspace={ws}", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    recorded = [json.loads(line) for line in log.read_text().splitlines() if "--version" not in line]
    assert [command[1] for command in recorded] == ["build", "run"]
    dry = nox("-s", "run-singularity", "--", "train", f"--workspace={ws}", "--dry-run", env=env)
    up_to_date, command = dry.stdout.splitlines()  # the image's plan first, as a '#' line
    assert up_to_date.endswith(" is up to date: nothing to build")
    assert "srun " + command in (ws / "slurm" / "train.sbatch").read_text()
    assert json.loads((ws / "model" / "model.json").read_text())["epochs_run"] == 1
    assert Path(ws / ".image").is_dir()


def test_standin_dry_run_shows_the_image_build_then_every_script_in_full(tmp_path, slurm):
    """The container route's --dry-run, with the Singularity STAND-IN (tests/standin/singularity) on PATH:
    the image's build command, the very one a build then runs, and each task's script as run-slurm
    writes it; once the image is built, no build. Slurm is real: sbatch takes each script."""
    log = tmp_path / "standin.log"
    log.touch()
    env = {**slurm, "PATH": f"{ROOT / 'tests' / 'standin'}:{os.environ['PATH']}", "STANDIN_LOG": str(log)}
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    options = [f"--workspace={ws}", "--container=singularity", "--setup=ulimit -c 0", "--cpus-per-task=1"]
    planned = run_slurm("download", "train", *options, "--dry-run", env=env)
    assert planned.returncode == 0, planned.stderr
    first, build = planned.stdout.split("\n")[:2]
    assert first == "# building the image first: there is no image yet" and not (ws / ".image").exists()
    assert nox("-s", "configure-singularity", "--", f"--workspace={ws}", env=env).returncode == 0
    [built] = [json.loads(line) for line in log.read_text().splitlines() if '"build"' in line]
    assert shlex.split(build) == built
    planned = run_slurm("download", "train", *options, "--dry-run", env=env).stdout
    assert planned.startswith(f"# {ws / '.image' / noxfile.CUBE['singularity']['image']} is up to date")
    scripts = ["#!/bin/bash" + text for text in planned.split("#!/bin/bash")[1:]]
    assert [script.count("\nulimit -c 0\n") for script in scripts] == [1, 1]
    for task, script in zip(["download", "train"], scripts, strict=True):
        (tmp_path / f"{task}.sbatch").write_text(script)
        accepted = subprocess.run(["sbatch", "--test-only", tmp_path / f"{task}.sbatch"], capture_output=True,
                                  text=True, env={**os.environ, **env})
        assert accepted.returncode == 0, accepted.stderr
    ran = run_slurm("download", *options, env=env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert (ws / "slurm" / "download.sbatch").read_text() + "\n" == scripts[0]
