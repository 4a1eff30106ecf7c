"""MLCube's own CLI (mlcube 0.0.9 and its Docker runner from PyPI, in their nox-managed virtualenv) runs
this cube's image on the real Docker engine, as the root caller and as a plain user in the docker group,
building it before every run: never pulled, never stale."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    BASE,
    CUBE_FILES,
    IMAGE,
    ROOT,
    built_sources,
    chown,
    exited_containers,
    make_digits,
    needs_docker,
    nox,
    npz_bytes,
    pulls_since,
    remove_containers,
    source_workspace,
)

import noxfile

TASKS = ["download", "train", "evaluate", "infer", "download,train"]


def mlcube(*args, user=None, home=None):
    """`nox -s mlcube -- ARGS`: as the caller, or as the plain user with its own copy of the cube."""
    cube = ROOT if user is None else user / "cube"
    env = {"MLCUBE_SYSTEM_SETTINGS": str((home or cube) / "mlcube-settings.yaml")}
    if user is not None:
        env["HOME"] = str(user)
    return nox("-s", "mlcube", "--", *(arg.replace("{cube}", str(cube)) for arg in args), env=env, user=user)

@needs_docker
@pytest.mark.parametrize("caller", ["caller", "plain user"])
def test_mlcube_run_every_task_out_of_the_box(real_data, image, plain_user, caller, tmp_path):
    """No -P flags: the image starts as root, as MLCube starts it, and becomes the owner of the folders
    MLCube made for the caller; the caller can rewrite and delete everything the tasks wrote."""
    user = plain_user if caller == "plain user" else None
    if caller == "plain user" and user is None:
        pytest.skip("needs root, to run MLCube as a plain user in the docker group")
    home = user or tmp_path
    ws = source_workspace(home / "mlcube" / "ws", (real_data / "mnist.npz").read_bytes(), batch_size=512)
    if user is not None:
        chown(home / "mlcube", 4321)
    for task in TASKS:
        before = exited_containers()
        result = mlcube("run", "--mlcube={cube}", "--platform=docker", f"--task={task}", f"--workspace={ws}",
                        user=user, home=home)
        assert result.returncode == 0, f"{task}: " + result.stdout[-3000:] + result.stderr[-3000:]
        remove_containers(exited_containers() - before)
    summary = json.loads((ws / "model" / "model.json").read_text())
    assert summary["epochs_run"] == 1 and summary["test_accuracy"] > 0.9 and summary["image"] is None
    assert summary["image_sources"] == built_sources(user / "cube" if user else ROOT)
    metrics = json.loads((ws / "logs" / "evaluate_metrics.json").read_text())
    assert metrics["test_accuracy"] == summary["test_accuracy"]
    assert len(json.loads((ws / "predictions" / "predictions.json").read_text())["predictions"]) == 10000
    for picture in ("training_curves.png", "confusion_matrix.png", "mistakes.png"):
        assert (ws / "logs" / picture).read_bytes().startswith(b"\x89PNG")
    owner = (4321, 4321) if user else (os.getuid(), os.getgid())
    written = [p for d in ("data", "logs", "model", "predictions") for p in (ws / d, *(ws / d).iterdir())]
    assert {(p.stat().st_uid, p.stat().st_gid) for p in written} == {owner}
    rewrite_then_delete = ("import pathlib, shutil, sys\n"
                           "for d in sys.argv[1:]:\n"
                           "    for p in pathlib.Path(d).iterdir(): p.write_bytes(p.read_bytes())\n"
                           "    shutil.rmtree(d)\n")
    run_as = ["setpriv", "--reuid=4321", "--regid=4321", "--clear-groups"] if user else []
    done = subprocess.run([*run_as, "/usr/bin/python3", "-c", rewrite_then_delete,
                           *(str(ws / d) for d in ("data", "logs", "model", "predictions"))], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in ws.iterdir()) == ["data.yaml", "mnist.npz", "train.yaml"]

def cube_copy(folder: Path, old: str = "", new: str = "") -> Path:
    """The cube's files in `folder`, with `old` replaced by `new` in mnist.py."""
    folder.mkdir()
    for name in CUBE_FILES:
        shutil.copy(ROOT / name, folder / name)
    source = (ROOT / "mnist.py").read_text()
    assert old in source
    (folder / "mnist.py").write_text(source.replace(old, new) if old else source)
    return folder


