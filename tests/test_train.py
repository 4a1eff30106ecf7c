"""The train task: config checks, outputs, optimizers, determinism, a short run on real MNIST, the pinned
params of the benchmark config, and how the bench (.ci/bench.py) reports its runs."""
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    MNIST_SPEC,
    ROOT,
    Terminal,
    create_state,
    digits_workspace,
    make_digits,
    run_task,
    sha256,
    write_config,
)

import mnist


@pytest.fixture
def digits_ws(tmp_path):
    """A workspace holding a small learnable data set in data/mnist.npz."""
    return digits_workspace(tmp_path)


def run_train(ws, config, capsys):
    """The train task in this process, with `config` (a mapping, or YAML text) as ws/train.yaml."""
    write_config(ws / "train.yaml", config)
    return run_task("train", ws, capsys)


class DeeperCNN(mnist.nn.Module):
    """CNN as a student changes it: one more dense layer, and nothing else anywhere."""
    classes: int
    pixel_max: int

    @mnist.nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32)[..., None] / self.pixel_max
        x = mnist.nn.relu(mnist.Conv(16, 4)(x))
        x = mnist.nn.relu(mnist.Conv(32, 3)(x))
        x = mnist.nn.relu(mnist.nn.Dense(128)(x.reshape(x.shape[0], -1)))
        x = mnist.nn.relu(mnist.nn.Dense(64)(x))
        return mnist.nn.Dense(self.classes)(x)


def test_changing_the_network_is_a_change_to_cnn_alone(digits_ws, capsys, monkeypatch):
    """Train, evaluate and infer take the network's layers and class count from CNN itself."""
    monkeypatch.setattr(mnist, "CNN", DeeperCNN)
    code, _, err = run_train(digits_ws, {"optimizer": "adam", "train_epochs": 1, "batch_size": 32}, capsys)
    assert code == 0, err
    summary = json.loads((digits_ws / "model" / "model.json").read_text())
    assert summary["architecture"] == "CNN(conv16/4x4/s2, conv32/3x3/s2, dense128, dense64, dense10)"
    assert run_task("evaluate", digits_ws, capsys).code == 0
    metrics = json.loads((digits_ws / "logs" / "evaluate_metrics.json").read_text())
    assert metrics["test_accuracy"] == summary["test_accuracy"]
    assert run_task("infer", digits_ws, capsys).code == 0
    monkeypatch.undo()  # the model of another network is refused, in one line
    result = run_task("evaluate", digits_ws, capsys)
    assert result.code == 1 and "written for architecture 'CNN(conv16/4x4/s2, conv32/3x3/s2, dense128, dense64" \
        in result.err


