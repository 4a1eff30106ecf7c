"""The evaluate and infer tasks, on a model that train wrote."""
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import matplotlib.image
import numpy as np
import pytest
from conftest import MNIST_SPEC, ROOT, make_digits, npz_bytes, run_task, task_args, write_config

import mnist


def with_mistakes(trained, tmp_path):
    """A copy of the trained workspace whose first ten test labels are wrong, so that the model, which
    classifies its learnable digits perfectly, makes mistakes for evaluate to list and draw."""
    ws = tmp_path / "mistaken"
    shutil.copytree(trained, ws)
    with np.load(ws / "data" / "mnist.npz") as f:
        arrays = {name: f[name] for name in f.files}
    arrays["y_test"][:10] = (arrays["y_test"][:10] + 1) % 10
    (ws / "data" / "mnist.npz").write_bytes(npz_bytes(arrays))
    return ws


def test_evaluate_equals_what_train_recorded(trained, capsys):
    code, out, err = run_task("evaluate", trained, capsys)
    assert code == 0, err
    metrics = json.loads((trained / "logs" / "evaluate_metrics.json").read_text())
    summary = json.loads((trained / "model" / "model.json").read_text())
    assert (metrics["test_accuracy"], metrics["test_loss"]) == (summary["test_accuracy"], summary["test_loss"])
    confusion = np.array(metrics["confusion_matrix"])
    labels = np.load(trained / "data" / "mnist.npz")["y_test"]
    assert confusion.shape == (10, 10) and confusion.sum() == metrics["images"] == len(labels)
    assert confusion.sum(1).tolist() == np.bincount(labels, minlength=10).tolist()  # rows are true classes
    assert confusion.trace() / confusion.sum() == pytest.approx(metrics["test_accuracy"])
    assert len(metrics["per_class_accuracy"]) == 10
    assert "the same as what train recorded" in out
    assert "test_accuracy" in (trained / "logs" / "mnist_evaluate.log").read_text()


@pytest.mark.parametrize("task, programs", [
    ("evaluate", ["jit(score)", "jit(class_probabilities)"]),
    ("infer", ["jit(class_probabilities)"]),
])
def test_each_task_compiles_its_programs_only(trained, tmp_path, capsys, caplog, task, programs):
    """Loading the model runs nothing; scoring is one program (evaluate's figures, as train's, and the
    probabilities that the mistakes are drawn with), not one for each operation."""
    ws = with_mistakes(trained, tmp_path)
    jax.clear_caches()  # programs compiled by earlier tests would not be logged again
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        code, _, err = run_task(task, ws, capsys)
    assert code == 0, err
    assert [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("Compiling")] == programs


def test_infer_agrees_with_evaluate(trained, tmp_path, capsys):
    code, out, err = run_task("infer", trained, capsys, predictions=tmp_path / "out" / "predictions.json")
    assert code == 0, err
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    labels = np.load(trained / "data" / "mnist.npz")["y_test"]
    classes = np.array([p["class"] for p in predictions])
    summary = json.loads((trained / "model" / "model.json").read_text())
    assert (classes == labels).mean() == pytest.approx(summary["test_accuracy"])
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-4 and p["class"] == np.argmax(p["probabilities"])
               for p in predictions)


# Runs ARGV and prints its exit status and peak resident memory (KiB). Linux counts into a process's
# peak that of the process which started it (exec keeps the larger), so a small Python starts infer,
# not the test's process, which holds JAX and the images.
PEAK_MEMORY = ("import os, subprocess, sys\n"
               "process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
               "_, status, usage = os.wait4(process.pid, 0)\n"
               "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n")


def peak_memory_of_infer(ws: Path, images: Path, predictions: Path) -> int:
    """infer, as its own process, on `images`: its peak resident memory in bytes."""
    infer = [sys.executable, str(ROOT / "mnist.py"), *task_args("infer", ws, images=images, predictions=predictions)]
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY, *infer], capture_output=True, text=True,
                            env={**os.environ, "MNIST_COMPILATION_CACHE": "off"}, timeout=600)
    code, kib = map(int, result.stdout.split())
    assert code == 0, result.stderr[-3000:]
    return kib * 1024


