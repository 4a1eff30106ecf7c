"""The sweep task on real MNIST subsets: workers that share one study finish exactly its trials, none
trained twice; a worker killed with SIGKILL loses only its trial, marked FAIL and retried by the next;
best.yaml trains; the validation images come from the training images alone; bad sweep configs are
one line. Small data and few epochs, so that the file runs in minutes on two cores."""
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import ROOT, finish, needs_docker, nox, start_mnist, write_config
from test_k8s import faults, manifests  # noqa: F401 (the Kubernetes schemas, a fixture)
from test_slurm import slurm  # noqa: F401 (the real one-node Slurm, a fixture)

import mnist
import noxfile

SWEEP = {"trials": 4, "validation_fraction": 0.1,
         "train": {"optimizer": ["adam", "momentum"], "learning_rate": {"low": 1.0e-3, "high": 1.0e-1, "log": True},
                   "batch_size": [32, 64], "train_epochs": 2}}


def sweep_workspace(ws: Path, real_data: Path, config: dict | str = SWEEP) -> Path:
    """A workspace for sweep: the first 1,200 real training images and 300 test images in data/mnist.npz,
    and sweep.yaml."""
    real = np.load(real_data / "mnist.npz")
    (ws / "data").mkdir(parents=True)
    np.savez(ws / "data" / "mnist.npz", x_train=real["x_train"][:1200], y_train=real["y_train"][:1200],
             x_test=real["x_test"][:300], y_test=real["y_test"][:300])
    write_config(ws / "sweep.yaml", config)
    return ws


def start_sweep(ws: Path) -> subprocess.Popen:
    return start_mnist("sweep", f"--sweep_config={ws / 'sweep.yaml'}", f"--data_dir={ws / 'data'}",
                       f"--sweep_dir={ws / 'sweep'}", f"--log_dir={ws / 'logs'}")


def study_of(ws: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(ws / "sweep" / mnist.JOURNAL_NAME), mnist.WaitingLock(str(ws / "sweep" / ".journal.lock"))))
    return optuna.load_study(study_name="sweep", storage=storage)


def trained_by(out: str) -> list[int]:
    """The trials that a worker's output says it finished."""
    return [int(line.split()[1].rstrip(":")) for line in out.splitlines()
            if line.startswith("trial ") and (": COMPLETE" in line or ": PRUNED" in line)]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """A sweep of SWEEP's 4 trials by two workers started at once on one sweep_dir."""
    real_data = os.environ.get("MNIST_DATA_DIR")
    if not real_data or not (Path(real_data) / "mnist.npz").is_file():
        pytest.skip("real MNIST not found: set MNIST_DATA_DIR to a folder with mnist.npz")
    ws = sweep_workspace(tmp_path_factory.mktemp("sweep") / "ws", Path(real_data))
    workers = [start_sweep(ws) for _ in range(2)]
    return ws, [finish(worker) for worker in workers]


def test_two_workers_at_once_finish_exactly_the_trials_none_twice(two_workers):
    ws, results = two_workers
    assert [r.code for r in results] == [0, 0], [r.err for r in results]
    trained = sorted(trained_by(results[0].out) + trained_by(results[1].out))
    assert trained == [0, 1, 2, 3]
    assert all(trained_by(r.out) for r in results), "each worker trains a share"
    states = [t.state.name for t in study_of(ws).trials]
    assert len(states) == 4 and set(states) <= {"COMPLETE", "PRUNED"}


