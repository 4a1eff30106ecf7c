"""The README's walkthrough cannot rot: its annotated mlcube.yaml says what the file says, and every
command of its quick start runs, as written, in a fresh copy of the repository. Where the walkthrough
reaches what this machine has not, the test stands in and says so here: the internet, which
workspace/data.yaml points at, is replaced by the offline route the README describes (the real
mnist.npz beside data.yaml, with its own SHA-256). Singularity and a Kubernetes cluster cannot run
here either; the walkthrough shows them with --dry-run, which runs as written."""
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT, exited_containers, needs_docker, remove_containers, sha256

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
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


def test_the_quick_start_names_every_runner_beside_mlcube():
    table = section("Quick start")
    for session in ("run-local", "configure-docker", "run-docker", "run-singularity", "run-k8s", "run-kubeflow"):
        assert f"`nox -s {session}" in table
    assert len(commands(table)) >= 10


@needs_docker
def test_quick_start_runs_as_written(tmp_path, real_data, image):
    copy = tmp_path / "cube"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode:
        pytest.skip("not a git checkout: the fresh copy is made of the tracked files")
    for name in filter(None, tracked.stdout.split("\0")):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    body = (real_data / "mnist.npz").read_bytes()  # the offline route, standing in for the internet
    (copy / "workspace" / "mnist.npz").write_bytes(body)
    (copy / "workspace" / "data.yaml").write_text(yaml.safe_dump({"uri": "mnist.npz", "hash": sha256(body)}))
    script = "\n".join(["set -euo pipefail", *(f"echo '>>> {c}'\n{c}" for c in commands(section("Quick start")))])
    before = exited_containers()
    result = subprocess.run(["bash", "-c", script], cwd=copy, capture_output=True, text=True, timeout=1800,
                            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
                                 "MNIST_COMPILATION_CACHE": str(tmp_path / "cache")})
    remove_containers(exited_containers() - before)  # what `mlcube run` left
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
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
