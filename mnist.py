"""The MNIST MLCube's tasks.

    python mnist.py download --data_config=PATH --data_dir=PATH --log_dir=PATH
    python mnist.py train --train_config=PATH --data_dir=PATH --model_dir=PATH --log_dir=PATH
    python mnist.py evaluate --data_dir=PATH --model_dir=PATH --log_dir=PATH
    python mnist.py infer --model_dir=PATH --images=PATH --predictions=PATH
    python mnist.py sweep --sweep_config=PATH --data_dir=PATH --sweep_dir=PATH --log_dir=PATH

Each task reads and writes only the paths it is given, so the same command runs on a laptop, in
Docker or under Singularity, where MLCube mounts each path into the container.

Reading order, top to bottom:
  the commands       each task's parameters (COMMANDS), and the command line
  the model          CNN, built for the data's image shape and classes (Spec); Conv, its convolutions
  training           the loss, the optimizer, the step (train_steps), the augmentation, an epoch's plan
  compiled programs  the three programs a run compiles before its first step, the shardings of their
                     arrays, and the options every program is compiled with (evaluate's and infer's too)
  the tasks          train, evaluate, sweep, infer and download, each followed by the helpers it is
                     the first to call, in the order it calls them; then TASKS, which names them for the
                     command line
  the machinery      what knows nothing of MNIST or of learning, each part named for what it guards
                     against: messages and configs, bounded readers, atomic files and locks,
                     downloading, signals
  the process        logs, then main and, in the order it calls them, the user it runs as, the
                     cluster a run may join, the compilation cache, and the task's outcome

To make it your own: another network is the model section; another task is a function in the tasks
section, a line in TASKS and its parameters in COMMANDS (the README's "Making it your own" lists every
place).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import difflib
import errno
import functools
import glob
import gzip
import hashlib
import http.client
import io
import json
import logging
import math
import os
import re
import signal
import stat
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, NamedTuple

try:  # Linux and macOS: OS locks that die with their process, on files and on folders
    import fcntl
except ImportError:  # Windows: locks on files alone, and a file held open cannot be removed
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

# --------------------------------------------------------------------------------------- the commands
# Each task's command: its help line, and its parameters as mlcube.yaml has them (help, type, whether
# it is an output). The functions are TASKS, after the tasks section.
COMMANDS = {
    "download": ("Fetch the data set named in data_config, verify it, and write data_dir/mnist.npz.", {
        "data_config": ("data.yaml: uri and hash of the data set", "file", False),
        "data_dir": ("folder that receives mnist.npz", "directory", True),
        "log_dir": ("folder that receives mnist_download.log", "directory", True)}),
    "train": ("Train the CNN on data_dir/mnist.npz; write model_dir/params.msgpack and model.json.", {
        "data_dir": ("folder holding mnist.npz (from the download task)", "directory", False),
        "train_config": ("train.yaml: optimizer, train_epochs, batch_size, ...", "file", False),
        "log_dir": ("folder that receives mnist_train.log and train_metrics.jsonl", "directory", True),
        "model_dir": ("folder that receives params.msgpack and model.json", "directory", True)}),
    "evaluate": ("Score the trained model on all test images; write log_dir/evaluate_metrics.json.", {
        "data_dir": ("folder holding mnist.npz", "directory", False),
        "model_dir": ("folder holding params.msgpack and model.json (from train)", "directory", False),
        "log_dir": ("folder that receives evaluate_metrics.json and mnist_evaluate.log", "directory", True)}),
    "infer": ("Classify images with the trained model; write each one's class and probabilities as JSON.", {
        "model_dir": ("folder holding params.msgpack and model.json (from train)", "directory", False),
        "images": ("images to classify: .npy, .npz or IDX (uint8, N of the shape the model was trained on, "
                   "or one), or image files (a folder of them, or one)", "file", False),
        "predictions": ("JSON file that receives each image's class and probabilities; an existing file "
                        "there is replaced only if infer wrote it", "file", True)}),
    "sweep": ("Train many settings as one Optuna study, chosen on a validation split; any number of workers.", {
        "data_dir": ("folder holding mnist.npz", "directory", False),
        "sweep_config": ("sweep.yaml: trials, validation_fraction, train.yaml's keys fixed or searched", "file", False),
        "sweep_dir": ("folder of the study, shared by its workers: trials.csv, best.yaml, pictures", "directory", True),
        "log_dir": ("folder that receives mnist_sweep.log", "directory", True)}),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mnist.py", description=__doc__.split("\n\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, (summary, params) in COMMANDS.items():
        task = tasks.add_parser(name, help=summary, description=summary)
        for param, (text, _, _) in params.items():
            task.add_argument(f"--{param}", required=True, metavar="PATH", help=text, type=path_argument)
    return parser.parse_args(argv)


def path_argument(value: str) -> str:
    """A path as given, but never an empty one, which would mean the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return value


if __name__ == "__main__":  # --help and a mistyped command answer here, before JAX is imported
    parse_args(sys.argv[1:])


import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import linen as nn
from flax import serialization
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# ---------------------------------------------------------------------------------------- the model
SCORE_BATCH = 1000  # images that evaluation and inference score at once


class CNN(nn.Module):
    """The network: two stride-2 convolutions and a dense layer of 128, then one logit per class.
    Strides, not pooling: they learn their own downsampling, and need no select-and-scatter gradient."""
    classes: int  # the data's: MNIST's 10 digits
    pixel_max: int  # the training images' brightest value (MNIST's 255), which becomes 1

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32) / self.pixel_max  # uint8 N×28×28 (MNIST), or N×H×W×C in colour
        if x.ndim == 3:
            x = x[..., None]  # grey: one channel, N×28×28×1
        x = nn.relu(Conv(16, 4)(x))  # 14×14
        x = nn.relu(Conv(32, 3)(x))  # 7×7
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.classes)(x)


class Spec(NamedTuple):
    """What the network is built for, read off the data (spec_of); model.json records it.
    pixel_max, the training images' brightest value, scales every input (0..16 pixels are not 0..255)."""
    image_shape: tuple[int, ...]
    classes: int
    pixel_max: int


def spec_of(arrays: dict[str, np.ndarray]) -> Spec:
    """The Spec of checked arrays: image shape, class count and brightest training pixel (1 at least)."""
    return Spec(arrays["x_train"].shape[1:], int(arrays["y_train"].max()) + 1, max(int(arrays["x_train"].max()), 1))


def architecture(spec: Spec) -> str:
    """CNN as model.json names it: each layer in the order CNN calls it, read off its params' shapes.
    evaluate and infer compare it before they load parameters. Nothing runs; it follows any change to CNN."""
    called = []

    def record(next_fun, args, kwargs, context):  # each layer as CNN calls it
        if context.method_name == "__call__" and context.module.name is not None:
            called.append(context.module.name)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        params = jax.eval_shape(lambda: init_params(jax.random.key(0), spec))
    return f"CNN({', '.join(describe_layer(name, params.get(name, {})) for name in called)})"


def describe_layer(name: str, params: dict) -> str:
    """A layer as architecture names it: conv16/4x4/s2 (filters, kernel, stride), dense128, or its kind."""
    kernel = params.get("kernel")
    if kernel is None:
        return name.rpartition("_")[0].lower()
    if name.startswith("Conv"):
        return f"conv{kernel.shape[3]}/{kernel.shape[0]}x{kernel.shape[1]}/s2"
    return f"dense{kernel.shape[1]}"


def output_layer(params) -> str:
    """The name of CNN's output layer: its last dense layer, as Flax numbers them (Dense_0, Dense_1, ...)."""
    return max((name for name in params if name.startswith("Dense_")), key=lambda name: int(name.rpartition("_")[2]))


class Conv(nn.Module):
    """nn.Conv(features, (size, size), strides=2), its padding and parameters, as one matrix product.
    Over the image's patches, so that XLA's CPU backend runs it and its gradient as calls of its
    matrix-product library, and no backend needs a convolution kernel (the README's "How it trains")."""
    features: int
    size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[3]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.size, self.size, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        pads, ends = [], []
        for length in x.shape[1:3]:  # rows, then columns
            out = -(-length // 2)  # SAME padding keeps ceil(length / 2)
            pad = 2 * (out - 1) + self.size - length  # zeros to add, the odd one after, as in XLA's SAME
            pads.append((pad // 2, pad - pad // 2))
            ends.append(2 * (out - 1) + 1)
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        patches = [x[:, i:i + ends[0]:2, j:j + ends[1]:2] for i in range(self.size) for j in range(self.size)]
        return jnp.concatenate(patches, -1) @ kernel.reshape(-1, self.features) + bias


def predict(params, images: jax.Array, pixel_max: int) -> jax.Array:
    """Logits, one row per image, a column per class: as many as CNN's last layer has."""
    return CNN(params[output_layer(params)]["bias"].shape[-1], pixel_max).apply({"params": params}, images)


def predict_all(params, images: jax.Array, pixel_max: int) -> jax.Array:
    """predict for any number of images, SCORE_BATCH at a time, so that memory stays bounded."""
    return jax.lax.map(lambda image: predict(params, image[None], pixel_max)[0], images, batch_size=SCORE_BATCH)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ----------------------------------------------------------------------------------------- training
# train = read_train_config, load_data_dir, check_fits -> run_epochs -> write_model. run_epochs puts the
# data set on every device once and compiles three programs before the first step (compile_programs;
# the fields of Programs):
#   init   (seed)                          -> the first TrainState                 state_initializer
#   steps  (state, loss_sum, x_train,      -> state, loss_sum, after `count`       train_steps
#           y_train, batches, offsets,        steps run as one scan
#           first)
#   score  (params, x_test, y_test)        -> loss, accuracy, predicted classes    score
# Every array a program takes or returns is replicated on all devices. Static, bound with functools.partial
# (a change means another program): the data set's size, the batch size, `count` and the mesh. An epoch
# (train_epoch) is its plan (plan_epoch) and steps // count calls of `steps`, then `score` of the average.

# name: (Optax optimizer taking a learning-rate schedule, its peak learning rate at batch size 128),
# each rate tuned on MNIST so that none diverges at batch 512, where it doubles.
OPTIMIZERS = {
    "adam": (optax.adam, 5e-3),
    "adamw": (optax.adamw, 5e-3),
    "sgd": (optax.sgd, 0.3),
    "momentum": (lambda lr: optax.sgd(lr, momentum=0.9), 0.05),
    "nesterov": (lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True), 0.05),
    "rmsprop": (optax.rmsprop, 3e-3),
    "adagrad": (optax.adagrad, 0.1),
    "lamb": (optax.lamb, 5e-3),
    "lion": (optax.lion, 1e-3),
}


AVERAGE_DECAY = 0.99  # of the parameter average that is evaluated and saved; see TrainState


class TrainState(train_state.TrainState):
    """Flax's train state plus a moving average of the parameters, which the run evaluates and saves.
    The average smooths out the last steps' noise. Its decay grows to AVERAGE_DECAY as (1 + step) /
    (10 + step), as in TensorFlow's ExponentialMovingAverage, so a short run's keeps little of the start."""
    average: Any

    def apply_gradients(self, *, grads, **kwargs) -> "TrainState":
        state = super().apply_gradients(grads=grads, **kwargs)
        decay = jnp.minimum(AVERAGE_DECAY, (1 + self.step) / (10 + self.step))
        return state.replace(average=optax.incremental_update(state.params, self.average, 1 - decay))


def state_initializer(config: TrainConfig, total_steps: int, spec: Spec) -> Callable[[int], TrainState]:
    """The function of the seed that makes a run's first state: parameters and the scheduled optimizer.
    Its key is RBG, not the default Threefry: the pinned params digest and README's figures come from it."""
    make, _ = OPTIMIZERS[config.optimizer]
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, total_steps // 20, total_steps)
    tx = make(schedule)

    def init(seed: jax.Array) -> TrainState:
        params = init_params(jax.random.key(seed, impl="rbg"), spec)
        return TrainState.create(apply_fn=None, params=params, tx=tx, average=params)

    return init


def init_params(key: jax.Array, spec: Spec):
    return CNN(spec.classes, spec.pixel_max).init(key, jnp.zeros((1, *spec.image_shape), jnp.uint8))["params"]


def train_steps(state, loss_sum, images, labels, batches, offsets, first, count: int, pixel_max: int, split=None):
    """`count` optimizer steps on batches[first:first + count], shifted by their offsets, as one scan.
    With `split`, each device learns from its own slice of every batch (data parallelism); XLA sums the
    gradients across devices, and the replicated state stays in step."""
    grad_fn = jax.value_and_grad(lambda params, images, labels: cross_entropy(predict(params, images, pixel_max),
                                                                              labels))

    def step(carry, i):
        state, loss_sum = carry
        images_i, labels_i, offsets_i = images[batches[i]], labels[batches[i]], offsets[i]
        if split is not None:
            images_i, labels_i, offsets_i = (jax.lax.with_sharding_constraint(a, split)
                                             for a in (images_i, labels_i, offsets_i))
        if min(images.shape[1:3]) >= MIN_SHIFT_SIDE:
            images_i = shift(images_i, offsets_i)
        loss, grads = grad_fn(state.params, images_i, labels_i)
        return (state.apply_gradients(grads=grads), loss_sum + loss), None

    return jax.lax.scan(step, (state, loss_sum), first + jnp.arange(count))[0]


MIN_SHIFT_SIDE = 16  # images shorter or narrower are not shifted: a pixel is too much of them


def shift(images: jax.Array, offsets: jax.Array) -> jax.Array:
    """Each image moved by offsets - 1 pixels (offsets 0..2): an augmentation that lifts test accuracy."""
    channels = [(0, 0)] * (images.ndim - 3)  # a colour image's channels move together
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), *channels))

    def move(image: jax.Array, at: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (at[0], at[1], *(0 for _ in channels)), images.shape[1:])

    return jax.vmap(move)(padded, offsets)


