"""Checkpoints: a run killed at any moment resumes to the very same parameters; signals stop cleanly."""
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, create_state, make_digits, npz_bytes

import mnist

CONFIG = {"optimizer": "adam", "train_epochs": 4, "batch_size": 32, "seed": 5}


@pytest.fixture
def cube(tmp_path):
    """Enough learnable data for an epoch to last about a second, so a signal lands mid-epoch."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.npz").write_bytes(npz_bytes(make_digits(8192, 256)))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(CONFIG))
    return tmp_path


def command(cube, model="model"):
    return [sys.executable, str(ROOT / "mnist.py"), "train", f"--train_config={cube / 'train.yaml'}",
            f"--data_dir={cube / 'data'}", f"--model_dir={cube / model}", f"--log_dir={cube / 'logs' / model}"]


def start_and_signal(cube, model, signum, after_epochs):
    """Start train, wait until `after_epochs` epochs are saved, then send `signum`."""
    process = subprocess.Popen(command(cube, model), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cube / "logs" / model / "train_metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_epochs:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


@pytest.fixture
def uninterrupted(cube):
    result = subprocess.run(command(cube, "whole"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not (cube / "whole" / mnist.CHECKPOINT_NAME).exists()
    return (cube / "whole" / "params.msgpack").read_bytes(), json.loads((cube / "whole" / "model.json").read_text())


def test_sigkill_mid_epoch_then_resume_gives_identical_params(cube, uninterrupted):
    code, out, err = start_and_signal(cube, "killed", signal.SIGKILL, after_epochs=2)
    assert code == -signal.SIGKILL
    assert (cube / "killed" / mnist.CHECKPOINT_NAME).exists() and not (cube / "killed" / "params.msgpack").exists()
    result = subprocess.run(command(cube, "killed"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "after epoch " in result.stdout
    assert (cube / "killed" / "params.msgpack").read_bytes() == uninterrupted[0]  # bit for bit
    summary = json.loads((cube / "killed" / "model.json").read_text())
    assert summary["epochs_run"] == 4 and summary["test_accuracy"] == uninterrupted[1]["test_accuracy"]
    metrics = [json.loads(line) for line in (cube / "logs" / "killed" / "train_metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert not (cube / "killed" / mnist.CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_and_say_how_to_resume(cube, uninterrupted, signum):
    code, out, err = start_and_signal(cube, "stopped", signum, after_epochs=1)
    assert code == 128 + signum and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mnist.py train: stopped in epoch ") and "run the same command again to resume" in line
    result = subprocess.run(command(cube, "stopped"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (cube / "stopped" / "params.msgpack").read_bytes() == uninterrupted[0]


def test_checkpoint_of_another_run_is_refused(cube, capsys):
    (cube / "model").mkdir()
    state = create_state({**CONFIG, "learning_rate": 1e-3}, 10)
    other = {"architecture": mnist.ARCHITECTURE, "config": {**CONFIG, "seed": 6}, "data_sha256": "0" * 64}
    mnist.save_checkpoint(str(cube / "model" / mnist.CHECKPOINT_NAME), other, state, [])
    code = mnist.main(command(cube)[2:])
    err = capsys.readouterr().err
    assert code == 1 and "a checkpoint of another run (its config differs); delete" in err
    (cube / "model" / mnist.CHECKPOINT_NAME).write_bytes(b"\x00broken")
    assert mnist.main(command(cube)[2:]) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err
