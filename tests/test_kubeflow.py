"""run-kubeflow: the tasks as a Kubeflow Pipelines (v2) pipeline built with the real kfp SDK in the
session's own virtualenv; its compiled YAML loads back with the SDK, and --local runs it end to end on
the real Docker engine (kfp.local's DockerRunner). Submitting to a Kubeflow server (--host) needs one,
which cannot run here: that call is not exercised."""
import json
import os
import subprocess

from conftest import IMAGE, ROOT, needs_docker, nox, source_workspace

LOAD_BACK = """
import json, sys
from google.protobuf import json_format
from kfp import components
pipeline = components.load_component_from_file(sys.argv[1])
spec = pipeline.pipeline_spec
executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
print(json.dumps({"name": pipeline.name, "tasks": sorted(spec.root.dag.tasks),
                  "images": sorted({e["container"]["image"] for e in executors.values() if "container" in e})}))
"""


# kfp_run_locally up to kfp.local's run, in run-kubeflow's virtualenv, on a system without os.geteuid
# (Windows's case): what the DockerRunner and local.init are given, as JSON.
SETTINGS = """
import json, os, sys
del os.geteuid
sys.path.insert(0, sys.argv[1])
import noxfile
from kfp import local
given = {}
def init(runner, **settings):
    mounts = [{"source": m["Source"], "target": m["Target"], "read_only": m["ReadOnly"]}
              for m in runner.container_run_args["mounts"]]
    given.update(user=runner.container_run_args["user"], mounts=mounts, root=settings["pipeline_root"])
    raise SystemExit(print(json.dumps(given)))
local.init = init
noxfile.kfp_run_locally(noxfile.parse_args(sys.argv[2:], "run-kubeflow"))
"""


def test_containers_write_only_a_pipeline_root_of_their_own(tmp_path):
    """kfp.local mounts the pipeline root read-write: it is workspace/kubeflow, not the workspace; the
    folders of what the pipeline imports (train.yaml's, the workspace, and data_dir) are mounted
    read-only at their own paths. Where the system has no uid (Windows), Docker picks the user."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "train.yaml").write_text("{}")
    compiled = nox("-s", "run-kubeflow", "--", "train", f"--workspace={ws}")  # makes the session's virtualenv
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    given = subprocess.run([str(ROOT / ".nox" / "run-kubeflow" / "bin" / "python"), "-c", SETTINGS, str(ROOT), "train",
                            f"--workspace={ws}", "--local"], capture_output=True, text=True)
    assert given.returncode == 0, given.stderr[-3000:]
    assert json.loads(given.stdout) == {"user": None, "root": str(ws / "kubeflow"), "mounts": [
        {"source": str(path), "target": str(path), "read_only": True} for path in (ws, ws / "data")]}


def test_a_missing_import_is_one_line(tmp_path):
    """Docker mounts no folder that is missing: the runner says so first, in one line."""
    result = nox("-s", "run-kubeflow", "--", "evaluate", f"--workspace={tmp_path}", "--local")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"run-kubeflow: error: the pipeline imports {tmp_path / 'data'}, which does not exist" in result.stdout


def real_workspace(tmp_path, real_sample, digest=None):
    """A sample of the real MNIST beside data.yaml (the offline route), and one short epoch."""
    return source_workspace(tmp_path / "ws", real_sample, digest=digest)


def test_compiled_pipeline_loads_back_with_the_sdk(tmp_path):
    result = nox("-s", "run-kubeflow", "--", "download", "train", "evaluate", f"--workspace={tmp_path}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    package = tmp_path / "mnist-pipeline.yaml"
    loaded = subprocess.run([str(ROOT / ".nox" / "run-kubeflow" / "bin" / "python"), "-c", LOAD_BACK, str(package)],
                            capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    pipeline = json.loads(loaded.stdout)
    assert pipeline["name"] == "mnist" and pipeline["images"] == [IMAGE]
    # the configs come in through importers; data_dir flows from download to train and evaluate
    assert pipeline["tasks"] == ["download", "evaluate", "importer", "importer-2", "train"]
    assert sorted(os.listdir(tmp_path)) == ["mnist-pipeline.yaml"]


def test_the_component_runs_the_image_given(tmp_path):
    """--image, here by digest (used as it is), is the image of every step."""
    given = "registry.example:5000/team/mnist-jax@sha256:" + "0" * 64
    result = nox("-s", "run-kubeflow", "--", "download", "train", f"--workspace={tmp_path}", f"--image={given}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    loaded = subprocess.run([str(ROOT / ".nox" / "run-kubeflow" / "bin" / "python"), "-c", LOAD_BACK,
                             str(tmp_path / "mnist-pipeline.yaml")], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["images"] == [given]


@needs_docker
def test_local_run_on_docker_end_to_end(tmp_path, real_sample, image):
    ws = real_workspace(tmp_path, real_sample)
    before = os.listdir(ws)
    result = nox("-s", "run-kubeflow", "--", "download", "train", "evaluate", f"--workspace={ws}", "--local")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run] = [p for p in (ws / "kubeflow").iterdir() if p.name.startswith("mnist-20")]  # in the pipeline root
    assert f"the tasks' outputs are in {run}" in result.stdout
    assert sorted(os.listdir(ws)) == sorted([*before, "kubeflow", "mnist-pipeline.yaml"])  # nothing else written
    summary = json.loads((run / "train" / "model_dir" / "model.json").read_text())
    metrics = json.loads((run / "evaluate" / "log_dir" / "evaluate_metrics.json").read_text())
    assert summary["test_accuracy"] > 0.9 and metrics["test_accuracy"] == summary["test_accuracy"]
    assert (run / "evaluate" / "log_dir" / "mistakes.png").read_bytes().startswith(b"\x89PNG")
    written = [p for p in run.rglob("*")]
    assert {(p.stat().st_uid, p.stat().st_gid) for p in written} == {(os.getuid(), os.getgid())}


@needs_docker
def test_a_failed_step_fails_the_run(tmp_path, real_sample, image):
    ws = real_workspace(tmp_path, real_sample, digest="c" * 64)
    result = nox("-s", "run-kubeflow", "--", "download", "train", f"--workspace={ws}", "--local")
    assert result.returncode == 1
    assert "SHA-256 mismatch" in result.stdout and "run-kubeflow: task download failed" in result.stdout + result.stderr
    [run] = [p for p in (ws / "kubeflow").iterdir() if p.name.startswith("mnist-20")]
    assert not (run / "train").exists()
