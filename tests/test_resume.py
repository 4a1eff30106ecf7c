"""Checkpoints: a run killed at any moment resumes to the very same parameters; signals stop cleanly."""
import json
import signal
import time

import pytest
from conftest import as_in_a_terminal, create_state, digits_workspace, finish, run_task, start_train

import mnist

CONFIG = {"optimizer": "adam", "train_epochs": 4, "batch_size": 32, "seed": 5}


def slow_workspace(folder):
    """Enough learnable data for an epoch to last about a second, so a signal lands mid-epoch."""
    return digits_workspace(folder, 8192, 256, **CONFIG)


@pytest.fixture
def slow_ws(tmp_path):
    return slow_workspace(tmp_path)


def start_and_signal(ws, model, signum, after_epochs):
    """Start train as in a terminal, wait until `after_epochs` epochs are saved, then send `signum`."""
    with as_in_a_terminal():
        process = start_train(ws, model)
    metrics = ws / "logs" / model / "train_metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_epochs:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    process.send_signal(signum)
    return finish(process, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The params and model.json of a run of slow_ws's data and config that nothing stopped, made once
    for every test that compares a stopped and resumed run with it."""
    ws = slow_workspace(tmp_path_factory.mktemp("uninterrupted"))
    result = finish(start_train(ws, "whole"))
    assert result.code == 0, result.err
    assert not (ws / "whole" / mnist.CHECKPOINT_NAME).exists()
    whole = ws / "whole"
    return (whole / "params.msgpack").read_bytes(), json.loads((whole / "model.json").read_text())


def test_sigkill_mid_epoch_then_resume_gives_identical_params(slow_ws, uninterrupted):
    code, out, err = start_and_signal(slow_ws, "killed", signal.SIGKILL, after_epochs=2)
    assert code == -signal.SIGKILL
    killed = slow_ws / "killed"
    assert (killed / mnist.CHECKPOINT_NAME).exists() and not (killed / "params.msgpack").exists()
    result = finish(start_train(slow_ws, "killed"))
    assert result.code == 0, result.err
    assert "resumed from" in result.out and "after epoch " in result.out
    assert (slow_ws / "killed" / "params.msgpack").read_bytes() == uninterrupted[0]  # bit for bit
    summary = json.loads((slow_ws / "killed" / "model.json").read_text())
    assert summary["epochs_run"] == 4 and summary["test_accuracy"] == uninterrupted[1]["test_accuracy"]
    metrics = [json.loads(line) for line in (slow_ws / "logs" / "killed" / "train_metrics.jsonl").open()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert not (slow_ws / "killed" / mnist.CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_and_say_how_to_resume(slow_ws, uninterrupted, signum):
    code, out, err = start_and_signal(slow_ws, "stopped", signum, after_epochs=1)
    assert code == 128 + signum and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mnist.py train: stopped in epoch ") and "run the same command again to resume" in line
    result = finish(start_train(slow_ws, "stopped"))
    assert result.code == 0, result.err
    assert (slow_ws / "stopped" / "params.msgpack").read_bytes() == uninterrupted[0]


def test_checkpoint_of_another_run_is_refused(slow_ws, capsys):
    (slow_ws / "model").mkdir()
    state = create_state({**CONFIG, "learning_rate": 1e-3}, 10)
    other = {"architecture": mnist.architecture(mnist.Spec((28, 28), 10, 255)), "input_shape": [28, 28],
             "classes": 10, "pixel_max": 255,
             "config": {**CONFIG, "seed": 6}, "data_sha256": "0" * 64}
    mnist.save_checkpoint(str(slow_ws / "model" / mnist.CHECKPOINT_NAME), other, state, [])
    code, _, err = run_task("train", slow_ws, capsys)
    assert code == 1 and "a checkpoint of another run (its config differs); delete" in err
    (slow_ws / "model" / mnist.CHECKPOINT_NAME).write_bytes(b"\x00broken")
    code, _, err = run_task("train", slow_ws, capsys)
    assert code == 1 and "not a readable checkpoint" in err


def test_sigterm_while_reading_the_checkpoint_is_not_taken_for_damage(slow_ws, capsys, monkeypatch):
    """SIGTERM may land anywhere, here in the reader that turns any Exception of a damaged file into
    'not a readable checkpoint': the task must still stop as terminated (143), the file untouched."""
    (slow_ws / "model").mkdir()
    (slow_ws / "model" / mnist.CHECKPOINT_NAME).write_bytes(b"a checkpoint")

    def signalled(data):
        mnist.stop_task(signal.SIGTERM, None)  # what the handler does when SIGTERM arrives

    monkeypatch.setattr(mnist.serialization, "msgpack_restore", signalled)
    code, _, err = run_task("train", slow_ws, capsys)
    assert code == 143 and err.strip().splitlines()[-1] == "mnist.py train: terminated"
    assert (slow_ws / "model" / mnist.CHECKPOINT_NAME).read_bytes() == b"a checkpoint"


def test_a_signal_after_the_last_call_stops_before_the_model_is_written(slow_ws, uninterrupted, capsys,
                                                                        monkeypatch):
    """SIGTERM once the last epoch's calls are queued (here as its line is logged), where no call is
    left to stop before: the run stops with its checkpoint whole, and the rerun only writes the model."""
    describe = mnist.EpochMetrics.describe

    def signalled(metrics, epochs):
        if metrics.epoch == epochs:
            signal.raise_signal(signal.SIGTERM)
        return describe(metrics, epochs)

    monkeypatch.setattr(mnist.EpochMetrics, "describe", signalled)
    code, _, err = run_task("train", slow_ws, capsys)
    assert code == 143 and err.strip().splitlines()[-1] == (
        f"mnist.py train: stopped after epoch {CONFIG['train_epochs']}; run the same command again to finish")
    assert (slow_ws / "model" / mnist.CHECKPOINT_NAME).exists() and not (slow_ws / "model" / "params.msgpack").exists()
    monkeypatch.undo()
    code, out, err = run_task("train", slow_ws, capsys)
    assert code == 0 and f"after epoch {CONFIG['train_epochs']}" in out and "epoch 1/" not in out, err
    assert (slow_ws / "model" / "params.msgpack").read_bytes() == uninterrupted[0]
