#!/usr/bin/env python3
"""Speed and accuracy figures of mnist.py beside the reference trainers, measured in one run.

    python3 .ci/bench.py NPZ [--anchors=DIR] [--references=flax_reference,torch_reference] [--before=MNIST_PY]
                         [speed] [accuracy] [conv] [sweep]

`nox -s bench` runs it in a virtualenv with mnist.py's requirements; on a GPU machine it runs as it is
with any Python that has JAX (CUDA build), Flax, Optax and PyYAML: no nox, Docker or network needed.
  speed     the benchmark config to 99 % test accuracy, with a cold and then a warm compilation cache
            (whole process, per-program compile seconds, epochs, peak memory), then each reference;
            with --before, another mnist.py (say, `git show HEAD~1:mnist.py`) the same way, first
  accuracy  the default workspace/train.yaml over seeds 0-2
  conv      an epoch of the benchmark config with mnist.py's Conv (a matrix product over patches), then
            with Flax's nn.Conv in its place: what the patch-matrix trick earns here
  sweep     workspace/sweep.yaml's search, SWEEP_TRIALS trials on the first SWEEP_IMAGES training images:
            trials per minute with 1 and 2 workers, then 1 worker without pruning: the epochs it saves
"""
import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TARGET_CONFIG = {"optimizer": "adam", "train_epochs": 5, "batch_size": 128, "target_accuracy": 0.99}
REFERENCE_EPOCHS = {"flax_reference": 4, "torch_reference": 3}
EPOCH_LINE = re.compile(r"^epoch (\d+)\S* .*?(?:test_acc=|test_accuracy )([0-9.]+)")
COMPILE_LINE = re.compile(r"Finished XLA compilation of jit\((\w+)\) in ([0-9.]+) sec")  # or its load from the cache
LOWER_LINE = re.compile(r"Finished jaxpr to MLIR module conversion jit\((\w+)\) in ([0-9.]+) sec")