def plan_epoch(seed: int, epoch: int, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """An epoch's batches of image indices, and each image's offsets for shift, from (seed, epoch) alone.
    Drawn here by NumPy, so that a step draws nothing and XLA compiles no generator; runs repeat exactly,
    every process draws the same, and the last partial batch (a different one each epoch) is dropped."""
    rng = np.random.default_rng([seed, epoch])
    steps = n // batch_size
    batches = rng.permutation(n)[:steps * batch_size].reshape(steps, batch_size)
    return batches.astype(np.int32), rng.integers(0, 3, (steps, batch_size, 2), dtype=np.int32)


def score(params, images: jax.Array, labels: jax.Array, pixel_max: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean loss, accuracy and each image's predicted class: train and evaluate both report these bits."""
    logits = predict_all(params, images, pixel_max)
    predicted = logits.argmax(-1)
    return cross_entropy(logits, labels), (predicted == labels).mean(), predicted


# ------------------------------------------------------------------- compiled programs and sharding
MAX_STEPS_PER_CALL = 64  # see steps_per_call


def steps_per_call(steps: int) -> int:
    """The steps one compiled call runs: the largest divisor of an epoch's up to MAX_STEPS_PER_CALL.
    One program then fits every epoch; a call of many steps spares the host a dispatch a step (which bounds
    a small network on a GPU); between calls the loop shows progress and can stop."""
    return max(k for k in range(1, MAX_STEPS_PER_CALL + 1) if steps % k == 0)


class Programs(NamedTuple):
    """A run's compiled programs, as the map atop the training section draws them."""
    init: jax.stages.Compiled
    steps: jax.stages.Compiled
    score: jax.stages.Compiled
    count: int  # the steps that one call of `steps` runs
    batch_size: int  # the images of each step


def compile_programs(config: TrainConfig, data: dict, mesh: Mesh, spec: Spec) -> Programs:
    """The three programs of a run (init, steps, score), compiled at once before its first step.
    Each is lowered from its arguments' shapes (the state's from init's outputs, the batches' from a
    plan) and compiled in a thread of its own: XLA compiles outside Python's lock."""
    replicated = NamedSharding(mesh, PartitionSpec())
    n, batch_size = len(data["x_train"]), config.batch_size
    steps = n // batch_size  # an epoch's
    count = steps_per_call(steps)
    initializer = state_initializer(config, steps * config.train_epochs, spec)
    init = jax.jit(initializer, out_shardings=replicated).lower(config.seed)
    state = init.out_info
    batches, offsets = (jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)
                        for a in plan_epoch(0, 0, n, batch_size))  # any plan has an epoch's shapes
    split = NamedSharding(mesh, PartitionSpec("batch"))
    steps_of_call = functools.partial(train_steps, count=count, pixel_max=spec.pixel_max, split=split)
    run_steps = jax.jit(steps_of_call, out_shardings=replicated).lower(
        state, jnp.zeros(()), data["x_train"], data["y_train"], batches, offsets, 0)
    scoring = jax.jit(functools.partial(score, pixel_max=spec.pixel_max), out_shardings=replicated).lower(
        state.average, data["x_test"], data["y_test"])
    lowered = {"init": init, "steps": run_steps, "score": scoring}
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
        compiling = {name: pool.submit(compile_program, program, name) for name, program in lowered.items()}
    return Programs(**{name: future.result() for name, future in compiling.items()}, count=count, batch_size=batch_size)


def compile_program(program: jax.stages.Lowered, name: str) -> jax.stages.Compiled:
    """The program compiled by XLA with the options that suit it (the README's "How it trains" has figures).
    On the CPU, the older loop emitters and LLVM's level 1 of 3, which suit programs compiled at each run's
    start: the matrix products, most of the work, come from a library LLVM does not compile. On a GPU,
    kernel autotuning for the training steps alone, which run thousands of times; init is not optimised."""
    options = {}
    if jax.default_backend() == "cpu":
        options = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}
    if name != "steps":
        options["xla_gpu_autotune_level"] = 0
    if name == "init":
        options["xla_backend_optimization_level"] = 0
    return program.compile(options)


def compile_scoring(function: Callable, spec: Spec, *args) -> jax.stages.Compiled:
    """score or class_probabilities compiled as train compiles score, so evaluate reports train's bits."""
    return compile_program(jax.jit(functools.partial(function, pixel_max=spec.pixel_max)).lower(*args), "score")


# ---------------- train: its config, its epochs, its checkpoint, its model, then the data it shares
def train(args: argparse.Namespace, log: logging.Logger) -> None:
    config = read_train_config(args.train_config)
    arrays, data_sha256, names = load_data_dir(args.data_dir)
    devices, process_0 = jax.devices(), jax.process_index() == 0  # one process writes for all
    check_fits(config, len(arrays["x_train"]), len(devices), args.train_config)
    log.info(f"read {args.train_config}: {json.dumps(dataclasses.asdict(config))}")
    log.info(f"training on {len(devices)} {jax.default_backend()} device(s) ({devices[0].device_kind}), "
             f"{len(arrays['x_train'])} images, {config.train_epochs} epochs")
    if process_0:
        os.makedirs(args.model_dir, exist_ok=True)  # open_log made log_dir
    with folder_lock(args.model_dir) if process_0 else contextlib.nullcontext():
        spec = spec_of(arrays)
        identity = {"architecture": architecture(spec), "input_shape": list(spec.image_shape),
                    "classes": spec.classes, "pixel_max": spec.pixel_max, "class_names": names,
                    "config": dataclasses.asdict(config), "data_sha256": data_sha256}
        run = TrainRun(config, spec, identity, args.model_dir, args.log_dir, process_0)
        state, history, compile_seconds = run_epochs(run, arrays, log)
        if process_0:
            write_model(run, len(arrays["x_train"]), state, history, compile_seconds, log)


def read_train_config(path: str) -> TrainConfig:
    """The training settings, or a CubeError naming the key and what it must be."""
    return train_config(read_yaml(path), path)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """train.yaml, checked, with every optional key resolved; keys without a default are required."""
    optimizer: str  # a key of OPTIMIZERS
    train_epochs: int
    batch_size: int
    learning_rate: float | None = None  # left out: the optimizer's peak rate for the batch size
    seed: int = 0
    target_accuracy: float | None = None  # stop after the first epoch that reaches it


# What a train.yaml value of each TrainConfig type may be (YAML writes 1 for 1.0), and its name in messages.
TYPES = {"str": (str, "a string"), "int": (int, "an integer"), "float": ((int, float), "a number")}
MAX_SEED = 2**31 - 2  # the programs take the seed, and seed + 1 for the data, as int32


def train_config(data: object, path: str) -> TrainConfig:
    """train.yaml's settings as read from `path` (a sweep's each trial's too), checked and resolved."""
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    required = [name for name, field in fields.items() if field.default is dataclasses.MISSING]
    config = check_keys(data, required, [name for name in fields if name not in required], path)
    for key, value in config.items():
        accepted, kind = TYPES[fields[key].type.removesuffix(" | None")]
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise CubeError(f"{path}: {key} must be {kind}, got {shorten(value)}")
    if config["optimizer"] not in OPTIMIZERS:
        raise CubeError(f"{path}: unknown optimizer {shorten(config['optimizer'])} (known: {', '.join(OPTIMIZERS)})")
    for key in ("learning_rate", "target_accuracy"):
        if key in config and not math.isfinite(config[key]):
            raise CubeError(f"{path}: {key} must be a finite number, got {config[key]!r}")
    for key in ("train_epochs", "batch_size", "learning_rate"):
        if key in config and config[key] <= 0:
            raise CubeError(f"{path}: {key} must be positive, got {shorten(config[key])}")
    if not 0 <= config.get("seed", 0) <= MAX_SEED:
        raise CubeError(f"{path}: seed must lie in 0..{MAX_SEED}, got {shorten(config['seed'])}")
    if not 0 < config.get("target_accuracy", 1) <= 1:
        raise CubeError(f"{path}: target_accuracy must lie in (0, 1], got {shorten(config['target_accuracy'])}")
    # The default rate: the optimizer's peak times sqrt(batch_size / 128), as noisier small batches want smaller steps
    peak_rate = OPTIMIZERS[config["optimizer"]][1] * (config["batch_size"] / 128) ** 0.5
    return TrainConfig(**{"learning_rate": peak_rate, **config})


MAX_STEPS = 2**31 - 1  # of a run: the optimizer's step counter is an int32


def check_fits(config: TrainConfig, n: int, devices: int, path: str) -> None:
    """The config's batches fit the data, the devices, and the step counter."""
    batch_size = config.batch_size
    if batch_size > n:
        raise CubeError(f"{path}: batch_size {batch_size} is larger than the {n} training images")
    if batch_size % devices:
        raise CubeError(f"{path}: batch_size {batch_size} does not split evenly over the "
                        f"{devices} devices; use a multiple of {devices}")
    if n // batch_size * config.train_epochs > MAX_STEPS:
        raise CubeError(f"{path}: train_epochs {config.train_epochs} makes more than {MAX_STEPS} steps, "
                        f"which the step counter cannot count; use at most {MAX_STEPS // (n // batch_size)}")


class TrainRun(NamedTuple):
    """One training run: its settings, data shape, identity, folders, and whether this process writes."""
    config: TrainConfig
    spec: Spec
    identity: dict  # what model.json records; a checkpoint of another run is refused
    model_dir: str | None  # None: no checkpoint (a sweep's trial)
    log_dir: str | None
    writes: bool  # in a run of several processes, process 0 alone writes
    on_epoch: Callable[[EpochMetrics], None] | None = None  # a sweep's trial reports each epoch to Optuna


@dataclasses.dataclass(frozen=True)
class EpochMetrics:
    """One epoch of a run: a line of log_dir/train_metrics.jsonl, and a row of the checkpoint's history.
    The checkpoint keeps the history so that a resumed run reports every epoch."""
    epoch: int
    train_loss: float  # the mean over the epoch's steps
    test_loss: float  # of the parameter average, as every test figure
    test_accuracy: float
    epoch_seconds: float
    elapsed_seconds: float  # the run's training time up to this epoch's end, compiling excluded

    def describe(self, epochs: int) -> str:
        return (f"epoch {self.epoch}/{epochs}: train_loss {self.train_loss:.4f}, test_loss {self.test_loss:.4f}, "
                f"test_accuracy {self.test_accuracy:.4f}, {self.epoch_seconds:.2f} s")


CHECKPOINT_NAME = "checkpoint.msgpack"  # in model_dir while a run is incomplete


def run_epochs(run: TrainRun, arrays: dict, log: logging.Logger) -> tuple[TrainState, list[EpochMetrics], float]:
    """The final state, the history (an EpochMetrics an epoch) and the compile seconds of a run."""
    config = run.config
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    replicated = NamedSharding(mesh, PartitionSpec())
    data = {key: global_array(value.astype(np.int32) if key[0] == "y" else value, replicated)
            for key, value in arrays.items()}  # on every device for the whole run, images as uint8
    steps = len(arrays["x_train"]) // config.batch_size
    data_seed = config.seed + 1  # for shuffling and shifting; the initialisation has its own stream
    started = time.perf_counter()
    programs = compile_programs(config, data, mesh, run.spec)
    compile_seconds = time.perf_counter() - started
    log.info(f"compiled in {compile_seconds:.2f} s ({programs.count} steps per call)")

    checkpoint = os.path.join(run.model_dir, CHECKPOINT_NAME) if run.model_dir else None  # a sweep trial: none
    state, history = resume(checkpoint, run.identity, programs.init(config.seed), log)
    if history:  # the restored state is on the host: put it where the fresh one would be
        state = jax.tree.map(lambda a: global_array(np.asarray(a), replicated), state)
    with recording_signals(lambda: f"stopped after epoch {len(history)}; run the same command again to finish"):
        for epoch in range(len(history) + 1, config.train_epochs + 1):
            if history and reached_target(config, history[-1]):
                break
            epoch_start = time.perf_counter()
            state, loss_sum = train_epoch(programs, state, data, data_seed, epoch)
            scores = programs.score(state.average, data["x_test"], data["y_test"])
            test_loss, test_accuracy = float(scores[0]), float(scores[1])  # waits for the epoch's last call
            epoch_seconds = time.perf_counter() - epoch_start
            history.append(EpochMetrics(
                epoch, float(loss_sum) / steps, test_loss, test_accuracy, epoch_seconds,
                (history[-1].elapsed_seconds if history else 0) + epoch_seconds))
            if run.writes:
                write_json(os.path.join(run.log_dir, "train_metrics.jsonl"), [dataclasses.asdict(m) for m in history],
                           lines=True)
                save_checkpoint(checkpoint, run.identity, state, history)
            log.info(history[-1].describe(config.train_epochs))
            if run.on_epoch:
                run.on_epoch(history[-1])
    return state, history, compile_seconds


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array placed on the sharding's devices, which may belong to other processes too."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def resume(path: str | None, identity: dict, state: TrainState, log: logging.Logger):
    """The state and history saved in the checkpoint of this same run, or a fresh start."""
    if path is None or not os.path.exists(path):
        return state, []
    start_over = f"delete {path} to start over"
    with open_regular(path) as f:
        blob = f.read(MAX_CHECKPOINT_BYTES + 1)
    if len(blob) > MAX_CHECKPOINT_BYTES:
        raise CubeError(f"{path}: larger than the {MAX_CHECKPOINT_BYTES} bytes a checkpoint may have; {start_over}")
    try:
        record = serialization.msgpack_restore(blob)
        saved = json.loads(record["run"])
        history = [EpochMetrics(**row) for row in json.loads(record["history"])]
        state = serialization.from_state_dict(state, record["state"])
    except Exception as e:  # msgpack and Flax raise many kinds for a damaged file
        raise CubeError(f"{path}: not a readable checkpoint ({type(e).__name__}); {start_over}") from None
    for key, value in identity.items():
        if saved.get(key) != value:
            raise CubeError(f"{path}: a checkpoint of another run (its {key} differs); {start_over}")
    log.info(f"resumed from {path} after epoch {len(history)}")
    return state, history


def reached_target(config: TrainConfig, metrics: EpochMetrics) -> bool:
    return config.target_accuracy is not None and metrics.test_accuracy >= config.target_accuracy


# Calls queued on the devices at most: enough to keep them busy; a stop waits for no more, and XLA's CPU
# backend, whose devices share the host's cores, never holds a long queue of programs with collectives.
MAX_IN_FLIGHT = 2


def train_epoch(programs: Programs, state: TrainState, data: dict, seed: int, epoch: int):
    """One epoch's calls of `steps`: the state after it and its summed training loss (on the device).
    The host queues at most MAX_IN_FLIGHT calls ahead, and stops between two of them."""
    plan = plan_epoch(seed, epoch, len(data["x_train"]), programs.batch_size)
    batches, offsets = (global_array(a, data["x_train"].sharding) for a in plan)  # replicated, as the data
    loss_sum = jnp.zeros(())
    steps, count = len(batches), programs.count
    in_flight = collections.deque()
    for first in range(0, steps, count):
        stop_if_signalled(f"stopped in epoch {epoch}; run the same command again to resume "
                          + (f"after epoch {epoch - 1}" if epoch > 1 else "from the start"))
        state, loss_sum = programs.steps(state, loss_sum, data["x_train"], data["y_train"], batches, offsets, first)
        in_flight.append(loss_sum)
        if len(in_flight) > MAX_IN_FLIGHT:
            in_flight.popleft().block_until_ready()
        if sys.stderr.isatty():  # a live step counter; nothing in logs, where the epoch lines say enough
            done = first + count
            sys.stderr.write(f"\repoch {epoch}: step {done}/{steps}" + ("\r\033[K" if done >= steps else ""))
    return state, loss_sum


def save_checkpoint(path: str, identity: dict, state: TrainState, history: list[EpochMetrics]) -> None:
    """Write the checkpoint: the state (parameters, average, optimizer, step) and the epochs so far.
    PRNG keys need no saving: an epoch's come from the seed and its number (plan_epoch)."""
    record = {"state": serialization.to_state_dict(state), "run": json.dumps(identity),
              "history": json.dumps([dataclasses.asdict(metrics) for metrics in history])}
    write_atomically(path, serialization.msgpack_serialize(record))


FEW_STEPS = 500  # a run of fewer optimizer steps says so when it ends


def write_model(run: TrainRun, n: int, state: TrainState, history: list[EpochMetrics], compile_seconds: float,
                log: logging.Logger) -> None:
    """params.msgpack (the parameter average), model.json, the curves; the checkpoint is removed."""
    config, last = run.config, history[-1]
    reached = reached_target(config, last)
    if reached:
        log.info(f"reached target_accuracy {config.target_accuracy} after {len(history)} epochs, "
                 f"{last.elapsed_seconds:.2f} s")
    write_atomically(os.path.join(run.model_dir, "params.msgpack"), serialization.to_bytes(state.average))
    steps = n // config.batch_size * len(history)  # the last partial batch of each epoch is dropped
    if steps < FEW_STEPS and not reached:
        log.info(f"trained {steps} steps in all, few for a network to settle: more epochs, or a smaller "
                 "batch_size, give it more")
    summary = {
        **run.identity,  # the architecture, the data's shape and classes, the config, the data's SHA-256
        "test_accuracy": last.test_accuracy, "test_loss": last.test_loss,
        "epochs_run": len(history), "time_to_target_seconds": last.elapsed_seconds if reached else None,
        "train_seconds": last.elapsed_seconds, "compile_seconds": compile_seconds,
        "images_per_second": steps * config.batch_size / last.elapsed_seconds,
        "resizing": RESIZING,  # how download's image_size and infer bring an image to input_shape
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "versions": {"jax": jax.__version__, "flax": version("flax"), "optax": optax.__version__},
        **provenance(),
    }
    write_json(os.path.join(run.model_dir, "model.json"), summary)
    save_plot(os.path.join(run.log_dir, "training_curves.png"), draw_curves(history), log)
    os.unlink(os.path.join(run.model_dir, CHECKPOINT_NAME))  # the run is complete: a rerun starts afresh
    log.info(f"written {run.model_dir}/params.msgpack and model.json: test_accuracy {last.test_accuracy:.4f}")


