"""Scaling out: data parallelism over several local devices, and several processes through
jax.distributed on 127.0.0.1 (CPU collectives), each compared with a one-device run."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from conftest import ROOT, make_digits, npz_bytes
from flax import serialization

CONFIG = {"optimizer": "adam", "train_epochs": 2, "batch_size": 64}


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    ws = tmp_path_factory.mktemp("scale")
    (ws / "data").mkdir()
    (ws / "data" / "mnist.npz").write_bytes(npz_bytes(make_digits(2048, 256)))
    (ws / "train.yaml").write_text(yaml.safe_dump(CONFIG))
    return ws


def train(cube, name, env=None, config=None):
    """Start `mnist.py train` writing to model_dir NAME; return the process (not yet finished)."""
    if config:
        (cube / f"{name}.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, str(ROOT / "mnist.py"), "train",
               f"--train_config={cube / (f'{name}.yaml' if config else 'train.yaml')}",
               f"--data_dir={cube / 'data'}", f"--model_dir={cube / name}", f"--log_dir={cube / 'logs' / name}"]
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def finish(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    return out


def params(cube, name):
    return jax.tree.leaves(serialization.msgpack_restore((cube / name / "params.msgpack").read_bytes()))


@pytest.fixture(scope="module")
def one_device(cube):
    finish(train(cube, "one"))
    return json.loads((cube / "one" / "model.json").read_text()), params(cube, "one")


def assert_close_to_one_device(cube, name, one_device):
    summary, reference = one_device
    other = json.loads((cube / name / "model.json").read_text())
    assert abs(other["test_accuracy"] - summary["test_accuracy"]) <= 0.02
    for a, b in zip(params(cube, name), reference, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)  # same maths, sums taken in another order


def test_two_local_devices_match_one(cube, one_device):
    out = finish(train(cube, "two", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
    assert "training on 2 cpu device(s)" in out
    assert_close_to_one_device(cube, "two", one_device)


def test_batch_must_split_evenly_over_the_devices(cube):
    process = train(cube, "odd", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                    config={**CONFIG, "batch_size": 63})
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "batch_size 63 does not split evenly over the 2 devices; use a multiple of 2" in err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_jax_distributed(cube, one_device):
    address = f"127.0.0.1:{free_port()}"
    processes = [train(cube, "multi", env={"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                                          "JAX_PROCESS_ID": str(i)}) for i in (0, 1)]
    outputs = [finish(p) for p in processes]
    for i, out in enumerate(outputs):
        assert f"[process {i}/2] training on 2 cpu device(s)" in out and f"[process {i}/2] epoch 2/2" in out
    assert "written" in outputs[0] and "written" not in outputs[1]  # only process 0 writes
    log = (cube / "logs" / "multi" / "mnist_train.log").read_text()
    assert "[process 0/2]" in log and "[process 1/2]" not in log
    metrics = (cube / "logs" / "multi" / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]
    assert_close_to_one_device(cube, "multi", one_device)


def test_coordinator_without_process_count_is_one_clear_line(cube):
    process = train(cube, "lonely", env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("mnist.py train: error: JAX_COORDINATOR_ADDRESS is set, so "
                                            "JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set to integers too")