def test_infer_memory_stays_flat_however_many_images(trained, tmp_path):
    """infer on a file 30 times the size of one batch (INFER_BATCH images) needs no more memory than on
    one batch, give or take a margin a quarter of the larger file's size: were it to hold the images,
    or its predictions, all at once, it would need more than the whole file again."""
    digits = make_digits()["x_test"]
    sizes = {"one batch": mnist.INFER_BATCH, "thirty": 30 * mnist.INFER_BATCH}
    peaks = {}
    for name, count in sizes.items():
        path = tmp_path / f"{count}.npy"
        images = np.lib.format.open_memmap(path, "w+", np.uint8, (count, 28, 28))
        for first in range(0, count, len(digits)):  # written a piece at a time: this process stays small too
            images[first:first + len(digits)] = digits[:count - first]
        images.flush()
        del images
        peaks[name] = peak_memory_of_infer(trained, path, tmp_path / f"{count}.json")
        assert (tmp_path / f"{count}.json").read_text().count('"class"') == count  # a prediction for each
    file_size = (tmp_path / f"{sizes['thirty']}.npy").stat().st_size
    assert peaks["thirty"] - peaks["one batch"] < file_size / 4, (peaks, file_size)


def test_infer_one_image_from_npy(trained, tmp_path, capsys):
    image = np.load(trained / "data" / "mnist.npz")["x_test"][3]
    np.save(tmp_path / "one.npy", image)
    code, out, err = run_task("infer", trained, capsys, images=tmp_path / "one.npy", predictions=tmp_path / "p.json")
    assert code == 0, err
    assert len(json.loads((tmp_path / "p.json").read_text())["predictions"]) == 1


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 28, 28), np.float32), "expected uint8 images N×28×28 or one 28×28 (as the model was trained on), "
                                        "found float32 2×28×28"),
    (np.zeros((2, 27, 28), np.uint8), "found uint8 2×27×28"),
    ({"a": np.zeros((1, 28, 28), np.uint8), "b": np.zeros((1, 28, 28), np.uint8)}, "expected one array, or x_test"),
    (None, "no such file"),
])
def test_infer_refuses_bad_images(trained, tmp_path, capsys, images, message):
    path = tmp_path / ("images.npz" if isinstance(images, dict) else "images.npy")
    if isinstance(images, dict):
        np.savez(path, **images)
    elif images is not None:
        np.save(path, images)
    code, out, err = run_task("infer", trained, capsys, images=path, predictions=tmp_path / "p.json")
    assert code == 1 and message in err and str(path) in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "params.msgpack").write_bytes(b"\x93garbage"), "not parameters of CNN"),
    (lambda m: (m / "params.msgpack").write_bytes((m / "params.msgpack").read_bytes()[:100]), "not parameters of"),
    (lambda m: (m / "model.json").write_text(json.dumps({**json.loads((m / "model.json").read_text()),
                                                           "architecture": "MLP(512, 10)"})),
     "written for architecture 'MLP(512, 10)'"),
    (lambda m: (m / "model.json").write_text(json.dumps({"architecture": "MLP(512, 10)"})),
     "missing input_shape, classes, pixel_max, test_accuracy, test_loss, which train writes"),
    (lambda m: (m / "params.msgpack").unlink(), "params.msgpack: no such file; run the train task first"),
])
def test_a_damaged_or_foreign_model_is_refused(trained, tmp_path, capsys, damage, message):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("params.msgpack", "model.json"):
        (model / name).write_bytes((trained / "model" / name).read_bytes())
    damage(model)
    outputs = {"evaluate": {"log_dir": tmp_path / "logs"}, "infer": {"predictions": tmp_path / "p.json"}}
    for task in ("evaluate", "infer"):
        code, out, err = run_task(task, trained, capsys, model_dir=model, **outputs[task])
        assert code == 1 and message in err and "Traceback" not in err


def test_params_of_another_shape_are_refused(trained, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_bytes((trained / "model" / "model.json").read_bytes())
    params = mnist.init_params(mnist.jax.random.key(0), MNIST_SPEC)
    params["Dense_1"]["kernel"] = np.zeros((128, 11), np.float32)
    (model / "params.msgpack").write_bytes(mnist.serialization.to_bytes(params))
    code, out, err = run_task("evaluate", trained, capsys, model_dir=model, log_dir=tmp_path / "logs")
    assert code == 1 and "its arrays do not fit CNN" in err


def test_infer_on_real_test_images_agrees_with_evaluate(tmp_path, capsys, real_data, real_sample):
    """A short training on real digits (real_sample: the whole test set); infer on the original IDX test
    images matches evaluate."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.npz").write_bytes(real_sample)
    write_config(tmp_path / "train.yaml", {"optimizer": "adam", "train_epochs": 1, "batch_size": 64})
    assert run_task("train", tmp_path, capsys).code == 0
    assert run_task("evaluate", tmp_path, capsys).code == 0
    assert run_task("infer", tmp_path, capsys, images=real_data / "t10k-images-idx3-ubyte.gz").code == 0
    classes = [p["class"] for p in json.loads((tmp_path / "predictions.json").read_text())["predictions"]]
    accuracy = json.loads((tmp_path / "logs" / "evaluate_metrics.json").read_text())["test_accuracy"]
    labels = np.load(real_data / "mnist.npz")["y_test"]
    assert len(classes) == 10000 and np.mean(np.array(classes) == labels) == pytest.approx(accuracy)
    assert accuracy > 0.95


def rendered(draw) -> tuple:
    """A figure as save_plot makes it, and the pixel size of its PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4))
    draw(figure)
    figure.savefig(buffer := io.BytesIO(), format="png", dpi=100, bbox_inches="tight")
    return figure, matplotlib.image.imread(io.BytesIO(buffer.getvalue())).shape