def provenance() -> dict:
    """The image that ran the task, as outputs record it: its ID and the SHA-256 of each of its sources.
    The ID is MNIST_IMAGE, which our runners set and MLCube's do not; the digests, {file: SHA-256} from
    the sha256sum lines its build recorded at MNIST_IMAGE_SOURCES, name the code under any runner (the
    runners' rebuild check compares them). Both None outside an image."""
    sources, path = None, os.environ.get("MNIST_IMAGE_SOURCES")
    with contextlib.suppress(OSError, UnicodeDecodeError, CubeError):
        if path:
            with open_regular(path) as f:
                pairs = [line.split(None, 1) for line in f.read(MAX_CONFIG_BYTES).decode().splitlines()]
            sources = {pair[1]: pair[0] for pair in pairs if len(pair) == 2}
    return {"image": os.environ.get("MNIST_IMAGE") or None, "image_sources": sources}


def draw_curves(history: list[EpochMetrics]):
    """Loss and accuracy per epoch, side by side."""
    def draw(figure) -> None:
        epochs = [m.epoch for m in history]
        loss, accuracy = figure.subplots(1, 2)
        loss.plot(epochs, [m.train_loss for m in history], "o-", label="train")
        loss.plot(epochs, [m.test_loss for m in history], "o-", label="test")
        accuracy.plot(epochs, [100 * m.test_accuracy for m in history], "o-", color="C1")
        for axes, title in ((loss, "loss"), (accuracy, "test accuracy (%)")):
            axes.set(title=title, xlabel="epoch", xticks=epochs)
        loss.legend()
    return draw


def save_plot(path: str, draw, log: logging.Logger) -> None:
    """Draw a figure with `draw(figure)` and write it as a PNG, when matplotlib is installed.
    A bare Figure, not pyplot: no display and no global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.info(f"no {os.path.basename(path)}: matplotlib, which requirements.txt names, is not installed")
        return
    figure = Figure(figsize=(9, 4))
    draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    write_atomically(path, buffer.getvalue())
    log.info(f"written {path}")


def load_data_dir(data_dir: str) -> tuple[dict[str, np.ndarray], str, list[str] | None]:
    """data_dir's arrays, their npz's SHA-256, and the class names data.yaml gave (or None).
    The npz is read up to MAX_DATA_BYTES, or up to the larger size: that download recorded."""
    record_path = os.path.join(data_dir, RECORD_NAME)
    record = read_record(record_path)
    recorded = record.get("bytes")
    limit = max(MAX_DATA_BYTES, recorded if isinstance(recorded, int) and recorded <= MAX_DECLARED_BYTES else 0)
    path = os.path.join(data_dir, NPZ_NAME)
    if not os.path.lexists(path):
        raise CubeError(f"{path}: no such file; run the download task first")
    arrays, digest = load_mnist(path, limit=limit)
    names, classes = record.get("class_names"), spec_of(arrays).classes
    if names is not None and (not isinstance(names, list) or len(names) != classes):
        raise CubeError(f"{record_path}: class_names lists {shorten(names)}, but the data has {classes} classes; "
                        "give data.yaml's classes: one name a class, and download again")
    return arrays, digest, names


def read_record(path: str) -> dict:
    """A JSON object an earlier run wrote (download.json, sweep.json); {} when there is none or it is unreadable."""
    try:
        with open_regular(path) as f:
            record = json.loads(f.read(MAX_CONFIG_BYTES))
    except (OSError, ValueError, CubeError):
        return {}
    return record if isinstance(record, dict) else {}


def load_mnist(path: str, where: str | None = None, limit: int | None = None) -> tuple[dict[str, np.ndarray], str]:
    """An npz's four arrays, checked, and its SHA-256: at most `limit` bytes; messages name `where`."""
    where = where or path
    arrays, digest = read_npz(path, ARRAYS, limit or MAX_DATA_BYTES, where)
    return check_data(arrays, where), digest


def check_data(arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The arrays, if they make an image classification data set; a CubeError naming the fault if not.
    Images: uint8 N×H×W (grey) or N×H×W×C (C = 1 is grey, or 3 or more), one shape in train and test.
    Labels: integers 0..K-1, K ≥ 2, each class among the training labels (a gap means a mislabelled set)."""
    shape = arrays["x_train"].shape[1:]
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or not len(x) or x.shape[3:] == (2,):
            raise CubeError(f"{where}: x_{split} must be uint8 images N×H×W, or N×H×W×C with C = 1 or 3 or more, "
                            f"found {x.dtype} {'×'.join(map(str, x.shape))}")
        if x.shape[1:] != shape:
            raise CubeError(f"{where}: x_test's images are {'×'.join(map(str, x.shape[1:]))}, x_train's "
                            f"{'×'.join(map(str, shape))}; train and test must have one shape")
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise CubeError(f"{where}: y_{split} must be {len(x)} integer labels (one per image), "
                            f"found {y.dtype} {'×'.join(map(str, y.shape))}")
        if y.min() < 0:
            raise CubeError(f"{where}: y_{split} labels must be 0 or more, found {y.min()}")
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    classes = int(y_train.max()) + 1
    if classes < 2:
        raise CubeError(f"{where}: y_train holds one class only; a classifier needs two at least")
    absent = sorted(set(range(classes)) - set(np.unique(y_train).tolist()))
    if absent:
        raise CubeError(f"{where}: y_train labels must be 0..{classes - 1}, each present, but "
                        f"{', '.join(map(str, absent[:5]))}{', ...' if len(absent) > 5 else ''} never appear")
    if y_test.max() >= classes:
        raise CubeError(f"{where}: y_test has label {y_test.max()}, which no training image has (0..{classes - 1})")
    return arrays


# ---------------------------------------- evaluate: the model and the test images, scored and drawn
MISTAKES_SHOWN = 36  # the most confident mistakes that evaluate lists and draws
MODEL_FILES = ("model.json", "params.msgpack")  # what train writes in model_dir, and evaluate and infer read
COUNTS_SHOWN = 20  # classes up to which the confusion matrix writes its counts; beyond, colour alone


def evaluate(args: argparse.Namespace, log: logging.Logger) -> None:
    params, spec, summary = load_model(args.model_dir)
    arrays, data_sha256, _ = load_data_dir(args.data_dir)
    data, npz = spec_of(arrays), os.path.join(args.data_dir, NPZ_NAME)
    if data.image_shape != spec.image_shape:
        raise CubeError(f"{npz}: its images are {'×'.join(map(str, data.image_shape))}, but the model was "
                        f"trained on {'×'.join(map(str, spec.image_shape))}")
    if data.classes > spec.classes:
        raise CubeError(f"{npz}: its labels run to {data.classes - 1}, but the model knows classes "
                        f"0..{spec.classes - 1}")
    labels = arrays["y_test"].astype(np.int32)
    scoring = compile_scoring(score, spec, params, arrays["x_test"], labels)
    loss, accuracy, predicted = scoring(params, arrays["x_test"], labels)
    predicted = np.asarray(predicted)
    confusion = np.zeros((spec.classes, spec.classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = np.zeros(0)  # the probability the model gave each wrong answer: the mistakes alone are scored again
    if len(wrong):
        images = arrays["x_test"][wrong]
        probabilities = np.asarray(compile_scoring(class_probabilities, spec, params, images)(params, images))
        confidence = probabilities[np.arange(len(wrong)), predicted[wrong]]
    mistakes = most_confident_mistakes(wrong, confidence, labels, predicted)
    metrics = {
        "test_accuracy": float(accuracy), "test_loss": float(loss), "images": len(labels),
        "per_class_accuracy": [float(c) for c in confusion.diagonal() / np.maximum(confusion.sum(1), 1)],
        "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted class
        "mistakes": len(wrong), "mistakes_shown": mistakes,  # as mistakes.png draws them
        "data_sha256": data_sha256, **provenance(),
    }
    write_json(os.path.join(args.log_dir, "evaluate_metrics.json"), metrics)
    same = (metrics["test_accuracy"], metrics["test_loss"]) == (summary["test_accuracy"], summary["test_loss"])
    log.info(f"test_accuracy {metrics['test_accuracy']:.4f}, test_loss {metrics['test_loss']:.4f} on "
             f"{len(labels)} images: {'the same as' if same else 'different from'} what train recorded")
    log.info(f"written {args.log_dir}/evaluate_metrics.json")
    names = summary.get("class_names") or [str(k) for k in range(spec.classes)]
    save_plot(os.path.join(args.log_dir, "confusion_matrix.png"), draw_confusion(confusion, names), log)
    save_plot(os.path.join(args.log_dir, "mistakes.png"),
              draw_mistakes(arrays["x_test"], mistakes, metrics["mistakes"], names), log)


def load_model(model_dir: str) -> tuple[dict, Spec, dict]:
    """The parameters, Spec and model.json that train wrote, checked against this file's CNN.
    Both are read under model_dir's shared lock, so they come from one run while another replaces them."""
    summary_path = os.path.join(model_dir, MODEL_FILES[0])
    params_path = os.path.join(model_dir, MODEL_FILES[1])
    try:
        with folder_lock(model_dir, shared=True), open_regular(summary_path) as f:
            summary = json.loads(f.read(MAX_CONFIG_BYTES))
            with open_regular(params_path) as g:
                blob = g.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError as e:
        raise CubeError(f"{e.filename}: no such file; run the train task first") from None
    except (OSError, ValueError) as e:
        raise CubeError(f"{summary_path}: not a readable model.json ({shorten(str(e), 120, quoted=False)})") from None
    if len(blob) > MAX_PARAMS_BYTES:
        raise CubeError(f"{params_path}: larger than the {MAX_PARAMS_BYTES} bytes parameters may have")
    spec = model_spec(summary, summary_path)
    template = jax.eval_shape(lambda: init_params(jax.random.key(0), spec))  # shapes only: nothing runs
    built = architecture(spec)
    try:
        params = serialization.from_bytes(template, blob)
        same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, template, params)
    except Exception as e:  # msgpack and Flax raise many kinds for a damaged file
        raise CubeError(f"{params_path}: not parameters of {built} ({type(e).__name__}: {e})") from None
    if not all(jax.tree.leaves(same)):
        raise CubeError(f"{params_path}: its arrays do not fit {built}; retrain with this version")
    return params, spec, summary


def model_spec(summary: object, path: str) -> Spec:
    """The Spec that model.json records, checked: this mnist.py builds the architecture it names."""
    retrain = "retrain, or restore the model.json written with params.msgpack"
    if not isinstance(summary, dict):
        raise CubeError(f"{path}: not a model.json (a JSON object); {retrain}")
    missing = [key for key in ("input_shape", "classes", "pixel_max", "test_accuracy", "test_loss")
               if key not in summary]
    if missing:
        raise CubeError(f"{path}: missing {', '.join(missing)}, which train writes; {retrain}")
    shape, classes, pixel_max = summary["input_shape"], summary["classes"], summary["pixel_max"]
    valid_shape = isinstance(shape, list) and len(shape) in (2, 3) and all(whole(n, 1, 1 << 16) for n in shape)
    if not (valid_shape and whole(classes, 2, 1 << 16) and whole(pixel_max, 1, 255)):
        raise CubeError(f"{path}: input_shape {shorten(shape)}, classes {shorten(classes)} or pixel_max "
                        f"{shorten(pixel_max)} is not what train writes; {retrain}")
    spec = Spec(tuple(shape), classes, pixel_max)
    if summary.get("architecture") != architecture(spec):
        raise CubeError(f"{path}: written for architecture {shorten(summary.get('architecture'))}, but this "
                        f"mnist.py builds {architecture(spec)!r}; retrain with this version")
    return spec


def class_probabilities(params, images: jax.Array, pixel_max: int) -> jax.Array:
    """Each image's probability of each class."""
    return jax.nn.softmax(predict_all(params, images, pixel_max))


def most_confident_mistakes(wrong: np.ndarray, confidence: np.ndarray, labels: np.ndarray,
                            predicted: np.ndarray) -> list[dict]:
    """The MISTAKES_SHOWN most confident mistakes: each one's index, classes true and predicted, probability.
    `wrong` holds the misclassified images' indices, `confidence` the probability of each wrong answer."""
    order = np.argsort(-confidence, kind="stable")[:MISTAKES_SHOWN]
    return [{"index": int(wrong[k]), "true": int(labels[wrong[k]]), "predicted": int(predicted[wrong[k]]),
             "probability": round(float(confidence[k]), 4)} for k in order]