def test_train_writes_model_metrics_and_logs(digits_ws, capsys):
    code, out, err = run_train(digits_ws, {"optimizer": "adam", "train_epochs": 3, "batch_size": 32}, capsys)
    assert code == 0, err
    summary = json.loads((digits_ws / "model" / "model.json").read_text())
    assert summary["config"] == {"optimizer": "adam", "train_epochs": 3, "batch_size": 32, "seed": 0,
                                 "learning_rate": mnist.OPTIMIZERS["adam"][1] / 2, "target_accuracy": None}
    assert summary["epochs_run"] == 3 and summary["time_to_target_seconds"] is None
    assert summary["test_accuracy"] > 0.9  # the bars are easy to learn; chance is 0.1
    assert summary["data_sha256"] == sha256((digits_ws / "data" / "mnist.npz").read_bytes())
    assert summary["backend"] == jax.default_backend() and summary["versions"]["jax"] == jax.__version__
    for key in ("test_loss", "train_seconds", "compile_seconds", "images_per_second", "device_kind"):
        assert summary[key]
    metrics = [json.loads(line) for line in (digits_ws / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[-1]["test_accuracy"] == summary["test_accuracy"]
    assert all(m["elapsed_seconds"] >= m["epoch_seconds"] > 0 for m in metrics)
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("epoch")] == [
        "epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "epoch 3/3" in (digits_ws / "logs" / "mnist_train.log").read_text()
    restored = mnist.serialization.from_bytes(
        create_state(summary["config"], 1).params, (digits_ws / "model" / "params.msgpack").read_bytes())
    test = np.load(digits_ws / "data" / "mnist.npz")
    loss, accuracy, _ = mnist.score(restored, test["x_test"], test["y_test"], 255)
    assert float(accuracy) == pytest.approx(summary["test_accuracy"])
    leftovers = [f for d in ("model", "logs") for f in os.listdir(digits_ws / d)
                 if f.startswith(".") and f != mnist.LOCK_NAME]
    assert leftovers == []


def test_target_accuracy_stops_early(digits_ws, capsys):
    code, out, err = run_train(digits_ws, {"optimizer": "adam", "train_epochs": 20, "batch_size": 32,
                                      "target_accuracy": 0.5}, capsys)
    assert code == 0, err
    summary = json.loads((digits_ws / "model" / "model.json").read_text())
    assert summary["epochs_run"] < 20 and summary["test_accuracy"] >= 0.5
    assert 0 < summary["time_to_target_seconds"] == summary["train_seconds"]
    assert "reached target_accuracy 0.5" in out


def test_same_seed_gives_identical_params(digits_ws, capsys):
    config = {"optimizer": "adam", "train_epochs": 1, "batch_size": 64, "seed": 3}
    digests = []
    for _ in range(2):
        assert run_train(digits_ws, config, capsys)[0] == 0
        digests.append(sha256((digits_ws / "model" / "params.msgpack").read_bytes()))
    assert run_train(digits_ws, {**config, "seed": 4}, capsys)[0] == 0
    assert digests[0] == digests[1] != sha256((digits_ws / "model" / "params.msgpack").read_bytes())


def test_live_step_counter_on_a_terminal(digits_ws, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    code, _, err = run_train(digits_ws, {"optimizer": "sgd", "train_epochs": 2, "batch_size": 4}, capsys)
    assert code == 0, err
    # 512 images at batch 4: 128 steps an epoch, 64 a call; the counter is erased at the epoch's end
    assert terminal.getvalue() == "".join(f"\repoch {e}: step 64/128\repoch {e}: step 128/128\r\033[K"
                                          for e in (1, 2))


def test_nothing_compiles_after_compile_programs(digits_ws, capsys, caplog, monkeypatch):
    """Epochs, their last partial batch (512 images, batch 48) and evaluation reuse the programs
    compiled before training; JAX logs every compilation, and none may follow compile_programs.
    None precedes the first either: the random keys are made inside the programs."""
    compile_programs = mnist.compile_programs

    def compile_then_mark(*args):
        programs = compile_programs(*args)
        logging.getLogger("test").warning("compile_programs returned")
        return programs

    monkeypatch.setattr(mnist, "compile_programs", compile_then_mark)
    jax.clear_caches()  # programs compiled by earlier tests would not be logged again
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        code, _, err = run_train(digits_ws, {"optimizer": "adam", "train_epochs": 2, "batch_size": 48}, capsys)
    assert code == 0, err
    messages = [record.getMessage() for record in caplog.records]
    compiled = [m.split()[1] for m in messages if m.startswith("Compiling")]
    assert compiled[0] == "jit(init)" and "jit(train_steps)" in compiled  # the keys are made in programs
    after = messages[messages.index("compile_programs returned") + 1:]
    assert [m for m in after if m.startswith("Compiling")] == []


@pytest.mark.parametrize("name", list(mnist.OPTIMIZERS))
def test_every_optimizer_builds_and_steps(name):
    data = make_digits(64, 8)
    config = {"optimizer": name, "learning_rate": mnist.OPTIMIZERS[name][1], "seed": 0}
    state = create_state(config, total_steps=10)
    batches, offsets = jnp.arange(64).reshape(2, 32), jnp.ones((2, 32, 2), jnp.int32)
    new, loss_sum = jax.jit(mnist.train_steps, static_argnums=(7, 8))(
        state, jnp.zeros(()), data["x_train"], data["y_train"].astype(np.int32), batches, offsets, 0, 2, 255)
    assert np.isfinite(float(loss_sum)) and float(loss_sum) > 0
    before, after = jax.tree.leaves(state.params), jax.tree.leaves(new.params)
    assert all(a.shape == b.shape for a, b in zip(before, after, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_one_call_of_four_steps_equals_four_calls_of_one():
    data = make_digits(256, 8)
    state = create_state({"optimizer": "adam", "learning_rate": 1e-3, "seed": 0}, total_steps=4)
    batches, offsets = mnist.plan_epoch(1, 1, 256, 32)
    run = jax.jit(mnist.train_steps, static_argnums=(7, 8))
    args = (data["x_train"], data["y_train"].astype(np.int32), batches, offsets)
    looped, looped_loss = run(state, jnp.zeros(()), *args, 2, 4, 255)
    single, single_loss = state, jnp.zeros(())
    for first in range(2, 6):
        single, single_loss = run(single, single_loss, *args, first, 1, 255)
    assert int(looped.step) == int(single.step) == 4
    np.testing.assert_allclose(looped_loss, single_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(looped.average), jax.tree.leaves(single.average), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_shift_moves_each_image_by_its_offsets_less_one():
    offsets = np.array([(r, c) for r in range(3) for c in range(3)], np.int32)
    images = jnp.zeros((9, 28, 28), jnp.uint8).at[:, 14, 14].set(255)
    moved = np.asarray(mnist.shift(images, offsets))
    assert [tuple(np.argwhere(image == 255)[0]) for image in moved] == [(15 - r, 15 - c) for r, c in offsets]
    assert (moved.reshape(9, -1) > 0).sum(1).tolist() == [1] * 9  # nothing else drawn, nothing lost


def test_plan_epoch_is_a_function_of_seed_and_epoch():
    batches, offsets = mnist.plan_epoch(0, 1, 100, 32)
    assert batches.shape == (3, 32) and offsets.shape == (3, 32, 2)  # the last 4 images are dropped
    assert len(set(np.asarray(batches).ravel())) == 96 and 0 <= batches.min() and batches.max() < 100
    assert set(np.asarray(offsets).ravel()) == {0, 1, 2}
    again, other = mnist.plan_epoch(0, 1, 100, 32), mnist.plan_epoch(0, 2, 100, 32)
    assert all(np.array_equal(a, b) for a, b in zip((batches, offsets), again, strict=True))
    assert not np.array_equal(batches, other[0]) and not np.array_equal(offsets, other[1])


def test_model_shapes():
    params = mnist.CNN(10, 255).init(jax.random.key(0), jnp.zeros((1, 28, 28), jnp.uint8))["params"]
    logits = mnist.CNN(10, 255).apply({"params": params}, jnp.zeros((5, 28, 28), jnp.uint8))
    assert logits.shape == (5, 10) and logits.dtype == jnp.float32


def test_predict_all_scores_every_image_in_batches():
    images = jax.random.randint(jax.random.key(1), (2 * mnist.SCORE_BATCH + 7, 28, 28), 0, 256).astype(jnp.uint8)
    params = mnist.init_params(jax.random.key(0), MNIST_SPEC)
    np.testing.assert_allclose(jax.jit(mnist.predict_all, static_argnums=2)(params, images, 255),
                               mnist.predict(params, images, 255),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, height, channels", [(4, 28, 1), (3, 14, 16)])
def test_conv_computes_what_flax_conv_computes(size, height, channels):
    images = jax.random.normal(jax.random.key(1), (5, height, height, channels))
    flax_conv = mnist.nn.Conv(32, (size, size), strides=2)
    variables = flax_conv.init(jax.random.key(0), images)
    ours = mnist.Conv(32, size)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), images)) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_allclose(ours.apply(variables, images), flax_conv.apply(variables, images), atol=1e-5)


@pytest.mark.parametrize("step, decay", [(0, 0.1), (8, 0.5), (10_000, mnist.AVERAGE_DECAY)])
def test_the_average_follows_the_parameters_and_soon_forgets_the_initial_ones(step, decay):
    """The average's decay is (1 + step) / (10 + step) up to AVERAGE_DECAY: after the first step it
    holds a tenth of the random initial parameters, not 99 %."""
    state = create_state({"optimizer": "sgd", "learning_rate": 0.1, "seed": 0}, total_steps=10).replace(step=step)
    new = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))
    for before, after, average in zip(*map(jax.tree.leaves, (state.params, new.params, new.average)), strict=True):
        assert not np.allclose(before, after)
        np.testing.assert_allclose(average, decay * before + (1 - decay) * after, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("steps, count", [(468, 52), (1875, 25), (3, 3), (128, 64), (67, 1)])
def test_steps_per_call_divides_the_epoch(steps, count):
    assert mnist.steps_per_call(steps) == count


GOOD = {"optimizer": "adam", "train_epochs": 1, "batch_size": 32}


@pytest.mark.parametrize("config, message", [
    ({**GOOD, "epochs": 3}, "unknown key 'epochs'"),
    ({"optimizer": "adam", "batch_size": 32}, "missing key 'train_epochs'"),
    ({**GOOD, "train_epochs": "5"}, "train_epochs must be an integer, got '5'"),
    ({**GOOD, "batch_size": 32.5}, "batch_size must be an integer"),
    ({**GOOD, "train_epochs": True}, "train_epochs must be an integer, got True"),
    ({**GOOD, "learning_rate": "fast"}, "learning_rate must be a number"),
    ({**GOOD, "train_epochs": 0}, "train_epochs must be positive"),
    ({**GOOD, "batch_size": -4}, "batch_size must be positive"),
    ({**GOOD, "learning_rate": 0}, "learning_rate must be positive"),
    ({**GOOD, "seed": -1}, "seed must lie in 0..2147483646, got -1"),
    ({**GOOD, "target_accuracy": 1.5}, "target_accuracy must lie in (0, 1]"),
    ({**GOOD, "optimizer": "adamax2"}, "unknown optimizer 'adamax2' (known: adam, adamw, sgd, momentum"),
    ({**GOOD, "batch_size": 100000}, "batch_size 100000 is larger than the 512 training images"),
    ("optimizer: [adam\n", "not valid YAML"),
])
def test_bad_train_config_fails_before_compiling(digits_ws, capsys, monkeypatch, config, message):
    monkeypatch.setattr(mnist.jax, "jit", lambda *a, **k: pytest.fail("compiled before checking"))
    code, out, err = run_train(digits_ws, config, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("mnist.py train: error: ")
    assert message in lines[0] and "train.yaml" in lines[0]
    assert not (digits_ws / "model").exists()


@pytest.mark.parametrize("content, message", [
    (None, "no such file; run the download task first"),
    (b"not a zip", "not a readable .npz"),
])
def test_missing_or_malformed_data(digits_ws, capsys, monkeypatch, content, message):
    monkeypatch.setattr(mnist.jax, "jit", lambda *a, **k: pytest.fail("compiled before checking"))
    (digits_ws / "data" / "mnist.npz").unlink()
    if content:
        (digits_ws / "data" / "mnist.npz").write_bytes(content)
    code, out, err = run_train(digits_ws, GOOD, capsys)
    assert code == 1 and message in err and "mnist.npz" in err


def test_write_atomically_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "params.msgpack"
    mnist.write_atomically(str(target), b"good")

    def interrupted(*args):
        raise KeyboardInterrupt()

    monkeypatch.setattr(mnist.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mnist.write_atomically(str(target), b"half-written")
    assert target.read_bytes() == b"good" and os.listdir(tmp_path) == ["params.msgpack"]


def test_short_run_on_real_mnist(tmp_path, capsys, real_data):
    """One epoch on the real data: a sanity check; full accuracy runs belong to `nox -s bench`."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.npz").symlink_to(real_data / "mnist.npz")
    code, out, err = run_train(tmp_path, {"optimizer": "adam", "train_epochs": 1, "batch_size": 256}, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "model" / "model.json").read_text())["test_accuracy"] > 0.97


BENCHMARK_DIGEST = "e700c1f4fe7d854cbab4e8160e6d71424fac60aecb41fb591ed1539547773074"  # see the docstring
BENCHMARK_VERSIONS = {"jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8", "optax": "0.2.8", "numpy": "2.4.6",
                      "ml_dtypes": "0.6.0"}  # what it was trained with: the packages whose release may move a bit


@pytest.mark.skipif(jax.default_backend() != "cpu" or "avx512f" not in open("/proc/cpuinfo").read(),
                    reason="the pinned digest is of an x86-64 CPU with AVX-512")
def test_benchmark_config_gives_the_pinned_params(tmp_path, capsys, real_data):
    """The params.msgpack of the benchmark config, seed 0, on the real data: pinned so that a change
    meant to keep behaviour (a refactoring) shows it kept every bit. Measured on the 2-core AVX-512
    machine CI runs on (another CPU may round differently, hence the skip) with BENCHMARK_VERSIONS.
    With other versions installed (after `nox -s update-pins`) it still trains, and fails saying
    whether the bits moved, with the lines to re-pin: a skip there would hide the one answer update-pins
    asks of it, and a pass would leave a record of versions no longer installed, against which the next
    moved bit could not be told apart as the code's or a release's."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.npz").symlink_to(real_data / "mnist.npz")
    code, _, err = run_train(tmp_path, {"optimizer": "adam", "train_epochs": 5, "batch_size": 128,
                                        "target_accuracy": 0.99}, capsys)
    assert code == 0, err
    digest = sha256((tmp_path / "model" / "params.msgpack").read_bytes())
    installed = {name: importlib.metadata.version(name) for name in BENCHMARK_VERSIONS}
    if installed == BENCHMARK_VERSIONS:
        assert digest == BENCHMARK_DIGEST, "the same versions train other bits: this change moved behaviour"
        return
    changed = ", ".join(f"{name} {BENCHMARK_VERSIONS[name]} → {installed[name]}" for name in installed
                        if installed[name] != BENCHMARK_VERSIONS[name])
    moved = "the same bits as" if digest == BENCHMARK_DIGEST else "other bits than"
    pytest.fail(f"other versions ({changed}) train {moved} the pinned ones; re-pin in tests/test_train.py: "
                f"BENCHMARK_DIGEST = {digest!r}, BENCHMARK_VERSIONS = {installed!r}")


def load_bench():
    """.ci/bench.py as a module (it is a script, in no package)."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / ".ci" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def bench_run(to_99: float) -> dict:
    """A run as bench.py's train reports it: measure's figures and model.json's."""
    model = {"backend": "cpu", "device_kind": "cpu", "compile_seconds": to_99 / 10, "time_to_target_seconds": to_99,
             "images_per_second": 60000 / to_99}
    return {"epochs": 3, "accuracy": 0.991, "to_99": to_99, "epochs_to_99": 3, "seconds": to_99 + 1, "peak_mb": 900,
            "compiles": {"train_steps": to_99 / 20}, "lowerings": {"train_steps": to_99 / 40}, "model": model}


def test_bench_prints_no_ratio_against_a_missing_reference(tmp_path, capsys):
    """A reference trainer the bench did not find is named, with where it was looked for, and no ratio
    is printed against it: not in the table, not in the Flax comparison (printed when it is there)."""
    bench = load_bench()
    ours = {"mnist.py cold": bench_run(12.0), "mnist.py warm": bench_run(8.0)}
    bench.report_speed({**ours, "flax_reference": bench_run(240.0)}, {})
    assert f"cold {240 / 12:.1f}x, warm {240 / 8:.1f}x" in capsys.readouterr().out
    missing = tmp_path / "flax_reference.py"
    bench.report_speed(ours, {"flax_reference": missing})
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "flax_reference" in line] == [
        f"| flax_reference | not measured: no reference trainer at {missing}, so no ratio against it | | | | | |"]
    assert [line for line in lines if "Flax-shaped" in line] == [
        "Against the Flax-shaped reference: no ratio, it is missing (targets: 22x cold, 30x warm)"]


def test_bench_table_is_markdown_under_the_machine_it_ran_on(capsys):
    """The speed table as the README shows it: a Markdown table, one row a run, under a line that names
    the machine (cores, CPU, AVX-512 or not, Python, JAX, date)."""
    bench = load_bench()
    bench.report_speed({"mnist.py cold": bench_run(12.0), "mnist.py warm": bench_run(8.0)}, {})
    out = capsys.readouterr().out
    assert f"{os.cpu_count()}-core " in out and "AVX-512" in out and f"JAX {jax.__version__}" in out
    rows = [line for line in out.splitlines() if line.startswith("| mnist.py")]
    assert rows == ["| mnist.py cold | 12.00 | 3 | 13.00 | 99.10 % | 900 | 1.5 |",
                    "| mnist.py warm | 8.00 | 3 | 9.00 | 99.10 % | 900 | 1.0 |"]


def test_architecture_describes_a_layer_without_a_kernel(monkeypatch):
    class Normed(mnist.nn.Module):
        classes: int
        pixel_max: int

        @mnist.nn.compact
        def __call__(self, images):
            x = mnist.nn.relu(mnist.Conv(16, 4)(images.astype(jnp.float32)[..., None] / self.pixel_max))
            x = mnist.nn.LayerNorm()(x.reshape(x.shape[0], -1))
            return mnist.nn.Dense(self.classes)(x)

    monkeypatch.setattr(mnist, "CNN", Normed)
    assert mnist.architecture(MNIST_SPEC) == "CNN(conv16/4x4/s2, layernorm, dense10)"