def measure(command: list[str], env: dict | None = None) -> dict:
    """Run a trainer; note when its epoch lines appear, when it first reaches 99 %, its peak RSS, and the
    seconds of each program's lowering and XLA compilation that JAX logs (mnist.py with JAX_LOG_COMPILES=1)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT,
                                   env={**os.environ, **(env or {})})
        result = {"epochs": 0, "accuracy": None, "to_99": None, "epochs_to_99": None}
        for line in process.stdout:
            print("   ", line.rstrip(), flush=True)
            if match := EPOCH_LINE.match(line):
                result.update(epochs=int(match[1]), accuracy=float(match[2]))
                if result["to_99"] is None and result["accuracy"] >= 0.99:
                    result.update(to_99=time.perf_counter() - start, epochs_to_99=result["epochs"])
        _, status, usage = os.wait4(process.pid, 0)
        errors.seek(0)
        log = errors.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{shlex.join(command)} failed:\n{log[-3000:]}")
    return {**result, "seconds": time.perf_counter() - start, "peak_mb": usage.ru_maxrss / 1024,
            "compiles": seconds_by_program(COMPILE_LINE, log), "lowerings": seconds_by_program(LOWER_LINE, log)}


def seconds_by_program(line: re.Pattern, log: str) -> dict[str, float]:
    seconds = {}
    for name, figure in line.findall(log):
        seconds[name] = seconds.get(name, 0) + float(figure)
    return seconds


def train(work: Path, config: dict, cache: Path, program: list[str] | None = None) -> dict:
    """mnist.py train with `config`, compiled programs cached in `cache`; its figures and model.json's.
    `program` runs it another way (python -c CODE) in place of mnist.py."""
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, *(program or [str(ROOT / "mnist.py")]), "train", f"--train_config={work / 'train.yaml'}",
               f"--data_dir={work / 'data'}", f"--model_dir={work / 'model'}", f"--log_dir={work / 'logs'}"]
    env = {"JAX_LOG_COMPILES": "1", "MNIST_COMPILATION_CACHE": str(cache)}
    result = measure(command, env)
    return {**result, "model": json.loads((work / "model" / "model.json").read_text())}


def speed(work: Path, npz: Path, anchors: Path, references: list[str], before: Path | None) -> None:
    missing = {name: anchors / f"{name}.py" for name in references if not (anchors / f"{name}.py").is_file()}
    for name, path in missing.items():
        print(f"{name}: no reference trainer at {path} (--anchors): measured without it", flush=True)
    rows = {}
    if before:
        rows["before cold"] = train(work, TARGET_CONFIG, work / "before-cache", [str(before)])
        rows["before warm"] = train(work, TARGET_CONFIG, work / "before-cache", [str(before)])
    cache = work / "cache"
    rows |= {"mnist.py cold": train(work, TARGET_CONFIG, cache), "mnist.py warm": train(work, TARGET_CONFIG, cache)}
    for name in references:
        if name not in missing:
            rows[name] = measure([sys.executable, str(anchors / f"{name}.py"), str(npz),
                                  str(REFERENCE_EPOCHS[name])])
    report_speed(rows, missing)


def report_speed(rows: dict[str, dict], missing: dict[str, Path]) -> None:
    """The table of speed's runs, each against mnist.py warm, as Markdown under the machine it ran on (the
    README's table is this output), then the Flax-shaped reference's ratios: a reference in `missing`
    (its name, the path it was looked for at) gets a line saying so, and no ratio is ever printed against it."""
    model = rows["mnist.py warm"]["model"]
    print(f"\nTime to 99 % test accuracy, whole process, mnist.py with {TARGET_CONFIG}; {machine()}, "
          f"{model['backend']} ({model['device_kind']}):\n")
    print("| system | to 99 % (s) | epochs | whole run (s) | final accuracy | peak MB | / mnist.py warm |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ours = rows["mnist.py warm"]["to_99"]
    for name, r in rows.items():
        to_99 = f"{r['to_99']:.2f}" if r["to_99"] else f"not reached in {r['seconds']:.0f}"
        ratio = (r["to_99"] or r["seconds"]) / ours if ours else float("nan")
        print(f"| {name} | {to_99} | {r['epochs_to_99'] or '-'} | {r['seconds']:.2f} | {100 * r['accuracy']:.2f} % "
              f"| {r['peak_mb']:.0f} | {ratio:.1f}{'' if r['to_99'] else '+'} |")
    for name, path in missing.items():
        print(f"| {name} | not measured: no reference trainer at {path}, so no ratio against it | | | | | |")
    print()
    cold = rows["mnist.py cold"]
    if "flax_reference" in missing:
        print("Against the Flax-shaped reference: no ratio, it is missing (targets: 22x cold, 30x warm)")
    elif (reference := rows.get("flax_reference", {}).get("to_99")) and cold["to_99"] and ours:
        print(f"Against the Flax-shaped reference ({reference:.1f} s to 99 %): cold {reference / cold['to_99']:.1f}x, "
              f"warm {reference / ours:.1f}x (targets: 22x, 30x); the cold compile is "
              f"{cold['model']['compile_seconds'] / cold['to_99']:.0%} of the cold whole process (target: under 20 %)")
    for name in (name for name in rows if name.endswith(("cold", "warm"))):
        r = rows[name]
        to_target = r["model"]["time_to_target_seconds"]
        programs = ", ".join(f"{program} {seconds:.2f}" for program, seconds in r["compiles"].items())
        lowered = sum(r["lowerings"].values())
        reached = f"{to_target:.3f} s" if to_target is not None else "not reached"
        print(f"{name}: compiled in {r['model']['compile_seconds']:.2f} s (lowering to MLIR {lowered:.2f} s in "
              f"all; XLA, or loading from the cache, in parallel: {programs}); training to 99 % {reached}, "
              f"{r['model']['images_per_second']:.0f} images/s")


def machine() -> str:
    """The machine the figures come from: its cores, CPU model and whether it has AVX-512 (read from
    /proc/cpuinfo where there is one), Python's and JAX's versions, and the date."""
    cpu, vector = platform.machine(), ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
        cpu, vector = (model[1] if model else cpu), (" with AVX-512" if " avx512f" in info else " without AVX-512")
    return (f"{os.cpu_count()}-core {cpu}{vector}, Python {platform.python_version()}, JAX {version('jax')}, "
            f"{datetime.date.today()}")


def accuracy(work: Path) -> None:
    default = yaml.safe_load((ROOT / "workspace" / "train.yaml").read_text())
    runs = [train(work, {**default, "seed": seed}, work / "cache") for seed in (0, 1, 2)]
    scores = [r["model"]["test_accuracy"] for r in runs]
    train_seconds = [r["model"]["train_seconds"] for r in runs]
    print(f"\nworkspace/train.yaml {default}, seeds 0-2: test accuracy "
          f"{', '.join(f'{a:.4f}' for a in scores)}; mean {sum(scores) / 3:.4f}, min {min(scores):.4f}; "
          f"training {', '.join(f'{seconds:.1f}' for seconds in train_seconds)} s")


# mnist.py with Flax's own convolution in place of its Conv: the same parameters, computed by XLA's kernel.
WITH_FLAX_CONV = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import flax.linen as nn, mnist\n"
                  "mnist.Conv = lambda features, size: nn.Conv(features, (size, size), strides=2)\n"
                  "sys.exit(mnist.main(sys.argv[1:]))")


def conv(work: Path) -> None:
    config = {key: value for key, value in TARGET_CONFIG.items() if key != "target_accuracy"} | {"train_epochs": 1}
    rows = {"Conv": train(work, config, work / "conv-cache"),
            "nn.Conv": train(work, config, work / "flax-conv-cache", ["-c", WITH_FLAX_CONV])}
    model = rows["Conv"]["model"]
    print(f"\nAn epoch of {config} on {model['backend']} ({model['device_kind']}), cold compilation cache:")
    for name, r in rows.items():
        print(f"{name:<8} epoch {r['model']['train_seconds']:.2f} s, compile {r['model']['compile_seconds']:.2f} s, "
              f"test accuracy {r['model']['test_accuracy']:.4f}")


SWEEP_TRIALS, SWEEP_IMAGES = 12, 5000
# mnist.py with Optuna's pruner that never prunes in place of the median pruner.
WITHOUT_PRUNING = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import optuna, mnist\n"
                   "optuna.pruners.MedianPruner = optuna.pruners.NopPruner\n"
                   "sys.exit(mnist.main(sys.argv[1:]))")


def sweep(work: Path, npz: Path) -> None:
    import numpy as np
    real = np.load(npz)
    (work / "sweep-data").mkdir()
    np.savez(work / "sweep-data" / "mnist.npz", x_train=real["x_train"][:SWEEP_IMAGES],
             y_train=real["y_train"][:SWEEP_IMAGES], x_test=real["x_test"], y_test=real["y_test"])
    config = yaml.safe_load((ROOT / "workspace" / "sweep.yaml").read_text()) | {"trials": SWEEP_TRIALS}
    (work / "sweep.yaml").write_text(yaml.safe_dump(config))
    print(f"\nworkspace/sweep.yaml's search, {SWEEP_TRIALS} trials, {SWEEP_IMAGES} training images "
          f"({config['validation_fraction']} of them for validation), warm compilation cache:")
    mnist = [str(ROOT / "mnist.py")]
    run_sweep(work, "warm-up", 1, mnist)  # fills the compilation cache, so that the rows compare
    for name, workers, program in (("1 worker", 1, mnist), ("2 workers", 2, mnist),
                                   ("1 worker, no pruning", 1, ["-c", WITHOUT_PRUNING])):
        seconds, states, epochs = run_sweep(work, name, workers, program)
        print(f"{name:<22} {60 * SWEEP_TRIALS / seconds:5.2f} trials/min ({seconds:.0f} s), {epochs} epochs "
              f"trained, {states.count('PRUNED')} of {len(states)} trials pruned")


def run_sweep(work: Path, name: str, workers: int, program: list[str]) -> tuple[float, list[str], int]:
    """Wall seconds of `workers` sweep processes on a fresh sweep_dir, the trials' states, their epochs."""
    folder = work / name.replace(" ", "-").replace(",", "")
    command = [sys.executable, *program, "sweep", f"--sweep_config={work / 'sweep.yaml'}",
               f"--data_dir={work / 'sweep-data'}", f"--sweep_dir={folder}", f"--log_dir={folder}-logs"]
    env = {**os.environ, "MNIST_COMPILATION_CACHE": str(work / "sweep-cache")}
    start = time.perf_counter()
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL) for _ in range(workers)]
    if any(process.wait() for process in processes):
        sys.exit(f"sweep {name} failed: {shlex.join(command)}")
    seconds = time.perf_counter() - start
    with open(folder / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    epochs = sum(1 for row in rows for key, value in row.items() if key.startswith("validation_accuracy_") and value)
    return seconds, [row["state"] for row in rows], epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("npz", type=Path, help="the real MNIST, mnist.npz")
    parser.add_argument("parts", nargs="*", metavar="speed|accuracy|conv|sweep",
                        help="what to measure (default: speed and accuracy)")
    parser.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "anchors",
                        help="folder of the reference trainers")
    parser.add_argument("--references", default="flax_reference,torch_reference",
                        help="which reference trainers to run, comma-separated")
    parser.add_argument("--before", type=Path, help="another mnist.py to time first, cold and warm (speed)")
    args = parser.parse_intermixed_args()  # options and parts in any order
    parts = args.parts or ["speed", "accuracy"]
    if not set(parts) <= {"speed", "accuracy", "conv", "sweep"}:
        parser.error(f"unknown part in {' '.join(parts)} (expected speed, accuracy, conv, sweep)")
    work = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    (work / "data").mkdir()
    (work / "data" / "mnist.npz").symlink_to(args.npz.resolve())
    if "speed" in parts:
        speed(work, args.npz.resolve(), args.anchors, [r for r in args.references.split(",") if r], args.before)
    if "accuracy" in parts:
        accuracy(work)
    if "conv" in parts:
        conv(work)
    if "sweep" in parts:
        sweep(work, args.npz.resolve())


if __name__ == "__main__":
    main()
