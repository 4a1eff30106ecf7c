"""The README's walkthrough cannot rot: its annotated mlcube.yaml says what the file says, and every
command of its quick start and of its MLCube section runs, as written, in a fresh copy of the
repository. Where the walkthrough reaches what this machine has not, the test stands in and says so
here: the internet, which workspace/data.yaml points at, is replaced by the offline route the README
describes (the real mnist.npz beside data.yaml, with its own SHA-256). Singularity and a Kubernetes cluster cannot run
here either; the walkthrough shows them with --dry-run, which runs as written."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    IMAGE,
    ROOT,
    built_sources,
    exited_containers,
    needs_docker,
    pulls_since,
    remove_containers,
    sha256,
)

import mnist

README = (ROOT / "README.md").read_text()


def section(title: str, level: str = "##") -> str:
    start = README.index(f"\n{level} {title}\n")
    end = README.find(f"\n{level} ", start + 1)
    return README[start:end]


def fenced(text: str, language: str) -> list[str]:
    """The contents of the text's fenced blocks opened with ```language ("" for none)."""
    blocks, opening, lines = [], None, []
    for line in text.splitlines(keepends=True):
        if not line.startswith("```"):
            lines.append(line)
        elif opening is None:
            opening, lines = line.strip(), []
        else:
            if opening == "```" + language:
                blocks.append("".join(lines))
            opening = None
    return blocks


def commands(text: str) -> list[str]:
    """The shell commands of a section's bash blocks, continuation lines joined, comments dropped."""
    lines = "\n".join(fenced(text, "bash")).replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def test_annotated_mlcube_yaml_is_the_file():
    [block] = fenced(section("`mlcube.yaml`, annotated"), "yaml")
    assert yaml.safe_load(block) == yaml.safe_load((ROOT / "mlcube.yaml").read_text())


def test_the_sweep_yaml_shown_is_the_file_and_a_valid_sweep():
    [block] = fenced(section("Sweeps: which learning rate?"), "yaml")
    assert block == (ROOT / "workspace" / "sweep.yaml").read_text()
    assert mnist.read_sweep_config(str(ROOT / "workspace" / "sweep.yaml"))["trials"] == 24