DIGITS = [str(k) for k in range(10)]  # the class names a data.yaml without classes: gets


def test_pictures_show_what_they_claim(trained, tmp_path, capsys):
    """Each PNG decodes to the size of the figure drawn from the task's own figures, and that figure
    holds them: a panel per epoch's point, a count per cell, a panel per mistake listed."""
    trained = with_mistakes(trained, tmp_path)
    code, out, err = run_task("evaluate", trained, capsys, log_dir=tmp_path)
    assert code == 0, err
    metrics = json.loads((tmp_path / "evaluate_metrics.json").read_text())
    history = [mnist.EpochMetrics(**json.loads(line))
               for line in (trained / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    images = np.load(trained / "data" / "mnist.npz")["x_test"]
    pictures = {trained / "logs" / "training_curves.png": mnist.draw_curves(history),
                tmp_path / "confusion_matrix.png": mnist.draw_confusion(np.array(metrics["confusion_matrix"]), DIGITS),
                tmp_path / "mistakes.png": mnist.draw_mistakes(images, metrics["mistakes_shown"], metrics["mistakes"],
                                                               DIGITS)}
    figures = {}
    for path, draw in pictures.items():
        figures[path.name], shape = rendered(draw)
        assert matplotlib.image.imread(path).shape == shape and shape[0] > 150 and shape[1] > 300
    loss, accuracy = figures["training_curves.png"].axes
    assert [len(line.get_xdata()) for line in loss.lines + accuracy.lines] == [len(history)] * 3
    counts = sorted(int(t.get_text()) for t in figures["confusion_matrix.png"].axes[0].texts)
    assert counts == sorted(np.array(metrics["confusion_matrix"]).ravel().tolist())
    panels = [axes for axes in figures["mistakes.png"].axes if axes.images]
    assert 0 < len(panels) == len(metrics["mistakes_shown"]) <= mnist.MISTAKES_SHOWN
    assert [axes.get_title() for axes in panels] == [f"{m['true']} → {m['predicted']} ({100 * m['probability']:.1f}%)"
                                                     for m in metrics["mistakes_shown"]]
    labels = np.load(trained / "data" / "mnist.npz")["y_test"]
    assert metrics["mistakes"] == round((1 - metrics["test_accuracy"]) * len(labels))
    shown = metrics["mistakes_shown"]
    assert all(labels[m["index"]] == m["true"] != m["predicted"] for m in shown)
    assert [m["probability"] for m in shown] == sorted((m["probability"] for m in shown), reverse=True)


def test_no_mistakes_says_so(trained):
    figure, _ = rendered(mnist.draw_mistakes(np.zeros((1, 28, 28), np.uint8), [], 0, DIGITS))
    assert [text.get_text() for text in figure.texts] == ["no mistakes: every test image is classified correctly"]
    assert not figure.axes


def test_mistakes_are_the_most_confident_first():
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    labels, predicted = np.array([0, 0, 1, 1]), probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    assert mnist.most_confident_mistakes(wrong, confidence, labels, predicted) == [
        {"index": 1, "true": 0, "predicted": 1, "probability": 0.7},
        {"index": 3, "true": 1, "predicted": 0, "probability": 0.6}]


def test_without_matplotlib_a_note_not_a_failure(trained, tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them now raises ImportError
    code, out, err = run_task("evaluate", trained, capsys, log_dir=tmp_path)
    assert code == 0 and "no confusion_matrix.png: matplotlib, which requirements.txt names, is not installed" in out
    assert (tmp_path / "evaluate_metrics.json").exists() and not (tmp_path / "confusion_matrix.png").exists()
