"""MLCube's own CLI (mlcube 0.0.9 and its Docker runner from PyPI, in their nox-managed virtualenv) runs
this cube's image on the real Docker engine, as the root caller and as a plain user in the docker group."""
import json
import os
import subprocess

import pytest
from conftest import (
    BASE,
    IMAGE,
    ROOT,
    chown,
    exited_containers,
    needs_docker,
    nox,
    remove_containers,
    source_workspace,
)

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

@needs_docker
def test_mlcube_configure_builds_from_the_dockerfile(image, tmp_path):
    """MLCube's default strategy pulls, which an unpushed image cannot; `auto` builds it here, with
    the docker CLI, from the same Dockerfile and context."""
    result = mlcube("configure", "--mlcube=.", "--platform=docker", "-Pdocker.build_strategy=auto", home=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Successfully tagged {IMAGE}" in result.stdout
    inspect = json.loads(subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True,
                                        text=True).stdout)[0]
    assert inspect["Config"]["Entrypoint"] == ["python3", "/mlcube/mnist.py"]
    assert nox("-s", "configure-docker", "--", *BASE).returncode == 0  # the image as the other tests had it


@pytest.mark.parametrize("args", [["describe", "--mlcube=."], ["show_config", "--mlcube=.", "--platform=singularity"],
                                  ["show_config", "--mlcube=.", "--platform=docker"]])
def test_mlcube_accepts_the_cube(args, tmp_path):
    result = mlcube(*args, home=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mnist" in result.stdout