def test_every_config_mlcube_yaml_names_is_tracked_in_the_workspace():
    """A fresh clone holds each config a task reads from the workspace (a .gitignore that hides one
    would pass every test that writes its own)."""
    tracked = subprocess.run(["git", "ls-files", "workspace"], cwd=ROOT, capture_output=True, text=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    cube = yaml.safe_load((ROOT / "mlcube.yaml").read_text())
    configs = {spec["default"] for task in cube["tasks"].values() for spec in task["parameters"]["inputs"].values()
               if spec["default"].endswith(".yaml")}
    assert configs == {"data.yaml", "train.yaml", "sweep.yaml"}
    assert {f"workspace/{name}" for name in configs} <= set(tracked.split())


def test_the_quick_start_names_every_runner_beside_mlcube():
    table = section("Quick start")
    for session in ("run-local", "configure-docker", "run-docker", "run-singularity", "run-k8s", "run-kubeflow"):
        assert f"`nox -s {session}" in table
    assert len(commands(table)) >= 10


def fresh_copy(tmp_path, body: bytes) -> Path:
    """The repository's tracked files in `tmp_path`/cube, with the npz `body` (real MNIST, whole or a
    sample) beside data.yaml as mnist.npz (the offline route, standing in for the internet)."""
    copy = tmp_path / "cube"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode:
        pytest.skip("not a git checkout: the fresh copy is made of the tracked files")
    for name in filter(None, tracked.stdout.split("\0")):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    (copy / "workspace" / "mnist.npz").write_bytes(body)
    (copy / "workspace" / "data.yaml").write_text(yaml.safe_dump({"uri": "mnist.npz", "hash": sha256(body)}))
    return copy


def run_as_written(copy: Path, text: str, tmp_path, venv: str = "") -> subprocess.CompletedProcess:
    """The commands of a README section, as a user with a new home types them in the copy, with the
    quick start's virtualenv active when `venv` names one (its bin folder)."""
    return run_commands(copy, commands(text), tmp_path, venv)


def run_commands(copy: Path, lines: list[str], tmp_path, venv: str = "") -> subprocess.CompletedProcess:
    """Shell command lines, run as run_as_written runs a section's. pip keeps its cache where this
    suite's does: a cache of downloads, which changes nothing that is installed."""
    script = "\n".join(["set -euo pipefail", *(f"echo '>>> {c}'\n{c}" for c in lines)])
    before = exited_containers()
    result = subprocess.run(["bash", "-c", script], cwd=copy, capture_output=True, text=True, timeout=1800,
                            env={"PATH": f"{venv}:/usr/local/bin:/usr/bin:/bin".lstrip(":"), "HOME": str(tmp_path),
                                 "MNIST_COMPILATION_CACHE": str(tmp_path / "cache"),
                                 "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))})
    remove_containers(exited_containers() - before)  # what `mlcube run` left
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@needs_docker
def test_mlcube_seed_commands_build_this_cube_and_never_pull(tmp_path, real_sample, image):
    """The MLCube section's commands, the seed's as it prints them (no -P flags, a new MLCube settings
    file), on an engine that holds no image of the cube's name: they build it from our Dockerfile, pull
    nothing, and run our mnist.py, whose outputs name the sources the image was built from. On a
    sample of real MNIST: what it checks is which image runs, not how well it learns."""
    copy = fresh_copy(tmp_path, real_sample)
    kept = f"mnist-kept:{tmp_path.name.lower()}"  # the layers stay cached under another name
    subprocess.run(["docker", "tag", IMAGE, kept], check=True)
    subprocess.run(["docker", "rmi", IMAGE], check=True, capture_output=True)
    try:
        start = time.time()
        venv = os.path.dirname(sys.executable)  # this suite's, which has what the quick start installs
        result = run_as_written(copy, section("MLCube's own CLI", "###"), tmp_path, venv)
        assert pulls_since(start) == [] and "Will pull" not in result.stdout + result.stderr
    finally:
        subprocess.run(["docker", "rmi", kept], capture_output=True)
    assert f"Successfully tagged {IMAGE}" in result.stdout
    for line in ("started download", "started train", "epoch 5/5: train_loss", "started evaluate",
                 "started infer", "runner: k8s", "runner: kubeflow"):
        assert line in result.stdout
    summary = json.loads((copy / "workspace" / "model" / "model.json").read_text())
    assert summary["image"] is None and summary["image_sources"] == built_sources(copy)


@needs_docker
def test_quick_start_runs_as_written(tmp_path, real_data, image):
    copy = fresh_copy(tmp_path, (real_data / "mnist.npz").read_bytes())
    result = run_as_written(copy, section("Quick start"), tmp_path)
    assert re.search(r"^epoch 5/5: train_loss [0-9.]+, test_loss [0-9.]+, test_accuracy 0\.99", result.stdout, re.M)
    listed = {"data": ["mnist.npz", "download.json"], "model": ["params.msgpack", "model.json"],
              "logs": ["mnist_download.log", "mnist_train.log", "train_metrics.jsonl", "training_curves.png",
                       "mnist_evaluate.log", "evaluate_metrics.json", "confusion_matrix.png", "mistakes.png"],
              "predictions": ["predictions.json"]}
    tree = "\n".join(block for block in fenced(section("Quick start"), "") if "workspace/" in block)
    for folder, files in listed.items():
        assert all(name in tree for name in files)
        assert set(files) <= {p.name for p in (copy / "workspace" / folder).iterdir()}
    assert "singularity run --bind" in result.stdout  # the dry runs print what they would run
    assert "kind: Job" in result.stdout


def test_the_two_opening_commands_need_nothing_but_python(tmp_path, real_data):
    """The README's first two commands, as written, in a fresh copy with no virtualenv of ours active:
    the first sets up, downloads (the offline route, standing in for the internet), trains and
    evaluates; the second sets up the tests' virtualenv and passes, with one quick test selected (the
    whole suite is this suite)."""
    run, test = commands(README[:README.index("\n## ")])
    assert test.endswith("nox -s tests") and run.endswith("nox -s run-local -- download train evaluate")
    copy = fresh_copy(tmp_path, (real_data / "mnist.npz").read_bytes())
    result = run_commands(copy, [run, f"{test} -- tests/test_readme.py::test_annotated_mlcube_yaml_is_the_file"],
                          tmp_path)
    metrics = json.loads((copy / "workspace" / "logs" / "evaluate_metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.98 and (copy / "workspace" / "model" / "params.msgpack").is_file()
    assert "1 passed" in result.stdout