def draw_confusion(confusion: np.ndarray, names: list[str]):
    """The confusion matrix, sized to its classes: counts up to COUNTS_SHOWN of them, 50 names at most."""
    def draw(figure) -> None:
        classes = len(confusion)
        figure.set_size_inches(max(9, classes / 4), max(4, classes / 4))
        axes = figure.subplots()
        axes.imshow(np.log1p(confusion), cmap="Blues")
        if classes <= COUNTS_SHOWN:
            for (true, guess), count in np.ndenumerate(confusion):
                axes.text(guess, true, count, ha="center", va="center", fontsize=7,
                          color="white" if true == guess else "black")
        ticks = range(0, classes, -(-classes // 50))
        axes.set(xlabel="predicted class", ylabel="true class", xticks=ticks, yticks=ticks,
                 xticklabels=[names[k] for k in ticks], yticklabels=[names[k] for k in ticks],
                 title="confusion matrix (test images)")
        axes.tick_params(axis="x", labelrotation=90 if max(map(len, names)) > 2 else 0)
    return draw

def draw_mistakes(images: np.ndarray, mistakes: list[dict], total: int, names: list[str]):
    """The mistakes listed as a grid, each captioned true → predicted (probability); or a note of none."""
    def draw(figure) -> None:
        if not mistakes:
            figure.text(0.5, 0.5, "no mistakes: every test image is classified correctly", ha="center", fontsize=14)
            return
        columns = min(len(mistakes), 9)
        rows = -(-len(mistakes) // columns)
        figure.set_size_inches(1.4 * columns, 1.6 * rows + 0.5)
        for k, mistake in enumerate(mistakes):
            axes = figure.add_subplot(rows, columns, k + 1)
            image = images[mistake["index"]]
            colour = image.ndim == 3 and image.shape[2] >= 3  # shown as it is, its first three channels as RGB
            axes.imshow(image[..., :3] if colour else image.squeeze(), cmap=None if colour else "gray_r")
            axes.set_title(f"{names[mistake['true']]} → {names[mistake['predicted']]} "
                           f"({100 * mistake['probability']:.1f}%)", fontsize=10)
            axes.set_axis_off()
        shown = f"the {len(mistakes)} most confident of {total}" if len(mistakes) < total else f"all {total}"
        figure.suptitle(f"{shown} mistakes: true → predicted (probability)")
    return draw


# ------------------------------------ sweep: many trainings as one Optuna study, shared by its workers
# sweep_dir holds the study (Optuna's journal, for many processes on a shared file system), a lock for
# claiming trials, and a part file (open_part) for each running trial, whose lock says its worker lives.
VALIDATION_SEED = 0  # splits the training images into the part trials train on and the validation part
MAX_TRIALS = 10_000
JOURNAL_NAME = "journal.log"
PLOTS = ("optimization_history", "slice", "param_importances")  # Optuna's plot_NAME, saved as NAME.png


def sweep(args: argparse.Namespace, log: logging.Logger) -> None:
    import optuna  # here alone, so that no other task waits for its import
    config, where = read_sweep_config(args.sweep_config), f"{args.sweep_config}: train"
    arrays, _, _ = load_data_dir(args.data_dir)
    parts, spec = validation_split(arrays, config["validation_fraction"], args.sweep_config), spec_of(arrays)
    for settings in corners(config["train"]):
        check_fits(train_config(settings, where), len(parts["x_train"]), jax.device_count(), where)
    os.makedirs(args.sweep_dir, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep logs a line a trial itself
    claims, journal = WaitingLock(os.path.join(args.sweep_dir, LOCK_NAME)), os.path.join(args.sweep_dir, JOURNAL_NAME)
    try:
        with claims:
            study = open_study(journal)
        log.info(f"read {args.sweep_config}: {config['trials']} trials, training on {len(parts['x_train'])} images, "
                 f"choosing on {len(parts['x_test'])} held out of them")
        while claimed := claim_trial(study, config["trials"], claims, args.sweep_dir, log):
            try:
                run_trial(study, claimed[0], config["train"], parts, spec, claims, args.sweep_dir, log)
            finally:  # told or not, the trial is no longer this worker's
                os.unlink(claimed[1].name)
                claimed[1].close()
        with claims:
            told = read_record(os.path.join(args.sweep_dir, "sweep.json")).get("trials")
            if finished(study, config["trials"]) and told != len(study.get_trials(deepcopy=False)):
                finish(study, config["train"], {**parts, "x_test": arrays["x_test"], "y_test": arrays["y_test"]},
                       spec, args.sweep_dir, log)
    except json.JSONDecodeError as e:  # Optuna reads the journal as JSON lines
        raise CubeError(f"{journal}: not an Optuna journal ({e.msg}); move it away to start the study afresh") from None


def read_sweep_config(path: str) -> dict:
    """sweep.yaml, its shape checked; sweep then checks every trial it can make as a train.yaml (corners)."""
    config = check_keys(read_yaml(path), ["trials", "train"], ["validation_fraction"], path)
    trials, fraction = config["trials"], config.setdefault("validation_fraction", 0.1)
    if not whole(trials, 1, MAX_TRIALS):
        raise CubeError(f"{path}: trials must be an integer in 1..{MAX_TRIALS}, got {shorten(trials)}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise CubeError(f"{path}: validation_fraction must be a number between 0 and 1, got {shorten(fraction)}")
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    for key, value in check_keys(config["train"], [], fields, f"{path}: train").items():
        where = f"{path}: train: {key}"
        if isinstance(value, list) and (not value or any(isinstance(v, (list, dict)) for v in value)):
            raise CubeError(f"{where}: a list is a choice of one value or more, got {shorten(value)}")
        if isinstance(value, dict):
            low, high = check_keys(value, ["low", "high"], ["log"], where)["low"], value["high"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
                raise CubeError(f"{where}: low and high must be numbers, low below high, got {low!r} and {high!r}")
            if value.get("log", False) not in (True, False) or value.get("log") and low <= 0:
                raise CubeError(f"{where}: log must be true or false, and true only for a positive low")
    return config


def validation_split(arrays: dict, fraction: float, where: str) -> dict:
    """The training images in two, the same on every run: the trials' training part and validation part,
    as x_train, y_train and x_test, y_test, so that run_epochs scores the validation part each epoch."""
    n = len(arrays["x_train"])
    held = max(1, round(n * fraction))
    if held >= n:
        raise CubeError(f"{where}: validation_fraction {fraction} leaves none of the {n} training images to train on")
    order = np.random.default_rng(VALIDATION_SEED).permutation(n)
    train, validation = np.sort(order[held:]), np.sort(order[:held])
    return {"x_train": arrays["x_train"][train], "y_train": arrays["y_train"][train],
            "x_test": arrays["x_train"][validation], "y_test": arrays["y_train"][validation]}


def corners(train: dict) -> list[dict]:
    """Trials' settings that between them take every choice and both ends of every range."""
    ends = {}
    for key, value in train.items():  # a choice's values, a range's two ends, or the one value
        if isinstance(value, dict):
            ends[key] = [value["low"], value["high"]]
        else:
            ends[key] = value if isinstance(value, list) else [value]
    first = {key: values[0] for key, values in ends.items()}
    return [first] + [{**first, key: end} for key, values in ends.items() for end in values[1:]]


@dataclasses.dataclass
class WaitingLock:
    """An OS lock on the file at `path`, waited for, that dies with its process.
    Optuna's journal lock (acquire, release), and the lock that claims trials (a `with` block)."""
    path: str

    def acquire(self) -> bool:
        self.fd = open_lock_file(self.path, shared=False)
        while True:
            with contextlib.suppress(BlockingIOError, PermissionError):
                lock(self.fd, shared=False)
                return True
            time.sleep(0.01)

    def release(self, *exception) -> None:
        os.close(self.fd)

    __enter__, __exit__ = acquire, release


def open_study(journal: str):
    """The study in the journal file at `journal`, made if new. Optuna opens the file as it finds it, so a
    link or a FIFO there is refused first (ELOOP: os_fault's line; a FIFO: regular's)."""
    import optuna
    os.close(regular(os.open(journal, os.O_RDWR | os.O_CREAT | NO_FOLLOW | NO_WAIT, 0o666), journal, "remove it"))
    lock_file = os.path.join(os.path.dirname(journal), ".journal.lock")
    backend = optuna.storages.journal.JournalFileBackend(journal, WaitingLock(lock_file))
    return optuna.create_study(study_name="sweep", storage=optuna.storages.JournalStorage(backend),
                               direction="maximize", pruner=optuna.pruners.MedianPruner(), load_if_exists=True)


def claim_trial(study, trials: int, claims: WaitingLock, sweep_dir: str, log: logging.Logger):
    """A new trial and the part file whose lock marks it this worker's; None when none is left to start.
    A running trial whose lock is free is a stopped worker's: marked FAIL, its parameters queued again."""
    from optuna.trial import TrialState
    with claims:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in list(running):
            name = os.path.basename(trial.user_attrs.get("lock", ""))
            with contextlib.suppress(BlockingIOError, PermissionError):  # held: its worker lives
                if PART.fullmatch(name):
                    with contextlib.suppress(FileNotFoundError):  # removed by a task's clean-up (main)
                        remove_unheld(os.path.join(sweep_dir, name))
                study.tell(trial.number, state=TrialState.FAIL)
                running.remove(trial)
                if "retry_of" in trial.user_attrs:  # a second death: these settings may be what kills
                    log.info(f"trial {trial.number}: its worker is gone again; marked FAIL, not queued again")
                    continue
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                log.info(f"trial {trial.number}: its worker is gone; marked FAIL, its parameters queued again")
        if finished(study, trials, len(running)):
            return None
        trial = study.ask()
        held = open_part(sweep_dir, f"trial-{trial.number}")
        trial.set_user_attr("lock", os.path.basename(held.name))
        return trial, held


def finished(study, trials: int, running: int = 0) -> bool:
    """Whether the study's COMPLETE and PRUNED trials, and `running` ones, make `trials`."""
    states = [trial.state.name for trial in study.get_trials(deepcopy=False)]
    return states.count("COMPLETE") + states.count("PRUNED") + running >= trials


def run_trial(study, trial, train: dict, parts: dict, spec: Spec, claims: WaitingLock, sweep_dir: str,
              log: logging.Logger) -> None:
    """Train a trial's settings as train does, tell the study the outcome, and write the results.
    Scored on the validation part each epoch, the trial is pruned when it trails."""
    import optuna
    settings = dict(train)  # a list's choice and a range's draw replaced by the trial's values
    for key, value in train.items():
        if isinstance(value, list):
            settings[key] = trial.suggest_categorical(key, value)
        elif isinstance(value, dict) and TrainConfig.__annotations__[key] == "int":
            settings[key] = trial.suggest_int(key, **value)
        elif isinstance(value, dict):
            settings[key] = trial.suggest_float(key, **value)

    def report(metrics: EpochMetrics) -> None:
        trial.report(metrics.test_accuracy, metrics.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned
    try:
        value = train_part(train_config(settings, "sweep"), parts, spec, log, report)
    except optuna.TrialPruned:
        value = None
    with claims:
        study.tell(trial, value, state=optuna.trial.TrialState.PRUNED if value is None else None)
        write_results(study, train, sweep_dir)
    done = study.get_trials(deepcopy=False)[trial.number]
    log.info(f"trial {trial.number}: {done.state.name}, validation accuracy by epoch "
             f"{', '.join(f'{a:.4f}' for a in done.intermediate_values.values())}; {trial.params}")


def train_part(config: TrainConfig, arrays: dict, spec: Spec, log: logging.Logger, on_epoch=None) -> float:
    """The last epoch's test_accuracy of a run as train's, on `arrays`; it writes nothing, logs no epoch."""
    quiet = log.getChild("trial")
    quiet.setLevel(logging.WARNING)
    run = TrainRun(config, spec, {}, None, None, False, on_epoch)  # no checkpoint: no identity to match
    return run_epochs(run, arrays, quiet)[1][-1].test_accuracy


def write_results(study, train: dict, sweep_dir: str, comment: str = "") -> None:
    """trials.csv, a row a trial, and best.yaml, the best trial's settings as a train.yaml."""
    import csv
    trials, table = study.get_trials(deepcopy=False), io.StringIO()
    names = [key for key, value in train.items() if isinstance(value, (list, dict))]
    epochs = range(1, max(max(trial.intermediate_values, default=0) for trial in trials) + 1)
    rows = csv.writer(table, lineterminator="\n")
    rows.writerow(["number", "state", *names, *(f"validation_accuracy_{e}" for e in epochs), "validation_accuracy",
                   "seconds"])
    for t in trials:
        accuracies = [t.intermediate_values.get(e) for e in epochs] + [t.value]
        rows.writerow([t.number, t.state.name, *(t.params.get(name) for name in names),
                       *("" if a is None else f"{a:.4f}" for a in accuracies),
                       f"{t.duration.total_seconds():.1f}" if t.duration else ""])
    write_atomically(os.path.join(sweep_dir, "trials.csv"), table.getvalue().encode())
    if any(trial.state.name == "COMPLETE" for trial in trials):
        best = study.best_trial
        write_atomically(os.path.join(sweep_dir, "best.yaml"), (
            f"# trial {best.number} of the sweep: validation accuracy {best.value:.4f}{comment}\n"
            + yaml.safe_dump(settings_of(best, train), sort_keys=False)
        ).encode())


def settings_of(trial, train: dict) -> dict:
    """A finished trial's settings as a train.yaml: sweep.yaml's fixed values and the trial's choices."""
    return {key: trial.params.get(key, value) for key, value in train.items()}


def finish(study, train: dict, arrays: dict, spec: Spec, sweep_dir: str, log: logging.Logger) -> None:
    """Measure the best trial's test accuracy once, write it to best.yaml and sweep.json, then the pictures.
    The measure is the trial's run again (training is deterministic), scored on the test images."""
    best, settings = study.best_trial, settings_of(study.best_trial, train)
    test_accuracy = train_part(train_config(settings, "best.yaml"), arrays, spec, log)
    write_results(study, train, sweep_dir, f"; test accuracy {test_accuracy:.4f}, measured once, after the "
                  "sweep chose it")
    write_json(os.path.join(sweep_dir, "sweep.json"), {
        "best_trial": best.number, "settings": settings, "validation_accuracy": best.value,
        "test_accuracy": test_accuracy, "trials": len(study.get_trials(deepcopy=False))})
    log.info(f"best: trial {best.number}, validation accuracy {best.value:.4f}, test accuracy {test_accuracy:.4f} "
             f"(measured once); written {sweep_dir}/best.yaml")
    import matplotlib
    matplotlib.use("Agg")  # files, no display
    from matplotlib import pyplot
    from optuna.visualization import matplotlib as plots
    for name in PLOTS:
        try:
            with warnings.catch_warnings(action="ignore"):  # Optuna calls its matplotlib plots experimental
                figure = np.ravel(getattr(plots, f"plot_{name}")(study, target_name="validation accuracy"))[0].figure
        except (ValueError, RuntimeError) as e:  # importances, say, of too few trials
            log.info(f"no {name}.png: {e}")
            continue
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        pyplot.close(figure)
        write_atomically(os.path.join(sweep_dir, f"{name}.png"), buffer.getvalue())
    log.info(f"written {sweep_dir}/{', '.join(PLOTS)} as PNG")


# --------------------------------------------------- infer: any number of images, a batch at a time
INFER_BATCH = 10 * SCORE_BATCH  # images that infer reads, scores and writes at a time: its memory stays flat
PREDICTIONS_START = b'{"images": '  # how infer's output begins: the only existing file it replaces


def infer(args: argparse.Namespace, log: logging.Logger) -> None:
    model_files = [os.path.join(args.model_dir, name) for name in MODEL_FILES]
    check_replaceable(args.predictions, [args.images, *model_files])
    params, spec, _ = load_model(args.model_dir)
    os.makedirs(os.path.dirname(os.path.abspath(args.predictions)), exist_ok=True)
    with (image_batches(args.images, INFER_BATCH, spec.image_shape) as (count, batches, names),
          atomic_writer(args.predictions) as write):
        size = min(INFER_BATCH, count)  # every call the same shape: one program
        classify = compile_scoring(class_probabilities, spec, params,
                                   jax.ShapeDtypeStruct((size, *spec.image_shape), np.uint8))
        write(PREDICTIONS_START + to_json(args.images, None) + b', "predictions": [')
        for i, images in enumerate(batches):
            padded = np.pad(images, ((0, size - len(images)), *[(0, 0)] * len(spec.image_shape)))
            probabilities = np.asarray(classify(params, padded))[:len(images)]
            rows = [{"class": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probabilities]
            if names:  # image files: each row names its file
                rows = [{"file": name, **row} for name, row in zip(names[i * INFER_BATCH:], rows, strict=False)]
            write((b", " if i else b"") + b", ".join(to_json(row, None) for row in rows))
        write(b"]}")
    log.info(f"classified {count} images from {args.images}; written {args.predictions}")


def check_replaceable(path: str, inputs: list[str]) -> None:
    """Refuse a `path` infer may not replace: one of its inputs, or a file other than earlier predictions."""
    if not os.path.lexists(path):
        return
    for given in inputs:
        if os.path.realpath(path) == os.path.realpath(given):
            raise CubeError(f"{path}: is one of infer's inputs ({given}); give --predictions another path")
    if os.path.isdir(path):
        raise CubeError(f"{path}: is a folder where a file is expected; give --predictions a file's path")
    with reading(path, "readable"), open_regular(path) as f:
        start = f.read(len(PREDICTIONS_START))
    if start != PREDICTIONS_START:
        raise CubeError(f"{path}: already exists and is not a predictions file that infer wrote; move it "
                        "away or give --predictions another path")


@contextlib.contextmanager
def image_batches(path: str, batch: int, image_shape: tuple[int, ...]):
    """The images at `path`: their count, an iterator over them `batch` at a time, and image files' names.
    A .npy, an .npz (its one array, or x_test) or an IDX file (gzipped or not) gives no names: None."""
    if os.path.isdir(path) or path.lower().endswith(IMAGE_SUFFIXES):
        names = image_file_names(path)
        yield len(names), image_file_batches(path, names, batch, image_shape), names
        return
    with contextlib.ExitStack() as stack:
        with reading(path, "readable images"):
            f = open_maybe_gzipped(stack, path, path)
            start = f.read(6)
            f.seek(0)
            if start.startswith(b"PK"):  # a zip, so an .npz: the format is told by the first bytes, not the name
                archive = stack.enter_context(zipfile.ZipFile(f))
                arrays = [name.removesuffix(".npy") for name in archive.namelist()]
                member = arrays[0] if len(arrays) == 1 else "x_test"
                if member not in arrays:
                    held = f"holds {shorten(', '.join(arrays), quoted=False)}" if arrays else "holds no arrays"
                    raise CubeError(f"{path}: {held}; expected one array, or x_test")
                f = stack.enter_context(archive.open(member + ".npy"))
            if start.startswith((b"PK", b"\x93NUMPY")):
                shape, dtype = npy_header(f, path)
            elif start.startswith(b"\0\0\x08"):
                shape, dtype = read_idx_header(f, path), "uint8"
            else:
                raise CubeError(f"{path}: not images infer reads (a .npy, an .npz or an IDX file, gzipped or not, "
                                f"or image files: a folder of them, or one ending in {', '.join(IMAGE_SUFFIXES)})")
        one = "×".join(map(str, image_shape))
        if dtype != "uint8" or (shape[1:] != image_shape and shape != image_shape):
            raise CubeError(f"{path}: expected uint8 images N×{one} or one {one} (as the model was trained on), "
                            f"found {dtype} {'×'.join(map(str, shape))}")
        count = 1 if shape == image_shape else shape[0]
        yield count, read_batches(f, count, batch, path, image_shape), None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # what infer reads as images


def image_file_names(path: str) -> list[str]:
    """The image files infer classifies: a folder's (IMAGE_SUFFIXES, in walk_files' order), or the one."""
    if not os.path.isdir(path):
        return [os.path.basename(path)]
    names = [name for name, _ in walk_files(path) if name.lower().endswith(IMAGE_SUFFIXES)]  # OSError: outcome's line
    if not names:
        raise CubeError(f"{path}: holds no image files")
    return names


def image_file_batches(path: str, names: list[str], batch: int, image_shape: tuple[int, ...]):
    """The image files `names`, decoded and resized as download does them, `batch` at a time."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for first in range(0, len(names), batch):
        images = []
        for name in names[first:first + batch]:
            file = os.path.join(folder, *name.split("/"))
            with reading(file, "a readable image file"), open_regular(file) as f:
                data = f.read(MAX_DATA_BYTES + 1)
            if len(data) > MAX_DATA_BYTES:
                raise CubeError(f"{file}: larger than the {MAX_DATA_BYTES} bytes an image file may have")
            pixels = decode_image(data, image_shape[:2], MAX_DATA_BYTES, file)
            images.append(in_channels(pixels, image_shape))
        yield np.stack(images)


RESIZING = "bilinear stretch"  # how decode_image brings an image to another size
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")  # what Pillow may read a file as


def decode_image(data: bytes, size: tuple[int, int] | None, budget: int, where: str) -> np.ndarray:
    """One image file as 8-bit grey (H×W) or colour (H×W×3) pixels, resized to `size` if given.
    Resizing stretches the whole image bilinearly, as Keras's image_dataset_from_directory does: a crop
    could cut the object out. A file declaring more pixels than `budget` bytes hold, or more than Pillow
    deems safe (a decompression bomb), is refused before it is decoded."""
    from PIL import Image  # here alone: the other tasks, and --help, start without it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width * height * 3 > budget:  # its pixels in colour, before a byte is decoded
                    raise Image.DecompressionBombError(f"{width}×{height} pixels")
                pixels = eight_bit(image)
                if size and pixels.shape[:2] != size:
                    pixels = np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.Resampling.BILINEAR))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise CubeError(f"{where}: declares more pixels than the data set may have ({shorten(str(e), 80, False)}); "
                        "a decompression bomb, or an image far too large") from None
    except Image.UnidentifiedImageError:
        raise CubeError(f"{where}: not an image of a format read here ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:  # a damaged file can fail anywhere in a decoder, each failure one line
        raise CubeError(f"{where}: not a readable image ({shorten(str(e) or type(e).__name__, 120, False)})") from None
    return pixels


def eight_bit(image) -> np.ndarray:
    """A Pillow image's first frame as 8-bit pixels: grey stays grey, every other mode becomes RGB.
    Alpha is dropped (as Keras's loader drops it), and a palette of greys alone is grey."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):  # 16-bit grey (PNG, TIFF) to 8-bit
        return np.clip(np.asarray(image, np.float64) / 257, 0, 255).round().astype(np.uint8)
    if mode in ("1", "L", "LA", "F"):
        return np.asarray(image.convert("L"))
    pixels = np.asarray(image.convert("RGBA" if mode in ("P", "PA") else "RGB"))[..., :3]
    grey = mode in ("P", "PA") and (pixels == pixels[..., :1]).all()
    return np.ascontiguousarray(pixels[..., 0]) if grey else pixels


def in_channels(pixels: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Decoded pixels, grey (H×W) or colour (H×W×3), in the channels of `image_shape`.
    Grey becomes colour by repeating it; colour becomes grey by its luma (Pillow's "L"), as a grey model
    has never seen colour. H×W×1 is grey; a model of other channels (4, say) takes no image file."""
    from PIL import Image

    channels = image_shape[2] if len(image_shape) == 3 else None
    if channels not in (None, 1, 3):
        raise CubeError(f"the model takes images of {channels} channels; image files give grey or RGB alone")
    if channels == 3:
        return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels
    grey = np.asarray(Image.fromarray(pixels).convert("L")) if pixels.ndim == 3 else pixels
    return grey if channels is None else grey[..., None]


def read_batches(f, count: int, batch: int, where: str, image_shape: tuple[int, ...]):
    """count images of `image_shape` bytes from `f`, `batch` at a time; the file must hold exactly these."""
    size = math.prod(image_shape)
    for first in range(0, count, batch):
        n = min(batch, count - first)
        with reading(where, "readable images"):
            data = f.read(n * size)
        if len(data) != n * size:
            raise CubeError(f"{where}: ends within image {first + len(data) // size + 1} of the {count} it declares")
        yield np.frombuffer(data, np.uint8).reshape(n, *image_shape)
    with reading(where, "readable images"):
        extra = f.read(1)
    if extra:
        raise CubeError(f"{where}: holds more than the {count} images it declares")


# --------------------------------------------- download: its config, its sources, the npz it writes
NPZ_NAME = "mnist.npz"
RECORD_NAME = "download.json"  # where the npz came from, and its SHA-256
ARRAYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {"train_images": "x_train", "train_labels": "y_train", "test_images": "x_test", "test_labels": "y_test"}


def download(args: argparse.Namespace, log: logging.Logger) -> None:
    config = read_yaml(args.data_config)
    images = read_image_config(config, args.data_config)  # None when data.yaml names an npz or IDX files
    sources, names = ({}, None) if images else read_data_config(args.data_config, config)
    uris = [images.source.uri] if images else [source.uri for source in sources.values()]
    log.info(f"read {args.data_config}: {', '.join(uris)}")
    os.makedirs(args.data_dir, exist_ok=True)
    with folder_lock(args.data_dir):
        if images:
            make_npz_of_images(images, args.data_dir, log)
        else:
            fetch_and_verify(sources, names, args.data_dir, log)


# data.yaml names an npz, four IDX files, or an image set: a folder of class folders (train/<class>/... and
# test/<class>/..., or <class>/... alone), or a zip or tar archive of one, decoded by Pillow into the same mnist.npz.
# make_npz_of_images = read_image_files -> split_by_class -> decode_images -> mnist.npz and download.json
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
SPLITS = ("train", "test")
DEFAULT_TEST_FRACTION = 0.2  # of each class, held out as the test set when the set has no test/


class ImageSet(NamedTuple):
    """An image set that data.yaml names: its Source, whether a folder, test_fraction and image_size."""
    source: Source
    folder: bool
    test_fraction: float
    image_size: tuple[int, int] | None


def read_image_config(config: dict, path: str) -> ImageSet | None:
    """data.yaml's image set, when its uri names a folder or an archive (by its name); None otherwise."""
    if "files" in config or not isinstance(config.get("uri"), str):
        return None
    base = os.path.dirname(os.path.abspath(path))
    uri = resolve_uri(config["uri"], base, path)
    web = uri.startswith(("http://", "https://"))
    folder = not web and os.path.isdir(uri)
    name = urllib.parse.urlsplit(uri).path if web else uri
    if not folder and not name.lower().endswith(ARCHIVES):
        return None
    check_keys(config, ["uri"] if folder else ["uri", "hash"], ["hash", "size", "test_fraction", "image_size"], path)
    fraction = config.get("test_fraction", DEFAULT_TEST_FRACTION)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise CubeError(f"{path}: test_fraction must be a number between 0 and 1 (exclusive), got {shorten(fraction)}")
    size = config.get("image_size")
    valid_size = isinstance(size, list) and len(size) == 2 and all(whole(n, 1, MAX_IMAGE_SIDE) for n in size)
    if size is not None and not valid_size:
        raise CubeError(f"{path}: image_size must be [height, width], each 1 to {MAX_IMAGE_SIDE}, got {shorten(size)}")
    source = read_source(config, base, path)
    return ImageSet(source, folder, float(fraction), tuple(size) if size else None)


MAX_IMAGE_SIDE = 1 << 14  # pixels of an image_size's height or width


def read_data_config(path: str, config: dict | None = None) -> tuple[dict[str, Source], list[str] | None]:
    """Each source file's name and Source from data.yaml (either form), and its `classes:` names or None."""
    config = read_yaml(path) if config is None else config
    base = os.path.dirname(os.path.abspath(path))
    if "files" not in config:
        check_keys(config, ["uri", "hash"], ["size", "classes"], path)
        sources = {NPZ_NAME: read_source(config, base, path)}
    else:
        files = check_keys(config, ["files"], ["classes"], path)["files"]
        check_keys(files, list(IDX_FILES), [], f"{path}: files")
        sources = {name: read_source(check_keys(files[name], ["uri", "hash"], ["size"], f"{path}: files.{name}"),
                                     base, f"{path}: files.{name}")
                   for name in IDX_FILES}
    names = config.get("classes")
    if names is None:
        return sources, None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n.strip() for n in names):
        raise CubeError(f"{path}: classes must be a list of two names or more, got {shorten(names)}")
    if len(set(names)) != len(names):
        raise CubeError(f"{path}: classes names {shorten(sorted({n for n in names if names.count(n) > 1}))} twice")
    return sources, names


def read_source(entry: dict, base: str, where: str) -> Source:
    """The Source an entry of data.yaml names; its sha256 is "" where the entry gives no hash (a folder)."""
    size = entry.get("size")
    digest = str(entry.get("hash", "")).strip().lower().removeprefix("sha256:")
    if "hash" in entry and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CubeError(f"{where}: hash must be a SHA-256 digest (64 hex digits, 'sha256:' prefix "
                        f"optional), got {shorten(entry['hash'])}")
    if size is not None and not whole(size, 1, MAX_DECLARED_BYTES):
        raise CubeError(f"{where}: size must be the file's size in bytes, 1 to {MAX_DECLARED_BYTES}, "
                        f"got {shorten(size)}")
    return Source(resolve_uri(str(entry["uri"]), base, where), digest, size)


def resolve_uri(uri: str, base: str, where: str) -> str:
    """A data.yaml uri as the task opens it: an http(s) URL, or a local path (relative to `base`)."""
    if len(uri) > MAX_URI_CHARS:
        raise CubeError(f"{where}: uri longer than {MAX_URI_CHARS} characters: {shorten(uri)}")
    if WINDOWS_PATH.match(uri):  # C:\data, C:/data or \\server\share: a path, not a URL of scheme "c"
        return os.path.join(base, uri)
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 (a port out of range raises only when it is read)
    except ValueError as e:
        raise CubeError(f"{where}: not a valid uri: {shorten(uri)} ({e})") from None
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise CubeError(f"{where}: a file:// uri names a file on this machine (file:///path or "
                            f"file://localhost/path), not on {shorten(parts.netloc)}")
        uri = urllib.request.url2pathname(parts.path)
    elif parts.scheme == "":  # a plain path is relative to the config file, as it is in the container
        uri = os.path.join(base, uri)
    elif parts.scheme in ("http", "https"):  # non-ASCII characters percent-encoded as UTF-8, as browsers do
        if not parts.netloc.isascii():
            raise CubeError(f"{where}: the host in {shorten(uri)} is not ASCII; write it in its ASCII form (xn--...)")
        uri = urllib.parse.quote(uri, safe="".join(map(chr, range(33, 127))))
    else:
        raise CubeError(f"{where}: unsupported uri scheme {shorten(parts.scheme + ':')} in {shorten(uri)} "
                        "(expected http://, https://, file:// or a local path)")
    return uri


MAX_URI_CHARS = 2048
WINDOWS_PATH = re.compile(r"[A-Za-z]:[\\/]|\\\\")  # a drive's path, or a UNC path


def make_npz_of_images(images: ImageSet, data_dir: str, log: logging.Logger) -> None:
    """Write the image set's npz and download.json in data_dir, unless the same npz is there already."""
    final, record_path = os.path.join(data_dir, NPZ_NAME), os.path.join(data_dir, RECORD_NAME)
    # The most bytes the set's files, and then their decoded pixels, may take: a folder's size:, or
    # MAX_DATA_BYTES; an archive's size: is its own, and images compress, so sixteen times that, within
    # MAX_DATA_BYTES..MAX_DECLARED_BYTES.
    limit = size_limit(images.source)[0]
    if not images.folder and images.source.size is not None:
        limit = min(max(16 * images.source.size, MAX_DATA_BYTES), MAX_DECLARED_BYTES)
    files, digest = read_image_files(images, final, limit, log)
    source = {"uri": images.source.uri, "sha256": digest, "test_fraction": images.test_fraction,
              "image_size": list(images.image_size) if images.image_size else None}
    if npz_in_place(data_dir, {"images": source}, None, log):
        return
    splits = split_by_class(files, images.test_fraction, images.source.uri)
    names = sorted(splits["train"])
    arrays = decode_images(files, splits, names, images, limit)
    record = {"sources": {"images": source}, "class_names": names,
              "class_counts": {name: {split: len(splits[split].get(name, [])) for split in SPLITS} for name in names},
              NPZ_NAME: write_npz(final, arrays, images.source.uri), "bytes": os.path.getsize(final)}
    write_json(record_path, record)
    log.info(f"written {final} ({len(arrays['x_train'])} training and {len(arrays['x_test'])} test images "
             f"of {len(names)} classes; SHA-256 {record[NPZ_NAME]})")


def write_npz(final: str, arrays: dict[str, np.ndarray], where: str) -> str:
    """The SHA-256 of the npz written atomically at `final` from the arrays, once check_data accepts them."""
    buffer = io.BytesIO()
    np.savez(buffer, **check_data(arrays, where))
    write_atomically(final, buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def read_image_files(images: ImageSet, final: str, limit: int, log: logging.Logger) -> tuple[dict[str, bytes], str]:
    """The set's files but the OS's litter, by name within the folder or archive, and their SHA-256:
    an archive's own (fetched verifies it against data.yaml's hash), or one over a folder's names and bytes."""
    if images.folder:
        files, sha = read_tree(images.source.uri, limit), hashlib.sha256()
        for name in sorted(files):  # names and bytes, each length-prefixed so that no two sets share a digest
            for part in (name.encode(), files[name]):
                sha.update(len(part).to_bytes(8, "big") + part)
        digest = sha.hexdigest()
        if images.source.sha256 and digest != images.source.sha256:
            raise CubeError(f"{images.source.uri}: SHA-256 mismatch: expected {images.source.sha256}, got {digest} "
                            "(over its files' names and bytes); the folder changed or the hash is wrong")
        log.info(f"read {len(files)} files from {images.source.uri} (SHA-256 {digest})")
        return files, digest
    with fetched(images.source, final, log) as (_, tmp):
        files = read_archive(tmp, images.source.uri, limit)
    return files, images.source.sha256


def npz_in_place(data_dir: str, sources: dict, declared: str | None, log: logging.Logger) -> str | None:
    """The SHA-256 of data_dir's npz if it is already the one wanted (the log then says so); None otherwise.
    The one wanted has the `declared` SHA-256, or, where none is declared, the one download.json records
    for `sources`."""
    final, expected = os.path.join(data_dir, NPZ_NAME), declared
    if declared is None:
        previous = read_record(os.path.join(data_dir, RECORD_NAME))
        expected = previous.get(NPZ_NAME) if previous.get("sources") == sources else None
    if expected and os.path.exists(final) and sha256_of(final, MAX_DECLARED_BYTES) == expected:
        log.info(f"skipped: {final} is already present and matches its SHA-256")
        return expected
    return None


def split_by_class(files: dict[str, bytes], test_fraction: float, where: str) -> dict[str, dict[str, list[str]]]:
    """The file names of each split (train, test) and class, through one top folder around the set.
    A set without train/ and test/ is <class>/... alone: test_fraction of each class (rounded; one at least,
    one left) is held out, first by the SHA-256 of their paths within the class folder: the same files on
    every machine, whatever folder or archive holds the set."""
    paths = {name: name.split("/") for name in files}
    tops = {parts[0] for parts in paths.values()}
    if len(tops) == 1 and all(len(parts) > 2 for parts in paths.values()) and not tops & set(SPLITS):
        paths = {name: parts[1:] for name, parts in paths.items()}
        tops = {parts[0] for parts in paths.values()}
    layout = "train/<class>/... and test/<class>/..., or <class>/... alone"
    split = bool(tops & set(SPLITS))
    if split and tops != set(SPLITS):
        raise CubeError(f"{where}: holds {', '.join(sorted(tops - set(SPLITS)) or ['no test/'])} beside "
                        f"{'/, '.join(sorted(tops & set(SPLITS)))}/; expected {layout}")
    splits, within = {name: {} for name in SPLITS}, {}  # within: each file's path inside its class folder
    for name, parts in sorted(paths.items()):
        if len(parts) < 2 + split:
            raise CubeError(f"{where}: {shorten(name, 120, quoted=False)} lies outside any class folder; "
                            f"expected {layout}")
        splits[parts[0] if split else "train"].setdefault(parts[split], []).append(name)
        within[name] = "/".join(parts[1 + split:])
    if len(splits["train"]) < 2:
        raise CubeError(f"{where}: holds {len(splits['train'])} class folder(s); expected two or more ({layout})")
    unknown = sorted(set(splits["test"]) - set(splits["train"]))
    if unknown:
        raise CubeError(f"{where}: test/{unknown[0]} is a class that train/ does not have")
    if split:
        return splits
    for name, members in splits["train"].items():
        if len(members) < 2:
            raise CubeError(f"{where}: class {name} has {len(members)} image; two or more are needed to hold "
                            "one out for testing")
        order = sorted(members, key=lambda member: hashlib.sha256(within[member].encode()).digest())
        count = min(max(round(test_fraction * len(members)), 1), len(members) - 1)
        splits["test"][name], splits["train"][name] = sorted(order[:count]), sorted(order[count:])
    return splits


def decode_images(files: dict[str, bytes], splits: dict, names: list[str], images: ImageSet,
                  limit: int) -> dict[str, np.ndarray]:
    """The npz's four arrays: each split's images, decoded to one size, and their classes' indices.
    In colour if any image is; class k is the k-th of the sorted names."""
    members = {split: [(member, k) for k, name in enumerate(names) for member in splits[split].get(name, [])]
               for split in SPLITS}
    decoded, budget = {}, limit
    for member, _ in members["train"] + members["test"]:
        decoded[member] = decode_image(files[member], images.image_size, budget, f"{images.source.uri}: {member}")
        budget -= decoded[member].nbytes
    shapes = {image.shape[:2]: member for member, image in decoded.items()}
    if len(shapes) > 1:
        (one, a), (two, b) = list(shapes.items())[:2]
        raise CubeError(f"{images.source.uri}: {a} is {one[0]}×{one[1]} but {b} is {two[0]}×{two[1]}; "
                        "add image_size: [height, width] to data.yaml to resize every image to one size")
    colour = any(image.ndim == 3 for image in decoded.values())
    arrays = {}
    for split in SPLITS:
        stack = [decoded[member] for member, _ in members[split]]
        if colour:
            stack = [in_channels(image, (*image.shape[:2], 3)) for image in stack]
        arrays[f"x_{split}"] = np.stack(stack)
        arrays[f"y_{split}"] = np.array([k for _, k in members[split]], np.uint8 if len(names) <= 256 else np.int32)
    return arrays


def fetch_and_verify(sources: dict[str, Source], names: list[str] | None, data_dir: str, log: logging.Logger) -> None:
    final = os.path.join(data_dir, NPZ_NAME)
    record_path = os.path.join(data_dir, RECORD_NAME)
    record = {"sources": {name: {"uri": source.uri, "sha256": source.sha256} for name, source in sources.items()},
              "class_names": names}
    declared = sources[NPZ_NAME].sha256 if NPZ_NAME in sources else None  # an npz made of IDX files has none
    in_place = npz_in_place(data_dir, record["sources"], declared, log)
    if in_place:
        complete = {**record, NPZ_NAME: in_place, "bytes": os.path.getsize(final)}
        if read_record(record_path) != complete:  # a run killed before writing it
            write_json(record_path, complete)
        return
    if NPZ_NAME in sources:
        with fetched(sources[NPZ_NAME], final, log) as (out, tmp):
            load_mnist(tmp, sources[NPZ_NAME].uri, size_limit(sources[NPZ_NAME])[0])
            move_into_place(out, tmp, final)
        record[NPZ_NAME] = sources[NPZ_NAME].sha256
    else:  # the four IDX files, each fetched and verified, packed as the Keras-layout npz
        arrays = {}
        for name, key in IDX_FILES.items():
            with fetched(sources[name], final, log) as (_, tmp):
                arrays[key] = read_idx(tmp, sources[name].uri)
        record[NPZ_NAME] = write_npz(final, arrays, "the IDX files")
    record["bytes"] = os.path.getsize(final)  # train and evaluate read it as large as this, no larger
    write_json(record_path, record)
    log.info(f"written {final} (SHA-256 {record[NPZ_NAME]})")


TASKS = {"download": download, "train": train, "evaluate": evaluate, "infer": infer, "sweep": sweep}  # COMMANDS's, run


# ==================================================================================================
# The machinery
# What knows nothing of MNIST or of learning, and keeps careless hands and bad luck from losing work:
# each part says what it guards against. It uses no name of the sections above.
# ==================================================================================================


# ----------------------- messages and configs: one line for every mistake, no config read unbounded
class CubeError(Exception):
    """A problem the user can fix: reported as one line, with a non-zero exit."""


MAX_CONFIG_BYTES = 64 << 10  # a config is a few lines; this bounds what the YAML reader parses


def read_yaml(path: str) -> dict:
    try:
        with open_regular(path) as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise CubeError(f"{path}: cannot read ({e.strerror})") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise CubeError(f"{path}: larger than {MAX_CONFIG_BYTES >> 10} KiB; a config is a few lines")
    try:
        data = yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as e:
        raise CubeError(f"{path}: not valid YAML ({shorten(' '.join(str(e).split()), 200, quoted=False)})") from None
    except RecursionError:
        raise CubeError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CubeError(f"{path}: expected a mapping of keys, found {type(data).__name__}")
    return data


class ConfigLoader(yaml.SafeLoader):
    """Safe YAML without aliases, which no config needs: a few nested ones expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is a mistake (YAML would keep the later value without a word)."""
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key.value}' given twice", key.start_mark)
            seen.add(key.value if isinstance(key, yaml.ScalarNode) else id(key))
        return super().construct_mapping(node, deep)


# 1e-3 is a number, as in YAML 1.2 and to everyone who writes one; YAML 1.1 wants a dot (1.0e-3).
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                   list("-+0123456789."))


def shorten(value: object, limit: int = 60, quoted: bool = True) -> str:
    """A value as a message shows it: its repr (or, not `quoted`, the text itself), cut to a short prefix."""
    text = repr(value) if quoted else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_keys(data: object, required: list[str], optional: list[str], where: str) -> dict:
    """`data`, if a mapping with every required key and no unknown one (a misspelt key names the nearest)."""
    if not isinstance(data, dict):
        raise CubeError(f"{where}: expected a mapping with keys {', '.join(required)}")
    known = required + optional
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), [k for k in known if k not in data], n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f" (expected {', '.join(known)})"
            raise CubeError(f"{where}: unknown key {shorten(key)}{hint}")
    for key in required:
        if key not in data:
            raise CubeError(f"{where}: missing key '{key}' (expected {', '.join(known)})")
    return data


def whole(value: object, low: int, high: int) -> bool:
    """Whether a value read from JSON or YAML is a whole number (not a bool) from `low` to `high`."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def to_json(value: object, indent: int | None = 2) -> bytes:
    """Strict JSON (no NaN or Infinity, which most readers reject): a non-finite number becomes null."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v
    return json.dumps(finite(value), indent=indent, allow_nan=False).encode()


# ------ bounded readers: devices, FIFOs, bombs and damaged files refused in bounded time and memory
MAX_DATA_BYTES = 128 << 20  # of a data file that data.yaml gives no size: MNIST's largest is 47 MB
MAX_PARAMS_BYTES = 1 << 30  # of params.msgpack: MNIST's are 0.8 MB, 224×224 colour images' about 50 MB
MAX_CHECKPOINT_BYTES = 4 * MAX_PARAMS_BYTES  # the parameters, their average and Adam's two moments
MAX_DECLARED_BYTES = 16 << 30  # of one whose size: it gives (train's peak is about six times it)
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows has neither, nor FIFOs to wait on
NO_WAIT = getattr(os, "O_NONBLOCK", 0)  # a FIFO opens at once, to be refused, instead of waiting for a writer


def open_regular(path: str, where: str | None = None):
    """`path` opened for binary reading; a device or FIFO (endless, or waiting for a writer) is refused."""
    return os.fdopen(regular(os.open(path, os.O_RDONLY | NO_WAIT), where or path, "give a file"), "rb")


def regular(fd: int, where: str, advice: str) -> int:
    """The open file `fd`, if it is a regular file; a device, FIFO or socket is closed and refused."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CubeError(f"{where}: not a regular file (a device, FIFO or socket); {advice}")
    return fd


def read_npz(path: str, names: tuple[str, ...], limit: int, where: str) -> tuple[dict[str, np.ndarray], str]:
    """The arrays `names` of an npz and its SHA-256, from one read of at most `limit` bytes.
    Pickles are refused, and so are arrays that unpack past `limit` or declare more than they hold:
    memory stays within about twice `limit`."""
    with reading(where, "a readable .npz"):
        with open_regular(path, where) as f:
            blob = f.read(limit + 1)
        if len(blob) > limit:
            raise CubeError(f"{where}: larger than the {limit} bytes a data file may have")
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            missing = [name for name in names if name not in npz.files]
            if missing:
                raise CubeError(f"{where}: missing array '{missing[0]}' (expected {', '.join(names)})")
            sizes = {name: npz.zip.getinfo(f"{name}.npy").file_size for name in names}
            if sum(sizes.values()) > limit:  # a compressed npz can unpack to any size
                raise CubeError(f"{where}: its arrays unpack to {sum(sizes.values())} bytes, more than "
                                f"the {limit} a data file may have")
            for name in names:  # np.load allocates what a header declares before it reads a byte
                with npz.zip.open(f"{name}.npy") as member:
                    shape, dtype = npy_header(member, where)
                declared = math.prod(shape) * np.dtype(dtype).itemsize
                if declared > sizes[name]:
                    raise CubeError(f"{where}: its {name} declares {'×'.join(map(str, shape))} {dtype} "
                                    f"({declared} bytes) in {sizes[name]} bytes")
            arrays = {name: npz[name] for name in names}
    return arrays, hashlib.sha256(blob).hexdigest()


@contextlib.contextmanager
def reading(where: str, what: str):
    """The faults of reading a file (missing, unreadable, damaged) as one CubeError naming `where`."""
    try:
        yield
    except FileNotFoundError:
        raise CubeError(f"{where}: no such file") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise CubeError(f"{where}: not {what} ({shorten(str(e), 120, quoted=False)})") from None
    except MemoryError:  # a header that declares more than any file of ours holds
        raise CubeError(f"{where}: not {what} (it declares more data than memory holds)") from None


def npy_header(f, where: str) -> tuple[tuple[int, ...], str]:
    """The shape and dtype a .npy header declares (nothing is unpickled: the bytes are read raw)."""
    if f.read(6) != b"\x93NUMPY":
        raise CubeError(f"{where}: not a .npy array (no NumPy header at its start)")
    version = tuple(f.read(2))
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise CubeError(f"{where}: a .npy array of format version {version}; expected 1.0 or 2.0")
    shape, fortran_order, dtype = read_header[version](f)
    if fortran_order and len(shape) > 1:
        raise CubeError(f"{where}: stored in Fortran order; save it with np.save(path, np.ascontiguousarray(images))")
    return shape, str(dtype)


MAX_FILES = 2_000_000  # entries a folder or archive of files may hold (ImageNet's training set: 1.3 million)
LITTER = ("__macosx", "thumbs.db", "desktop.ini")  # what macOS and Windows leave in folders; and dot-files


def walk_files(root: str):
    """The files under `root` but litter, each folder sorted: (its path within `root`, "/"-separated, path).
    MAX_FILES entries at most; a link to a folder is refused, neither followed out of the set nor skipped."""
    seen = 0
    for folder, folders, names in os.walk(root, onerror=raise_error):
        folders[:] = sorted(name for name in folders if not is_litter(name))
        linked = [name for name in folders if os.path.islink(os.path.join(folder, name))]
        if linked:
            raise CubeError(f"{os.path.join(folder, linked[0])}: a link to a folder, which is not followed; "
                            "put the folder itself there")
        seen += len(folders) + len(names)
        if seen > MAX_FILES:
            raise CubeError(f"{root}: holds more than {MAX_FILES} files and folders")
        for name in sorted(names):
            if not is_litter(name):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, root).replace(os.sep, "/"), path


def raise_error(e: OSError) -> None:
    raise e


def is_litter(name: str) -> bool:
    return name.startswith(".") or name.lower() in LITTER


def open_maybe_gzipped(stack: contextlib.ExitStack, path: str, where: str):
    """A regular file for reading, through gzip when it starts with gzip's magic bytes."""
    f = stack.enter_context(open_regular(path, where))
    gzipped = f.read(2) == b"\x1f\x8b"
    f.seek(0)
    return stack.enter_context(gzip.GzipFile(fileobj=f)) if gzipped else f


def read_idx_header(f, where: str) -> tuple[int, ...]:
    """The sizes in an IDX header: 0, 0, type 0x08 (unsigned byte), the rank, then big-endian int32s."""
    head = f.read(4)
    rank = head[3] if len(head) == 4 and head[:3] == b"\0\0\x08" else 0
    sizes = f.read(4 * rank)
    if not 1 <= rank <= 4 or len(sizes) != 4 * rank:
        raise CubeError(f"{where}: not an IDX file of unsigned bytes (its header is not one)")
    shape = tuple(int.from_bytes(sizes[i:i + 4], "big", signed=True) for i in range(0, 4 * rank, 4))
    if min(shape) < 0:
        raise CubeError(f"{where}: not an IDX file of unsigned bytes (negative sizes {shape})")
    return shape


def read_idx(path: str, where: str) -> np.ndarray:
    """An array from an IDX file (gzipped or raw) of unsigned bytes, of at most MAX_DATA_BYTES."""
    with contextlib.ExitStack() as stack, reading(where, "a readable IDX file"):
        f = open_maybe_gzipped(stack, path, where)
        shape = read_idx_header(f, where)
        size = math.prod(shape)
        if size > MAX_DATA_BYTES:
            raise CubeError(f"{where}: its header declares {size} bytes of data, more than the "
                            f"{MAX_DATA_BYTES} an MNIST-like file may have")
        body = f.read(size + 1)
    if len(body) != size:
        raise CubeError(f"{where}: not an IDX file of unsigned bytes with a consistent size "
                        f"(its header declares {size} bytes of data)")
    return np.frombuffer(body, np.uint8).reshape(shape)


def read_tree(root: str, limit: int) -> dict[str, bytes]:
    """Every file under the folder `root` but litter, by its path within it, `limit` bytes at most in all."""
    budget = FileBudget(root, limit)
    try:
        for name, path in walk_files(root):
            with open_regular(path) as f:
                budget.take(name, f)
    except OSError as e:
        raise CubeError(os_fault(e)) from None
    return budget.files


@dataclasses.dataclass
class FileBudget:
    """Files read into memory, by name, at most MAX_FILES entries seen and `limit` bytes in all."""
    where: str
    limit: int
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    seen: int = 0
    bytes: int = 0

    def enter(self, size: int = 0) -> None:
        """One more entry, which declares `size` bytes: a CubeError past either bound."""
        self.seen += 1
        if self.seen > MAX_FILES:
            raise CubeError(f"{self.where}: holds more than {MAX_FILES} files and folders")
        self.charge(size)

    def charge(self, size: int) -> None:
        self.bytes += size
        if self.bytes > self.limit:
            raise CubeError(f"{self.where}: its files hold more than {self.limit} bytes, the most a data set "
                            "may have (set size: in the data config if it is larger)")

    def take(self, name: str, f, declared: int = 0) -> None:
        """The file `name`, read from `f`; its bytes beyond what enter() took for it are counted too."""
        data = f.read(self.limit - self.bytes + declared + 1)
        self.charge(len(data) - declared)
        self.files[name] = data


def read_archive(path: str, where: str, limit: int) -> dict[str, bytes]:
    """Every file in a zip or tar archive (gzipped or not) but litter, by name, read in memory, unextracted.
    A member named outside the archive's folder (absolute, or with ..), a link or a device is refused."""
    budget = FileBudget(where, limit)
    try:
        with open_regular(path, where) as f:
            if zipfile.is_zipfile(f):
                read_zip(f, budget)
            else:
                f.seek(0)
                read_tar(f, budget)
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as e:
        raise CubeError(f"{where}: not a readable zip or tar archive ({shorten(str(e), 120, False)})") from None
    return budget.files


def read_zip(f, budget: FileBudget) -> None:
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            budget.enter(info.file_size)
            name = member_name(info.filename, budget.where)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise CubeError(f"{budget.where}: member {shorten(info.filename)} is a symbolic link; an archive "
                                "of images holds files and folders alone")
            if name and not info.is_dir():
                with archive.open(info) as member:
                    budget.take(name, member, info.file_size)


WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


def member_name(name: str, where: str) -> str:
    """An archive member's name as a path within its folder ("a/b"), or "" for litter.
    Absolute names and .. are refused: extracted, they would lead outside."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if name.startswith(("/", "\\")) or WINDOWS_DRIVE.match(name) or ".." in parts:
        raise CubeError(f"{where}: member {shorten(name)} is named outside the archive's folder (absolute, "
                        "or with ..); an archive of images holds relative names alone")
    return "" if any(map(is_litter, parts)) else "/".join(parts)


def read_tar(f, budget: FileBudget) -> None:
    """Read a tar archive's members into `budget`, through a stream capped at twice its limit.
    The cap holds headers too: tarfile reads a long name's whole declared size before any member."""
    gzipped = f.read(2) == b"\x1f\x8b"
    f.seek(0)
    stream = CappedReader(gzip.GzipFile(fileobj=f) if gzipped else f, 2 * budget.limit + (1 << 20), budget.where)
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for info in archive:
            budget.enter(info.size if info.isfile() else 0)
            name = member_name(info.name, budget.where)
            if not (info.isfile() or info.isdir()):
                raise CubeError(f"{budget.where}: member {shorten(info.name)} is a link or a device; an archive "
                                "of images holds files and folders alone")
            if name and info.isfile():
                budget.take(name, archive.extractfile(info), info.size)


@dataclasses.dataclass
class CappedReader(io.RawIOBase):
    """A stream read through, which ends the task in one line once more than `left` bytes came out."""
    stream: Any
    left: int
    where: str

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(min(len(buffer), self.left + 1))
        self.left -= len(data)
        if self.left < 0:
            raise CubeError(f"{self.where}: unpacks to more than the data set may hold; a tar bomb, or set "
                            "size: in the data config if it is this large")
        buffer[:len(data)] = data
        return len(data)


# ------ atomic files and locks: no half-written output, no two runs mixed, no file of yours touched
LOCK_NAME = ".mnist.lock"  # the file a folder's lock is taken on (see folder_lock)
PART_ATTEMPTS = 8  # temporary names tried before a folder is given up as tampered with (see open_part)
PART = re.compile(r"\..+\.mnist-\d+-[0-9a-f]{8}\.part")  # our temporary files: .NAME.mnist-PID-RANDOM.part


# Not filelock: its shared lock (ReadWriteLock) is a SQLite file every reader must write, and readers
# get their folders read-only; and a temporary file's own lock is what says its maker lives.
@contextlib.contextmanager
def folder_lock(folder: str, shared: bool = False):
    """One writer at a time in `folder`, and no reader while it writes: no one sees two runs' files mixed.
    An OS lock (it dies with its process, kill -9 too, and holds across containers) on LOCK_NAME, which
    only its owner may open: one on the folder, or on a file others read, lets any user stop every run."""
    fd = open_lock_file(os.path.join(folder, LOCK_NAME), shared)
    try:
        if fd is not None:
            try:
                lock(fd, shared)
            except (BlockingIOError, PermissionError):
                doing = "being written by another run" if shared else "in use by another run (writing or reading it)"
                raise CubeError(f"{folder}: {doing}; wait for it to end, or choose another folder") from None
        yield
    finally:
        if fd is not None:
            os.close(fd)


def open_lock_file(path: str, shared: bool) -> int | None:
    """The lock file at `path`, made if missing, never through a link; None to a reader that cannot open it.
    A read-only mount no writer has used, or another user's folder: the reader reads without a lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NO_FOLLOW | NO_WAIT, 0o600)
    except OSError as e:
        if not shared or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        try:
            fd = os.open(path, os.O_RDONLY | NO_FOLLOW | NO_WAIT)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EACCES):
                return None
            raise
    return regular(fd, path, "remove it")


def lock(fd: int, shared: bool) -> None:
    """An OS lock on the open file `fd`, which dies with its process, taken at once or not at all.
    Another holder raises BlockingIOError or PermissionError. Windows locks are exclusive, so readers
    take turns there; with neither kind (a stand-in test), none."""
    if fcntl:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    elif msvcrt:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def write_json(path: str, value: object, lines: bool = False) -> None:
    """Write `value` as strict JSON (to_json), atomically; with `lines`, a list as JSON Lines."""
    if lines:
        write_atomically(path, b"".join(to_json(item, indent=None) + b"\n" for item in value))
    else:
        write_atomically(path, to_json(value))


def write_atomically(path: str, data: bytes) -> None:
    with atomic_writer(path) as write:
        write(data)


@contextlib.contextmanager
def atomic_writer(path: str):
    """A function that writes bytes to a staged file, put at `path` when the block ends without error."""
    with staged(path) as (out, tmp):
        yield functools.partial(write_staged, out)
        move_into_place(out, tmp, path)


@contextlib.contextmanager
def staged(path: str):
    """A temporary file beside `path`, open for writing; removed at the block's end unless moved there.
    Beside it, so that the rename is atomic; a killed run's is removed by the next task writing there."""
    out = open_part(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    try:
        with out:
            yield out, out.name
    finally:
        if os.path.exists(out.name):
            os.unlink(out.name)


def open_part(folder: str, name: str):
    """A new temporary file for `name` in `folder`, named as PART and locked while it is open.
    The lock, unlike a process ID, tells any host or container sharing the folder that its maker lives;
    a file another run's clean-up removed, or another process locked, first is left for a new name."""
    for _ in range(PART_ATTEMPTS):
        out = open(os.path.join(folder, f".{name}.mnist-{os.getpid()}-{os.urandom(4).hex()}.part"), "xb")
        try:
            lock(out.fileno(), shared=False)
            if os.fstat(out.fileno()).st_nlink:  # not removed by another run's clean-up before the lock
                return out
        except (BlockingIOError, PermissionError):
            out.close()
            continue
        except BaseException:  # a signal, say, before staged() can clean up: the file is ours to remove
            out.close()
            with contextlib.suppress(OSError):
                os.unlink(out.name)
            raise
        out.close()
    raise CubeError(f"{folder}: another process locks each temporary file the task makes there; choose "
                    "another folder, or find that process")


def write_staged(out, data: bytes) -> None:
    """Write to a staged file; a full or read-only disk is the destination's fault, said so."""
    try:
        out.write(data)
    except OSError as e:
        raise CubeError(os_fault(e, os.path.dirname(out.name))) from None


def os_fault(e: OSError, path: str | None = None) -> str:
    """An operating-system error as one line: the path, what went wrong, what to do."""
    path = path or e.filename or "?"
    hints = {errno.ENOSPC: "no space left on its device; free some, or choose a folder on another disk",
             errno.EDQUOT: "over your disk quota there; free some space, or choose another folder",
             errno.EACCES: "permission denied; check who owns it, or choose another folder",
             errno.EPERM: "operation not permitted; check who owns it, or choose another folder",
             errno.EROFS: "on a read-only file system; choose a writable folder",
             errno.EISDIR: "is a folder where a file is expected; give a file's path",
             errno.ENOTDIR: "a file stands where a folder is expected; give a folder's path",
             errno.EEXIST: "a file stands where a folder is expected; give a folder's path",
             errno.ENOENT: "no such file or folder",
             errno.ELOOP: "a symbolic link stands there, which the cube does not follow; remove it"}
    return f"{path}: {hints.get(e.errno, e.strerror or type(e).__name__)}"


def move_into_place(out, tmp: str, path: str) -> None:
    """Make a finished staged file durable, then put it at `path` in one atomic step."""
    try:
        out.flush()
        os.fsync(out.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError as e:  # a full disk shows at the flush; a folder at `path` at the rename
        blamed = path if e.errno == errno.EISDIR else os.path.dirname(os.path.abspath(path))
        raise CubeError(os_fault(e, blamed)) from None
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def sha256_of(path: str, limit: int) -> str | None:
    """The SHA-256 of the regular file at `path`; None if it is not one, or is larger than `limit` bytes."""
    sha, size = hashlib.sha256(), 0
    try:
        f = open_regular(path)
    except CubeError:
        return None
    with f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            if size > limit:
                return None
            sha.update(chunk)
    return sha.hexdigest()


def remove_abandoned_parts(folder: str) -> None:
    """Remove the temporary files that killed runs left in `folder`: ours (PART) that no process holds."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in filter(PART.fullmatch, names):
        with contextlib.suppress(OSError):  # held by a live process, or gone already
            remove_unheld(os.path.join(folder, name))


def remove_unheld(path: str) -> None:
    """Remove `path` unless a live process holds it, as its lock (or, on Windows, the system) tells."""
    if fcntl is None:
        os.unlink(path)
        return
    fd = os.open(path, os.O_RDONLY | NO_FOLLOW | NO_WAIT)
    try:
        lock(fd, shared=False)
        os.unlink(path)
    finally:
        os.close(fd)


# ---------------------------------- downloading: servers that fail, stall, trickle, lie or redirect
HTTP_TIMEOUT = 30.0  # seconds to connect, and at most between two reads of a body
MIN_RATE = 10_000  # bytes a second that a transfer must average, once it has run for HTTP_TIMEOUT
HTTP_ATTEMPTS = 4  # tries for connection faults and 5xx answers; a 4xx answer is never retried
RETRY_DELAY = 1.0  # seconds before the second try, doubled before each one after it
CHUNK = 1 << 20


class Source(NamedTuple):
    """One file to fetch: where from, the SHA-256 it must have, and its size from data.yaml (or None)."""
    uri: str
    sha256: str
    size: int | None


@contextlib.contextmanager
def fetched(source: Source, beside: str, log: logging.Logger):
    """The staged file beside `beside`, and its path, that the source is fetched and verified into.
    It is streamed in, hashed as it goes; a CubeError unless its SHA-256 matches."""
    uri = source.uri
    with staged(beside) as (out, tmp):
        if uri.startswith(("http://", "https://")):
            digest, size = fetch_http(source, out, log)
        else:
            try:
                with open_regular(uri) as f:
                    digest, size = stream(f, out, os.fstat(f.fileno()).st_size, uri, *size_limit(source))
            except OSError as e:
                raise CubeError(f"{uri}: cannot read ({e.strerror})") from None
        log.info(f"fetched {size} bytes from {uri}")
        if digest != source.sha256:
            raise CubeError(f"{uri}: SHA-256 mismatch: expected {source.sha256}, got {digest}; "
                            "the download is corrupt or the hash in the data config is wrong")
        log.info(f"verified SHA-256 {digest} of {uri}")
        out.flush()
        yield out, tmp


def size_limit(source: Source) -> tuple[int, str]:
    """The most bytes `source` may have, and where that limit comes from."""
    if source.size is not None:
        return source.size, f"its size in the data config is {source.size}"
    return MAX_DATA_BYTES, "the most a data file may have (set its size: in the data config if it is larger)"


def fetch_http(source: Source, out, log: logging.Logger) -> tuple[str, int]:
    uri, (limit, why) = source.uri, size_limit(source)
    delay = RETRY_DELAY
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            with OPENER.open(uri, timeout=HTTP_TIMEOUT) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and (total > limit or (source.size and total != source.size)):
                    raise CubeError(f"{uri}: the server declares {total} bytes, but {why}; check the uri")
                digest, size = stream(response, out, total, uri, limit, why)
            if total is not None and size < total:
                raise http.client.IncompleteRead(b"", total - size)
            return digest, size
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise CubeError(f"{uri}: the server answered HTTP {e.code} {shorten(e.reason, quoted=False)}; "
                                "check the uri in the data config") from None
            problem = f"HTTP {e.code} {shorten(e.reason, quoted=False)}"
        except http.client.IncompleteRead as e:
            problem = f"the body ended {e.expected} bytes short of its Content-Length"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            problem = shorten(str(getattr(e, "reason", e)) or type(e).__name__, 200, quoted=False)
        if attempt < HTTP_ATTEMPTS:
            log.warning(f"{uri}: {problem}; retrying in {delay:g} s ({attempt}/{HTTP_ATTEMPTS})")
            time.sleep(delay)
            delay *= 2
    raise CubeError(f"{uri}: download failed after {HTTP_ATTEMPTS} attempts ({problem}); "
                    "check the network, or point uri at a local copy")


class CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect handler that follows http(s) alone, and never from https down to http.
    urllib would follow ftp:// too, and on http anyone on the way could change what is fetched."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old, new) == ("https", "http"):
            raise CubeError(f"{req.full_url}: the server redirects to {shorten(newurl)}; only redirects to "
                            "http(s), and never from https to http, are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


OPENER = urllib.request.build_opener(CheckedRedirects)


def stream(source, out, total: int | None, uri: str, limit: int, why: str) -> tuple[str, int]:
    """Copy `source` into the staged file `out` by chunks: the SHA-256 and size of what was copied.
    A CubeError once it passes `limit` bytes (`why` says where the limit comes from)."""
    out.seek(0)
    out.truncate()
    sha, size = hashlib.sha256(), 0
    progress = Progress(os.path.basename(urllib.parse.urlsplit(uri).path) or uri, total)
    started = time.monotonic()
    while chunk := source.read1(CHUNK):  # read1: what has arrived, so that a trickle is seen
        size += len(chunk)
        if size > limit:
            raise CubeError(f"{uri}: stopped after {limit} bytes, {why}; check the uri")
        write_staged(out, chunk)
        sha.update(chunk)
        progress.show(size)
        seconds = time.monotonic() - started
        if seconds > HTTP_TIMEOUT and size < MIN_RATE * seconds:  # a trickle holds no task for ever
            raise CubeError(f"{uri}: slower than {MIN_RATE / 1000:g} kB/s on average ({size} bytes in "
                            f"{seconds:.0f} s); check the network, or point uri at a local copy")
    return sha.hexdigest(), size


# Not tqdm: into a log it writes every redraw, where this writes a line at each quarter.
@dataclasses.dataclass
class Progress:
    """A live bar on a terminal; a line at each quarter otherwise, so CI logs stay short."""
    label: str
    total: int | None
    tty: bool = dataclasses.field(default_factory=lambda: sys.stderr.isatty())
    shown: int = 0

    def show(self, done: int) -> None:
        if not self.total:
            return
        if self.tty:
            filled = 30 * done // self.total
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{done / 1e6:.1f}/{self.total / 1e6:.1f} MB")
            if done >= self.total:
                sys.stderr.write("\n")
        elif 4 * done // self.total > self.shown:
            self.shown = 4 * done // self.total
            sys.stderr.write(f"{self.label}: {25 * self.shown}% of {self.total / 1e6:.1f} MB\n")


# -------------------------------- signals: a kill loses at most an epoch, a signal is never ignored
@contextlib.contextmanager
def recording_signals(stopped: Callable[[], str]):
    """Within the block, SIGINT and SIGTERM are only recorded; at its end, one stops the task, saying `stopped()`.
    A run so stops where nothing is half done."""
    with handling_signals(record_signal):
        yield
    stop_if_signalled(stopped())


@contextlib.contextmanager
def handling_signals(handler):
    """Within the block, `handler` takes SIGINT and SIGTERM, but not one the process ignores.
    A shell's background job ignores SIGINT, and so must its tasks."""
    heard = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, handler) for s in heard}
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


signals_received: list[int] = []  # this task's SIGINTs and SIGTERMs, which stop_if_signalled reads


def record_signal(signum, frame) -> None:
    signals_received.append(signum)


def stop_if_signalled(message: str = "") -> None:
    """Raise Stopped if the task has received a signal: training asks between calls, every task at its end.
    At the end for a signal whose exception was dropped, by Python in a callback (redeliver_signals,
    unless the task ended first) or by JAX in a bare `except:` (around a compiled program's layouts)."""
    if signals_received:
        raise Stopped(signals_received[-1], message)


class Stopped(BaseException):
    """A signal (SIGINT, SIGTERM) stopped the task: it unwinds, leaving no temporary file; exit 128 + signal.
    A BaseException, as KeyboardInterrupt is, so that no `except Exception` takes it for a file's fault."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}[signum])
        self.code = 128 + signum


@contextlib.contextmanager
def unwinding_signals():
    """Within the block, SIGINT and SIGTERM stop the task where it is (Stopped), and none is lost.
    Only within it: before, SIGTERM's default (ending the process, but for a container's process 1)
    also ends a wait for a cluster's other processes, where a Python handler would wait for JAX."""
    signals_received.clear()
    unraisable_hook, sys.unraisablehook = sys.unraisablehook, redeliver_signals
    try:
        with handling_signals(stop_task):
            yield
    finally:
        sys.unraisablehook = unraisable_hook


def stop_task(signum, frame) -> None:
    record_signal(signum, frame)
    raise Stopped(signum)


def redeliver_signals(unraisable) -> None:
    """Send again a signal whose Stopped Python dropped in a callback (printing "Exception ignored in").
    Such a callback is a garbage collector's, say (JAX has one). Sent from another thread a moment later,
    it stops the task where the exception reaches main; sent at once, it would be dropped again."""
    if not isinstance(unraisable.exc_value, Stopped):
        sys.__unraisablehook__(unraisable)
        return
    resend = threading.Timer(0.01, os.kill, (os.getpid(), unraisable.exc_value.code - 128))
    resend.daemon = True
    resend.start()


# ==================================================================================================
# The process
# Logs, then main and, in the order it calls them: the user it runs as, the cluster a run may join, the
# compilation cache, and the task's outcome.
# ==================================================================================================
def open_log(log_dir: str | None, task: str, process: tuple[int, int] = (0, 1)) -> logging.Logger:
    """The task's logger: lines to stdout (warnings and errors to stderr) and to log_dir/mnist_TASK.log.
    The file adds timestamps; with several processes each line names its process; process 0 keeps the file."""
    log = logging.getLogger(f"mnist.{task}")
    log.setLevel(logging.INFO)
    log.propagate = False
    tag = f"[process {process[0]}/{process[1]}] " if process[1] > 1 else ""
    to_stdout, to_stderr = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    to_stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    to_stderr.setLevel(logging.WARNING)
    log.handlers = [to_stdout, to_stderr]
    if log_dir and process[0] == 0:
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, f"mnist_{task}.log")
        # a regular file, never through a link: one planted at a log's path would have the task write where it points
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW | NO_WAIT, 0o666)
        to_file = os.fdopen(regular(fd, path, "remove it, or choose another folder"), "a", encoding="utf-8")
        log.handlers.append(logging.StreamHandler(to_file))
        log.handlers[-1].setFormatter(OneLine(f"%(asctime)s %(levelname)s {tag}%(message)s"))
    for handler in log.handlers[:2]:
        handler.setFormatter(OneLine(f"{tag}%(message)s"))
    return log


class OneLine(logging.Formatter):
    """A formatter that keeps each event on one line: control characters in values are written escaped.
    So a value from a config or a server (a uri holding "\\nINFO ...") cannot forge a line."""

    CONTROLS = {code: f"\\x{code:02x}" for code in [*range(9), *range(11, 32), 127]} | {10: "\\n"}

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).translate(self.CONTROLS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.raiseExceptions = False  # a log file on a full disk must not print tracebacks
    try:
        run_as_output_owner(args)
        process = join_cluster() if args.task == "train" else (0, 1)
        if args.task != "download":  # the one task that compiles nothing
            use_compilation_cache()
        log = open_log(getattr(args, "log_dir", None), args.task, process)
    except OSError as e:
        print(f"mnist.py {args.task}: error: cannot write logs: {os_fault(e)}", file=sys.stderr)
        return 1
    except CubeError as e:
        print(f"mnist.py {args.task}: error: {e}", file=sys.stderr)
        return 1
    log.info(f"started {args.task}")
    for folder in written_folders(args):
        remove_abandoned_parts(folder)
    try:
        with unwinding_signals():
            return outcome(args, log)
    finally:
        for handler in log.handlers[2:]:  # the log file's; stdout and stderr stay open
            handler.stream.close()


def run_as_output_owner(args: argparse.Namespace) -> None:
    """In the image, a task started as root becomes the owner of the folder receiving its first output.
    MLCube's runner starts containers without --user and makes that folder as its caller, who then owns
    what the task writes. Our runners pass --user, and a root caller owns the folder: nothing changes."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not os.environ.get("MNIST_RUN_AS_OUTPUT_OWNER"):
        return
    folder = written_folders(args)[0]
    while not os.path.isdir(folder):  # a file's folder, or the nearest one that exists
        folder = os.path.dirname(folder)
    owner = os.stat(folder)
    if owner.st_uid == 0:
        return
    try:
        os.setgroups([])
        os.setgid(owner.st_gid)
        os.setuid(owner.st_uid)
    except PermissionError:
        raise CubeError(f"{folder}: cannot run as its owner {owner.st_uid}:{owner.st_gid} (no CAP_SETUID); "
                        f"start the container with --user={owner.st_uid}:{owner.st_gid}") from None


def written_folders(args: argparse.Namespace) -> list[str]:
    """The folders that a task writes in: its output folders, and the folder of an output file."""
    outputs = {name: kind for name, (_, kind, output) in COMMANDS[args.task][1].items() if output}
    paths = {name: os.path.abspath(getattr(args, name)) for name in outputs}
    return [path if outputs[name] == "directory" else os.path.dirname(path) for name, path in paths.items()]


def join_cluster() -> tuple[int, int]:
    """Start JAX's distributed runtime when a launcher runs several processes; (process index, count).
    By JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or Slurm's srun or Open MPI's mpirun."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        try:
            count, index = int(env.get("JAX_NUM_PROCESSES", "")), int(env.get("JAX_PROCESS_ID", ""))
        except ValueError:
            raise CubeError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                            "set to integers too") from None
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], count, index)
    elif int(env.get("SLURM_NTASKS", 1)) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


CACHE_VARIABLE = "MNIST_COMPILATION_CACHE"  # the compiled programs' folder, or "off"
SHOW_WARNING = warnings.showwarning  # Python's own; see show_warning
MAX_CACHE_BYTES = 100 << 20  # beyond this, the programs written longest ago are dropped; a run adds 0.4 MB
CACHE_ENTRY = re.compile(r".+-[0-9a-f]{64}-(cache|atime)")  # JAX's names for its entries: PROGRAM-KEY-cache
CACHE_TAG = "CACHEDIR.TAG"  # marks a cache folder the cube made (the Cache Directory Tagging convention)
CACHE_TAG_TEXT = (b"Signature: 8a477f597d28d172789f06886806bc55\n"
                  b"# The MNIST MLCube's compiled programs: code its tasks run. Only their owner may write here.\n")


def use_compilation_cache() -> None:
    """Have JAX keep compiled programs between runs, in compilation_cache_folder, if trusted_cache allows.
    A rerun loads them instead of compiling; prune_cache bounds them, show_warning replaces damaged ones.
    JAX keys each entry by program, JAX version and device; the entries are native code this process runs."""
    warnings.showwarning = show_warning
    folder = compilation_cache_folder()
    # JAX's own variable (JAX_COMPILATION_CACHE_DIR), where it is set, rules
    if folder is None or jax.config.jax_compilation_cache_dir or not trusted_cache(folder):
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program: they are small
    prune_cache(folder)


def compilation_cache_folder() -> str | None:
    """The folder of compiled programs kept between runs: $MNIST_COMPILATION_CACHE, or None for "off".
    By default, in the user's cache folder. noxfile.py holds a copy of this rule (tests/test_cache.py keeps
    them in step) and mounts a folder beside it into containers: never this one, whose programs run here."""
    setting = os.environ.get(CACHE_VARIABLE, "")
    if setting == "off":
        return None
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return setting or os.path.join(user_cache, "mnist-mlcube", "jax")


def trusted_cache(folder: str) -> bool:
    """Whether compiled programs may be loaded from `folder`: this user's, and no other user may write it.
    It is made if missing, tagged as the cube's (CACHE_TAG) while it holds nothing but JAX's entries, and
    made private; otherwise one line says why, and the task compiles without a cache."""
    try:
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700)
        info = os.stat(folder)
        # Windows has no uid, and its permissions are ACLs that st_mode does not show.
        if hasattr(os, "geteuid") and (info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            raise CubeError(f"{folder} is writable by another user, and what it holds runs as code; use a folder "
                            f"of your own (chmod go-w, or set {CACHE_VARIABLE})")
        if hasattr(os, "geteuid") and info.st_mode & 0o077:  # JAX writes its entries as the umask says
            os.chmod(folder, 0o700)
        names = os.listdir(folder)
        if CACHE_TAG not in names and all(map(CACHE_ENTRY.fullmatch, names)):  # nothing in it but JAX's
            write_atomically(os.path.join(folder, CACHE_TAG), CACHE_TAG_TEXT)
    except (OSError, CubeError) as e:
        problem = os_fault(e, folder) if isinstance(e, OSError) else str(e)
        print(f"mnist.py: compiling without a cache: {problem}", file=sys.stderr)
        return False
    return True


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python's warning display, which also removes a damaged compilation cache entry that JAX warns of.
    JAX writes an entry in place (a killed run leaves it damaged) and never replaces one, as it writes
    new keys only; removed, the next run writes it afresh."""
    damaged = re.match(r"Error reading persistent compilation cache entry for '([^']+)'", str(message))
    folder = jax.config.jax_compilation_cache_dir
    if damaged and folder:
        for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(damaged[1]) + "-*")):
            if CACHE_ENTRY.fullmatch(os.path.basename(path)):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        message = f"{message} (removed: the next run compiles it afresh)"
    SHOW_WARNING(message, category, filename, lineno, file, line)


def prune_cache(folder: str) -> None:
    """Drop the cache's entries written longest ago until it holds MAX_CACHE_BYTES at most.
    Only files JAX names as its entries (CACHE_ENTRY), in a folder the cube made (CACHE_TAG): a variable
    pointed at a user's folder deletes nothing of theirs. Not JAX's own limit: its eviction looks up each
    entry's owner by name (getpwuid, through etils), and so fails every write of a --user uid without one."""
    try:
        with open_regular(os.path.join(folder, CACHE_TAG)) as f:
            if f.read(len(CACHE_TAG_TEXT)) != CACHE_TAG_TEXT:
                return
        entries = sorted((entry.stat().st_mtime, entry.stat().st_size, entry.path) for entry in os.scandir(folder)
                         if CACHE_ENTRY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False))
    except (OSError, CubeError):
        return
    total = sum(size for _, size, _ in entries)
    for _, size, path in entries:
        if total <= MAX_CACHE_BYTES:
            break
        with contextlib.suppress(FileNotFoundError):  # another run may have dropped it first
            os.unlink(path)
        total -= size


def outcome(args: argparse.Namespace, log: logging.Logger) -> int:
    """The task, its outcome as an exit status, and every error as one line."""
    try:
        TASKS[args.task](args, log)
        stop_if_signalled()
        return 0
    except CubeError as e:
        log.error(f"mnist.py {args.task}: error: {e}")
        return 1
    except OSError as e:  # one line for every fault the tasks do not name themselves
        log.error(f"mnist.py {args.task}: error: {os_fault(e)}")
        return 1
    except Stopped as e:
        log.error(f"mnist.py {args.task}: {e}")
        return e.code


if __name__ == "__main__":
    status = main()
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        # A signal that lands inside JAX (its tracing, XLA's compiling, its runtime's start) can leave it
        # in a state that Python's teardown crashes on (SIGABRT or SIGSEGV). The stopped task has removed
        # its temporary files and closed its logs, so the process leaves without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
