"""Scaling out: data parallelism over several local devices, and several processes through
jax.distributed on 127.0.0.1 (CPU collectives), each compared with a one-device run."""
import json
import signal
import time

import jax
import numpy as np
import pytest
from conftest import digits_workspace, finish, free_port, start_train, write_config
from flax import serialization

CONFIG = {"optimizer": "adam", "train_epochs": 2, "batch_size": 64}


@pytest.fixture(scope="module")
def scale_ws(tmp_path_factory):
    return digits_workspace(tmp_path_factory.mktemp("scale"), 2048, 256, **CONFIG)


def cpu(**env) -> dict:
    """The variables of a run on the CPU's devices, whatever else the machine has."""
    return {"JAX_PLATFORMS": "cpu", **env}


def output_of(process) -> str:
    """The standard output of a run that must succeed."""
    run = finish(process)
    assert run.code == 0, run.err[-2000:]
    return run.out


def params(scale_ws, name):
    return jax.tree.leaves(serialization.msgpack_restore((scale_ws / name / "params.msgpack").read_bytes()))


@pytest.fixture(scope="module")
def one_device(scale_ws):
    output_of(start_train(scale_ws, "one", cpu()))
    return json.loads((scale_ws / "one" / "model.json").read_text()), params(scale_ws, "one")


def assert_close_to_one_device(scale_ws, name, one_device):
    summary, reference = one_device
    other = json.loads((scale_ws / name / "model.json").read_text())
    assert abs(other["test_accuracy"] - summary["test_accuracy"]) <= 0.02
    for a, b in zip(params(scale_ws, name), reference, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)  # same maths, sums taken in another order


def test_two_local_devices_match_one(scale_ws, one_device):
    out = output_of(start_train(scale_ws, "two", cpu(XLA_FLAGS="--xla_force_host_platform_device_count=2")))
    assert "training on 2 cpu device(s)" in out
    assert_close_to_one_device(scale_ws, "two", one_device)


def test_batch_must_split_evenly_over_the_devices(scale_ws):
    config = write_config(scale_ws / "odd.yaml", {**CONFIG, "batch_size": 63})
    code, _, err = finish(start_train(scale_ws, "odd", cpu(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                                      train_config=config), timeout=300)
    assert code == 1
    assert "batch_size 63 does not split evenly over the 2 devices; use a multiple of 2" in err


def test_two_processes_through_jax_distributed(scale_ws, one_device):
    address = f"127.0.0.1:{free_port()}"
    processes = [start_train(scale_ws, "multi", cpu(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                                           JAX_PROCESS_ID=str(i))) for i in (0, 1)]
    outputs = [output_of(p) for p in processes]
    for i, out in enumerate(outputs):
        assert f"[process {i}/2] training on 2 cpu device(s)" in out and f"[process {i}/2] epoch 2/2" in out
    assert "written" in outputs[0] and "written" not in outputs[1]  # only process 0 writes
    log = (scale_ws / "logs" / "multi" / "mnist_train.log").read_text()
    assert "[process 0/2]" in log and "[process 1/2]" not in log
    metrics = (scale_ws / "logs" / "multi" / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]
    assert_close_to_one_device(scale_ws, "multi", one_device)


def test_coordinator_without_process_count_is_one_clear_line(scale_ws):
    code, _, err = finish(start_train(scale_ws, "lonely", cpu(JAX_COORDINATOR_ADDRESS="127.0.0.1:1")), timeout=120)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("mnist.py train: error: JAX_COORDINATOR_ADDRESS is set, so "
                                            "JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set to integers too")


def test_sigterm_ends_a_wait_for_the_other_processes(scale_ws):
    """A process waiting for a coordinator that never answers stops at once on SIGTERM (what `kubectl
    delete` and `docker stop` send), not when JAX gives up on the cluster minutes later."""
    process = start_train(scale_ws, "waiting", cpu(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
                                                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"))
    time.sleep(3)  # past the imports, into the wait
    process.send_signal(signal.SIGTERM)
    try:
        code, _, err = finish(process, timeout=20)
    finally:
        process.kill()
    assert code == -signal.SIGTERM and "Traceback" not in err