def test_results_are_a_table_best_yaml_labelled_test_accuracy_and_pictures(two_workers):
    ws, _ = two_workers
    with open(ws / "sweep" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["number"] for row in rows] == ["0", "1", "2", "3"]
    assert set(rows[0]) == {"number", "state", "optimizer", "learning_rate", "batch_size", "validation_accuracy_1",
                            "validation_accuracy_2", "validation_accuracy", "seconds"}
    best = max((row for row in rows if row["state"] == "COMPLETE"), key=lambda row: float(row["validation_accuracy"]))
    summary = yaml.safe_load((ws / "sweep" / "sweep.json").read_text())
    assert summary["best_trial"] == int(best["number"]) and 0.5 < summary["test_accuracy"] <= 1
    header = (ws / "sweep" / "best.yaml").read_text().splitlines()[0]
    assert f"test accuracy {summary['test_accuracy']:.4f}, measured once, after the sweep chose it" in header
    for name in mnist.PLOTS:
        assert (ws / "sweep" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert not list((ws / "sweep").glob("*.part")) and not list((ws / "sweep").glob(".*.part"))


def test_best_yaml_trains_as_it_is(two_workers):
    ws, _ = two_workers
    train = finish(start_mnist("train", f"--train_config={ws / 'sweep' / 'best.yaml'}", f"--data_dir={ws / 'data'}",
                               f"--model_dir={ws / 'model'}", f"--log_dir={ws / 'train-logs'}"))
    assert train.code == 0, train.err
    chosen = yaml.safe_load((ws / "sweep" / "best.yaml").read_text())
    config = yaml.safe_load((ws / "model" / "model.json").read_text())["config"]
    assert {key: config[key] for key in chosen} == chosen


def test_worker_killed_mid_trial_loses_only_it_and_a_rerun_retries_it(real_data, tmp_path):
    """SIGKILL while trial 1 runs (its part file is there); the rerun finds its lock free, marks it FAIL,
    trains its parameters again (those it had drawn before the kill), and finishes exactly `trials`."""
    ws = sweep_workspace(tmp_path / "ws", real_data, {**SWEEP, "trials": 3})
    worker = start_sweep(ws)
    deadline = time.monotonic() + 120
    while not list((ws / "sweep").glob(".trial-1.*.part")) and time.monotonic() < deadline:
        time.sleep(0.05)
    while len(study_of(ws).trials) < 2 or not study_of(ws).trials[1].params:  # drawn: it trains
        assert time.monotonic() < deadline, "trial 1 never drew its parameters"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert list((ws / "sweep").glob(".trial-1.*.part")), "killed while trial 1 ran"
    rerun = finish(start_sweep(ws))
    assert rerun.code == 0, rerun.err
    assert "trial 1: its worker is gone; marked FAIL, its parameters queued again" in rerun.out
    trials = study_of(ws).trials
    assert trials[1].state.name == "FAIL" and trials[1].params
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    retried = [t for t in finished if t.number > 1 and trials[1].params.items() <= t.params.items()]
    assert len(finished) == 3 and retried, "the killed trial's parameters (those it had drawn) trained again"
    assert not list((ws / "sweep").glob(".*.part"))


def test_validation_images_are_training_images_never_test_images(real_data):
    """The split reads x_train and y_train alone (no test array is even given), is the same each time,
    and parts the training images in two."""
    real = np.load(real_data / "mnist.npz")
    train = {"x_train": real["x_train"][:1000], "y_train": real["y_train"][:1000]}
    parts = mnist.validation_split(train, 0.1, "sweep.yaml")
    again = mnist.validation_split(train, 0.1, "sweep.yaml")
    assert all(np.array_equal(parts[key], again[key]) for key in parts)
    assert len(parts["x_test"]) == 100 and len(parts["x_train"]) == 900
    rows = {image.tobytes(): i for i, image in enumerate(train["x_train"])}
    held = [rows[image.tobytes()] for image in parts["x_test"]]
    kept = [rows[image.tobytes()] for image in parts["x_train"]]
    assert sorted(held + kept) == list(range(1000))
    assert np.array_equal(parts["y_test"], train["y_train"][held])


def test_optuna_is_imported_by_the_sweep_task_alone():
    loaded = subprocess.run([sys.executable, "-c", "import sys, mnist; print('optuna' in sys.modules)"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"


def changed(**changes) -> dict:
    return {**SWEEP, **changes}


def changed_train(**changes) -> dict:
    return {**SWEEP, "train": {**SWEEP["train"], **changes}}


BAD = [
    ("no trials", {"train": SWEEP["train"]}, "missing key 'trials'"),
    ("zero trials", changed(trials=0), "trials must be an integer in 1..10000, got 0"),
    ("trials as text", changed(trials="24"), "trials must be an integer in 1..10000, got '24'"),
    ("fraction of one", changed(validation_fraction=1), "validation_fraction must be a number between 0 and 1"),
    ("fraction leaving nothing", changed(validation_fraction=0.9999),
     "validation_fraction 0.9999 leaves none of the 1200 training images to train on"),
    ("misspelt key", changed_train(seeds=3), "train: unknown key 'seeds'; did you mean 'seed'?"),
    ("unknown optimizer among the choices", changed_train(optimizer=["adam", "adamx"]), "unknown optimizer 'adamx'"),
    ("empty choice", changed_train(batch_size=[]), "train: batch_size: a list is a choice of one value or more"),
    ("range upside down", changed_train(learning_rate={"low": 0.1, "high": 0.01}),
     "train: learning_rate: low and high must be numbers, low below high, got 0.1 and 0.01"),
    ("log range from zero", changed_train(learning_rate={"low": 0, "high": 0.1, "log": True}),
     "train: learning_rate: log must be true or false, and true only for a positive low"),
    ("misspelt range key", changed_train(learning_rate={"low": 0.001, "hi": 0.1}),
     "train: learning_rate: unknown key 'hi'; did you mean 'high'?"),
    ("fractional batch range", changed_train(batch_size={"low": 16.5, "high": 64}),
     "train: batch_size must be an integer, got 16.5"),
    ("negative end of a range", changed_train(train_epochs={"low": -1, "high": 3}),
     "train: train_epochs must be positive, got -1"),
    ("batch larger than the training part", changed_train(batch_size=[32, 1100]),
     "train: batch_size 1100 is larger than the 1080 training images"),
    ("required key missing", {**SWEEP, "train": {"batch_size": 32, "train_epochs": 1}}, "missing key 'optimizer'"),
]


@pytest.mark.parametrize("name, config, fragment", BAD, ids=[case[0] for case in BAD])
def test_bad_sweep_config_is_one_line_and_writes_nothing(real_data, tmp_path, capsys, name, config, fragment):
    ws = sweep_workspace(tmp_path / "ws", real_data, config)
    code = mnist.main(["sweep", f"--sweep_config={ws / 'sweep.yaml'}", f"--data_dir={ws / 'data'}",
                       f"--sweep_dir={ws / 'sweep'}", f"--log_dir={ws / 'logs'}"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"mnist.py sweep: error: {ws / 'sweep.yaml'}: ") and fragment in err
    assert len(err.splitlines()) == 1
    assert not (ws / "sweep").exists()


def test_run_local_workers_share_one_sweep(real_data, tmp_path):
    """`nox -s run-local -- sweep --workers=2`: two processes on the workspace's sweep/, each a share."""
    ws = sweep_workspace(tmp_path / "ws", real_data, {**SWEEP, "trials": 3})
    result = nox("-s", "run-local", "--", "sweep", "--workers=2", f"--workspace={ws}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("started sweep") == 2
    assert sorted(trained_by(result.stdout)) == [0, 1, 2]
    assert (ws / "sweep" / "best.yaml").is_file()


def test_slurm_array_of_two_workers_shares_one_sweep(real_data, tmp_path, slurm):  # noqa: F811
    """`nox -s run-slurm -- sweep --workers=2` on a real Slurm: a job array of two tasks, one worker each,
    their lines appended to one output that the session prints."""
    ws = sweep_workspace(tmp_path / "ws", real_data, {**SWEEP, "trials": 3})
    result = nox("-s", "run-slurm", "--", "sweep", "--workers=2", f"--workspace={ws}", env=slurm)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "#SBATCH --array=0-1" in (ws / "slurm" / "sweep.sbatch").read_text()
    assert result.stdout.count("started sweep") == 2
    assert sorted(trained_by(result.stdout)) == [0, 1, 2]
    assert len(study_of(ws).trials) == 3 and (ws / "sweep" / "best.yaml").is_file()


def test_k8s_sweep_is_an_indexed_job_of_independent_workers_valid_kubernetes(faults):  # noqa: F811
    """run-k8s -- sweep --workers=3 up to the cluster, which cannot run here (a schema check, STAND-IN for a
    cluster): one Indexed Job of 3 pods at once on a ReadWriteMany claim, with no network and no coordinator."""
    docs = manifests("sweep", "--workers=3", "--create-pvc")
    claim, policy, job = ({doc["kind"]: doc for doc in docs}[kind] for kind in ("PersistentVolumeClaim",
                                                                                "NetworkPolicy", "Job"))
    assert faults(docs) == [""] * len(docs)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert {key: job["spec"][key] for key in ("completionMode", "completions", "parallelism")} == {
        "completionMode": "Indexed", "completions": 3, "parallelism": 3}
    assert policy["spec"]["ingress"] == [] and policy["spec"]["egress"] == []
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert not {"JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID"} & {v["name"] for v in container["env"]}


@needs_docker
def test_run_docker_sweep_in_the_image(real_data, tmp_path, image):
    """`nox -s run-docker -- sweep`: the image carries Optuna, and the sweep writes as the caller."""
    ws = sweep_workspace(tmp_path / "ws", real_data, {**SWEEP, "trials": 2})
    result = nox("-s", "run-docker", "--", "sweep", f"--workspace={ws}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(trained_by(result.stdout)) == [0, 1]
    assert (ws / "sweep" / "best.yaml").stat().st_uid == os.getuid()


def test_workers_apply_to_sweep_alone():
    with pytest.raises(noxfile.UsageError, match="--workers applies to sweep only, not train"):
        noxfile.parse_args(["train", "--workers=2"], "run-local")
    with pytest.raises(noxfile.UsageError, match="--workers is an option of run-local and run-slurm and run-k8s"):
        noxfile.parse_args(["sweep", "--workers=2"], "run-docker")


def test_a_trial_is_trains_own_run_repeatable_to_the_bit(two_workers):
    """The best trial's settings, trained again through train's code path on the same training part,
    score the same validation accuracy as the trial did: what makes its test accuracy (measured on
    such a rerun) the trial's own."""
    ws, _ = two_workers
    arrays, _, _ = mnist.load_data_dir(str(ws / "data"))
    parts = mnist.validation_split(arrays, SWEEP["validation_fraction"], "sweep.yaml")
    chosen = yaml.safe_load((ws / "sweep" / "best.yaml").read_text())
    config = mnist.train_config(chosen, "best.yaml")
    log = mnist.open_log(None, "sweep")
    again = mnist.train_part(config, parts, mnist.spec_of(arrays), log)
    summary = yaml.safe_load((ws / "sweep" / "sweep.json").read_text())
    assert again == summary["validation_accuracy"]


def run_sweep(ws: Path) -> int:
    return mnist.main(["sweep", f"--sweep_config={ws / 'sweep.yaml'}", f"--data_dir={ws / 'data'}",
                       f"--sweep_dir={ws / 'sweep'}", f"--log_dir={ws / 'logs'}"])


ONE_EPOCH = {**SWEEP, "trials": 1, "train": {**SWEEP["train"], "train_epochs": 1, "batch_size": 64}}


@pytest.mark.parametrize("planted", ["link", "fifo", "damaged"])
def test_a_journal_that_is_a_link_a_fifo_or_not_a_journal_is_one_line(real_data, tmp_path, capsys, planted):
    """Optuna opens the journal as it finds it: a link there would have the sweep append to where it points,
    a FIFO would hold it for ever, and a line that is not JSON is a traceback; each is one line instead."""
    ws = sweep_workspace(tmp_path / "ws", real_data, ONE_EPOCH)
    (ws / "sweep").mkdir()
    journal, victim = ws / "sweep" / mnist.JOURNAL_NAME, tmp_path / "victim.txt"
    victim.write_text("the user's\n")
    {"link": lambda: journal.symlink_to(victim), "fifo": lambda: os.mkfifo(journal),
     "damaged": lambda: journal.write_text("x\n")}[planted]()
    assert run_sweep(ws) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"mnist.py sweep: error: {journal}: "), err
    assert victim.read_text() == "the user's\n"


def test_a_checkpoint_in_sweep_dir_plays_no_part(real_data, tmp_path):
    """A trial keeps no checkpoint and reads none: a file named as train's checkpoint in sweep_dir (a
    model_dir given as sweep_dir, or one planted) is neither resumed nor named."""
    ws = sweep_workspace(tmp_path / "ws", real_data, ONE_EPOCH)
    (ws / "sweep").mkdir()
    (ws / "sweep" / mnist.CHECKPOINT_NAME).write_bytes(b"junk")
    assert run_sweep(ws) == 0
    assert [t.state.name for t in study_of(ws).trials] == ["COMPLETE"]
    assert (ws / "sweep" / mnist.CHECKPOINT_NAME).read_bytes() == b"junk"


def test_a_rerun_with_more_trials_measures_the_best_again(real_data, tmp_path):
    """sweep.json, best.yaml's test accuracy and the pictures follow the study: raising `trials` and running
    again finishes again, over every trial."""
    ws = sweep_workspace(tmp_path / "ws", real_data, ONE_EPOCH)
    assert run_sweep(ws) == 0
    write_config(ws / "sweep.yaml", {**ONE_EPOCH, "trials": 2})
    assert run_sweep(ws) == 0
    told = json.loads((ws / "sweep" / "sweep.json").read_text())
    assert told["trials"] == 2 and told["best_trial"] == study_of(ws).best_trial.number


def test_a_retried_trial_whose_worker_dies_again_is_not_queued_a_third_time(tmp_path, caplog):
    """A trial's settings are tried twice at most: a retry whose worker is gone too is marked FAIL alone."""
    (tmp_path / "sweep").mkdir()
    study = mnist.open_study(str(tmp_path / "sweep" / mnist.JOURNAL_NAME))
    study.enqueue_trial({"x": 1.0}, user_attrs={"retry_of": 0})
    trial = study.ask()  # the retry, its worker gone: no part file holds it
    trial.suggest_float("x", 0.0, 2.0)
    trial.set_user_attr("lock", ".trial-1.mnist-1-00000000.part")
    claims = mnist.WaitingLock(str(tmp_path / "sweep" / mnist.LOCK_NAME))
    log = logging.getLogger("sweep-test")
    new, held = mnist.claim_trial(study, 1, claims, str(tmp_path / "sweep"), log)
    held.close()
    assert study.get_trials(deepcopy=False)[0].state.name == "FAIL"
    assert "retry_of" not in new.user_attrs and "WAITING" not in [t.state.name for t in study.get_trials()]