def restore_image():
    """The image as the other tests had it, built by our runner (MLCube's builds carry no sources label)."""
    assert nox("-s", "configure-docker", "--", *BASE).returncode == 0


@needs_docker
def test_mlcube_run_runs_an_edit_at_once(image, tmp_path):
    """build_strategy: always: after mnist.py changes, the next `mlcube run` runs the change."""
    started = 'log.info(f"started {args.task}")'
    cube = cube_copy(tmp_path / "cube", started, started.replace("}", "} (edited)"))
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    try:
        before = exited_containers()
        result = mlcube("run", f"--mlcube={cube}", "--platform=docker", "--task=download", f"--workspace={ws}",
                        home=tmp_path)
        remove_containers(exited_containers() - before)
    finally:
        restore_image()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "started download (edited)" in result.stdout


@needs_docker
def test_mlcube_run_replaces_a_stranger_image_of_the_cube_name(image, tmp_path):
    """Someone else's image tagged with our name (here the base image, which has no mnist.py) is not
    run: `mlcube run` builds ours over the name first, and pulls nothing."""
    subprocess.run(["docker", "tag", os.environ.get("MNIST_BASE_IMAGE", "python:3.11-slim-bookworm"), IMAGE],
                   check=True)
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    try:
        start, before = time.time(), exited_containers()
        result = mlcube("run", "--mlcube={cube}", "--platform=docker", "--task=download", f"--workspace={ws}",
                        home=tmp_path)
        remove_containers(exited_containers() - before)
        assert pulls_since(start) == []
    finally:
        restore_image()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "started download" in result.stdout and (ws / "data" / "mnist.npz").is_file()


@needs_docker
def test_run_docker_after_mlcube_configure_says_the_image_records_no_sources(image, tmp_path):
    """`mlcube configure` builds the image without our sources label: run-docker says that, and
    rebuilds, rather than naming files as changed that did not change. A copy of the cube under an image
    name of its own, so that the other tests' image stays ours."""
    cube = cube_copy(tmp_path / "cube")
    tag = f"mnist-configured-{os.getpid()}:0.0.1"
    (cube / "mlcube.yaml").write_text((ROOT / "mlcube.yaml").read_text().replace(f"image: {IMAGE}", f"image: {tag}"))
    ws = source_workspace(tmp_path / "ws", npz_bytes(make_digits()))
    try:
        configured = mlcube("configure", f"--mlcube={cube}", "--platform=docker", home=tmp_path)
        assert configured.returncode == 0, configured.stdout[-3000:] + configured.stderr[-3000:]
        before = exited_containers()
        result = subprocess.run([sys.executable, "-m", "nox", "-f", str(cube / "noxfile.py"), "-s", "run-docker",
                                 "--", "download", f"--workspace={ws}"], capture_output=True, text=True, timeout=1200)
        remove_containers(exited_containers() - before)
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("building the image: the image in place records no sources (built by another tool, such as mlcube "
            "configure)") in result.stderr
    assert "changed since it was built" not in result.stderr


def test_standin_mlcube_configure_singularity_builds_the_recipe(tmp_path):
    """STAND-IN for Singularity (tests/standin/singularity records what it is asked): MLCube's own
    Singularity runner, finding no image, builds ours from Singularity.recipe, unprivileged."""
    cube = cube_copy(tmp_path / "cube")
    log = tmp_path / "standin.log"
    env = {"PATH": f"{ROOT / 'tests' / 'standin'}:{os.environ['PATH']}", "STANDIN_LOG": str(log),
           "MLCUBE_SYSTEM_SETTINGS": str(tmp_path / "mlcube-settings.yaml")}
    result = nox("-s", "mlcube", "--", "configure", f"--mlcube={cube}", "--platform=singularity", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    image = cube / "workspace" / ".image" / noxfile.CUBE["singularity"]["image"]
    built = [json.loads(line) for line in log.read_text().splitlines() if "build" in line]
    assert built == [["singularity", "build", "--fakeroot", str(image), "Singularity.recipe"]]
    assert image.is_file()


@pytest.mark.parametrize("args", [["describe", "--mlcube=."], ["show_config", "--mlcube=.", "--platform=singularity"],
                                  ["show_config", "--mlcube=.", "--platform=docker"]])
def test_mlcube_accepts_the_cube(args, tmp_path):
    result = mlcube(*args, home=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mnist" in result.stdout
    assert "uv binary not found" not in result.stderr  # nox's news of nothing, filtered in the noxfile
