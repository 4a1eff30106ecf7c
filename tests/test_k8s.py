"""run-k8s up to the cluster, which cannot run here: its manifests against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict, in the session's own virtualenv: a runner-only dependency), the session's
--dry-run, and, acted out by local processes (a STAND-IN for the pods, a folder for the claim), the
multi-host wiring of the Indexed Job's pods and a run from an empty claim, init containers first. The
calls to a cluster (create, stream the log, delete) are not exercised: no stand-in here pretends to be one."""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, digits_workspace, free_port, make_digits, nox, npz_bytes, source_workspace

import noxfile

KUBERNETES = "1.37.0"  # the newest release kubernetes-validate holds the schemas of
VALIDATE = f"""
import json, sys, yaml, kubernetes_validate
faults = []
for manifest in yaml.safe_load_all(sys.stdin):
    try:
        kubernetes_validate.validate(manifest, "{KUBERNETES}", strict=True)
        faults.append("")
    except kubernetes_validate.ValidationError as e:
        faults.append(e.message)
print(json.dumps(faults))
"""


@pytest.fixture(scope="module")
def faults():
    """Each manifest's fault by the Kubernetes schemas ("" when it has none), judged in run-k8s's own
    virtualenv, which running the session once makes."""
    result = nox("-s", "run-k8s", "--", "download", "--dry-run")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    def judge(manifests: list[dict]) -> list[str]:
        judged = subprocess.run([str(ROOT / ".nox" / "run-k8s" / "bin" / "python"), "-c", VALIDATE],
                                input=yaml.safe_dump_all(manifests), capture_output=True, text=True)
        assert judged.returncode == 0, judged.stderr
        return json.loads(judged.stdout)
    return judge


def manifests(*args, workspace="/ws") -> list[dict]:
    opts = noxfile.parse_args([*args, f"--workspace={workspace}"])
    docs = [noxfile.k8s_claim(opts)] if opts.create_pvc else []
    for task in opts.tasks:
        docs += noxfile.k8s_manifests(noxfile.resolve(task, opts), opts, noxfile.k8s_job_name(task))
    return docs


@pytest.mark.parametrize("args", [
    ["download", "train", "evaluate", "infer"],
    ["train", "--processes=3", "--create-pvc", "--pvc=shared", "--namespace=ml"],
    ["train", "--gpus=2", "--memory=6g", "--cpus=1.5", "--env=XLA_FLAGS=--xla_dump_to=/tmp"],
    ["infer", "--images=incoming/batch.npy", "--predictions=out/p.json", "--create-pvc"],
])
def test_every_manifest_is_valid_kubernetes(args, faults):
    docs = manifests(*args)
    assert faults(docs) == [""] * len(docs)


def test_a_wrong_manifest_is_caught(faults):
    """The check above can fail: a field Kubernetes does not have is refused."""
    job = manifests("train")[-1]
    job["spec"]["template"]["spec"]["containers"][0]["runAsRoot"] = True
    assert "'runAsRoot' was unexpected" in faults([job])[0]


def test_pods_are_least_privileged_and_mount_inputs_read_only():
    job = manifests("train", "--gpus=1")[-1]
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"]: (m.get("subPath", ""), m.get("readOnly", False))
              for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"/mlcube_io0": ("data", True), "/mlcube_io1": ("", True), "/mlcube_io2": ("logs", False),
                      "/mlcube_io3": ("model", False), "/cache": ("", False), "/tmp": ("", False)}
    assert pod["containers"][0]["resources"] == {"requests": {"memory": "8G"},
                                                 "limits": {"memory": "8G", "nvidia.com/gpu": "1"}}


def jobs(*args) -> list[dict]:
    return [doc for doc in manifests(*args) if doc["kind"] == "Job"]


def test_pods_hold_no_token_and_no_more_memory_than_they_ask():
    """No service account token to call the cluster's API with, from a task that never calls it; a
    memory limit, the request, so that a pod cannot starve its node."""
    for args in (["download", "train", "evaluate", "infer"], ["train", "--processes=2", "--memory=6g"]):
        for job in jobs(*args):
            pod = job["spec"]["template"]["spec"]
            assert pod["automountServiceAccountToken"] is False
            resources = pod["containers"][0]["resources"]
            assert resources["limits"]["memory"] == resources["requests"]["memory"]


def test_the_compiled_programs_are_the_pods_own():
    """A cache on the claim would be shared, read-write, by every pod that mounts it, and its programs
    run as code: each pod keeps its own, in an emptyDir, in a folder mnist.py makes its user's."""
    pod = jobs("train")[0]["spec"]["template"]["spec"]
    [cache] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/cache"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[cache["name"]] and "subPath" not in cache
    assert {"name": "MNIST_COMPILATION_CACHE", "value": "/cache/jax"} in pod["containers"][0]["env"]
    assert not any(".cache" in arg for arg in pod["initContainers"][0]["command"])


OWN = "the Job's own pods"  # in the rules below, what the policy's selector of them stands in


def with_own(rules: list[dict], selector: dict) -> list[dict]:
    """`rules` with OWN replaced by `selector`."""
    return [{key: [selector if peer == OWN else peer for peer in value] if key in ("from", "to") else value
             for key, value in rule.items()} for rule in rules]


@pytest.mark.parametrize("args, ingress, egress", [
    (["download"], [], [{}]),  # fetches data, from anywhere; nothing reaches it
    (["train"], [], []),
    (["evaluate"], [], []),
    (["infer"], [], []),
    (["train", "--processes=3"], [{"from": [OWN]}],
     [{"to": [OWN]}, {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]),
])
def test_each_job_has_a_network_policy_that_lets_only_its_task_through(args, ingress, egress):
    """Made before its Job, so that no pod starts unconfined. A training of several pods talks among
    them on any port: JAX's CPU collectives (gloo), as NCCL's, listen on ports the processes pick,
    besides the coordinator's; DNS finds pod 0 by name."""
    *_, policy, job = manifests(*args)
    own = {"podSelector": {"matchLabels": {"job-name": job["metadata"]["name"]}}}
    assert policy["kind"] == "NetworkPolicy" and policy["metadata"] == job["metadata"]
    assert policy["spec"]["podSelector"] == own["podSelector"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == with_own(ingress, own) and policy["spec"]["egress"] == with_own(egress, own)


def test_apply_deletes_what_it_made_the_job_first(tmp_path):
    """k8s_apply's clean-up, with a recorder in the API clients' place (no cluster here): the Job,
    then its NetworkPolicy, its ConfigMap and its Service, each by its own call."""
    calls = []

    class Recorder:
        def __getattr__(self, call):
            return lambda *args, **kwargs: calls.append((call, args, kwargs))

    shutil.copy(ROOT / "workspace" / "train.yaml", tmp_path)
    made = manifests("train", "--processes=2", "--namespace=ml", workspace=tmp_path)
    noxfile.k8s_delete({kind: Recorder() for kind in ("Job", "Service", "NetworkPolicy", "ConfigMap")}, made)
    name = made[-1]["metadata"]["name"]
    assert calls == [("delete_namespaced_job", (name, "ml"), {"propagation_policy": "Background"}),
                     ("delete_namespaced_network_policy", (name, "ml"), {}),
                     ("delete_namespaced_config_map", (name, "ml"), {}),
                     ("delete_namespaced_service", (name, "ml"), {})]


@pytest.mark.parametrize("size, expected", [("8GB", "8G"), ("512MB", "512M"), ("2GiB", "2Gi"), ("100kB", "100k"),
                                            ("6g", "6G"), ("1.5G", "1.5G"), ("1024", "1024")])
def test_platform_sizes_become_quantities(size, expected):
    assert noxfile.quantity(size) == expected


@pytest.mark.parametrize("args, message", [
    (["train", "--data_dir=/elsewhere/data"], "/elsewhere/data is outside the workspace /ws"),
    (["evaluate", "--processes=2"], "--processes applies to train only, not evaluate"),
    (["train", "--processes=0"], "--processes expects a number of processes, 1 or more"),
    (["train", "--gpus=all"], "run-k8s takes --gpus as a number of GPUs per pod"),
])
def test_usage_errors(args, message):
    with pytest.raises(noxfile.UsageError, match=message):
        manifests(*args)


def test_session_dry_run_prints_manifests_for_kubectl(tmp_path):
    """Through the session's own virtualenv, which checks each manifest against the schemas first."""
    result = nox("-s", "run-k8s", "--", "download", "train", "--processes=2", "--create-pvc",
                 f"--workspace={tmp_path}", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "NetworkPolicy", "Job", "Service", "NetworkPolicy",
                                         "Job"]
    assert "&id" not in result.stdout  # plain YAML, no anchors
    assert os.listdir(tmp_path) == []  # nothing made here
    bad = nox("-s", "run-k8s", "--", "evaluate", "--processes=2", f"--workspace={tmp_path}", "--dry-run")
    assert bad.returncode == 1 and "run-k8s: error: --processes applies to train only" in bad.stdout + bad.stderr


def pod_command(job: dict, index: int, workspace: Path, port: int | None = None) -> tuple[list[str], dict]:
    """What pod `index` of a Job runs, on this machine: its mounts of the claim as folders of `workspace`,
    its emptyDir volumes as folders of its own (pod<index>/<volume> beside `workspace`), anyone's to
    write as Kubernetes makes them; for an Indexed Job, pod 0's DNS name as 127.0.0.1:`port`, the
    completion index that Kubernetes annotates."""
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    claim = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    own = workspace.parent / f"pod{index}"
    mounts = {m["mountPath"]: str(workspace / m.get("subPath", "") if m["name"] in claim else own / m["name"])
              for m in container["volumeMounts"]}
    for folder in mounts.values():
        os.makedirs(folder, exist_ok=True)
        if folder.startswith(str(own)):
            os.chmod(folder, 0o777)

    def local(value: str) -> str:
        name, eq, path = value.rpartition("=") if value.startswith("--") else ("", "", value)
        for target, folder in mounts.items():
            if path == target or path.startswith(target + "/"):
                return f"{name}{eq}{folder}{path[len(target):]}"
        return value

    env = {}
    for variable in container["env"]:
        if "valueFrom" in variable:
            assert "job-completion-index" in variable["valueFrom"]["fieldRef"]["fieldPath"]
            env[variable["name"]] = str(index)
        else:
            env[variable["name"]] = local(variable["value"])
    if port is not None:
        host, _, _ = env["JAX_COORDINATOR_ADDRESS"].rpartition(":")
        assert host == f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}"
        env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    return [sys.executable, str(ROOT / "mnist.py"), *map(local, container["args"])], env


def test_indexed_job_pods_train_together(tmp_path):
    """Two pods' commands and environments, as two local processes: they join through JAX's
    coordinator, train one model, and only index 0 writes it."""
    workspace = digits_workspace(tmp_path / "claim", 1024, 128)
    service, _, job = manifests("train", "--processes=2")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    port = free_port()
    processes = []
    for index in range(2):
        command, env = pod_command(job, index, workspace, port)
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env}))
    outputs = [p.communicate(timeout=300) for p in processes]
    for index, (out, err) in enumerate(outputs):
        assert processes[index].returncode == 0, err[-2000:]
        assert f"[process {index}/2] training on 2 cpu device(s)" in out
    assert "written" in outputs[0][0] and "written" not in outputs[1][0]
    model = sorted(name for name in os.listdir(workspace / "model") if name != ".mnist.lock")  # the folder's lock
    assert model == ["model.json", "params.msgpack"]
    for index in range(2):  # each pod kept its compiled programs in its own cache, none on the claim
        assert any((tmp_path / f"pod{index}" / "cache" / "jax").iterdir())
    assert sorted(os.listdir(workspace)) == ["data", "logs", "model", "train.yaml"]


def images(docs: list[dict]) -> set[str]:
    """The image of every container in the Jobs' pods, init containers too."""
    pods = [doc["spec"]["template"]["spec"] for doc in docs if doc["kind"] == "Job"]
    return {container["image"] for pod in pods for container in pod["containers"] + pod["initContainers"]}


def test_every_container_runs_the_image_given():
    """--image replaces mlcube.yaml's in every container, the init containers' too, and in the variable
    that the outputs record; without it, mlcube.yaml's."""
    given = "registry.example:5000/team/mnist-jax@sha256:" + "0" * 64
    docs = manifests("download", "train", "--processes=2", f"--image={given}")
    assert images(docs) == {given}
    assert {"name": "MNIST_IMAGE", "value": given} in jobs("train", f"--image={given}")[0][
        "spec"]["template"]["spec"]["containers"][0]["env"]
    assert images(manifests("train")) == {noxfile.IMAGE}


def test_pull_secrets_go_to_every_pod(faults):
    docs = manifests("download", "train", "--pull-secret=regcred", "--pull-secret", "team.registry")
    for job in (doc for doc in docs if doc["kind"] == "Job"):
        assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "team.registry"}]
    assert faults(docs) == [""] * len(docs)
    assert "imagePullSecrets" not in jobs("train")[0]["spec"]["template"]["spec"]


@pytest.mark.parametrize("option", [
    "--image=Mnist-Jax", "--image=mnist jax", "--image=mnist-jax:", "--image=mnist-jax:-1",
    "--image=mnist-jax@sha256:12", "--image=mnist-jax:1@sha256:" + "0" * 64, "--image=mnist-jax\nkind: Pod",
    "--image=-mnist", "--image=a//b",
    "--image=a/b;rm", "--pull-secret=Regcred", "--pull-secret=reg_cred", "--pull-secret=" + "a" * 254,
])
def test_a_bad_image_or_secret_is_refused_in_one_line(option):
    """Each lands in a manifest, as written: anything but a valid reference or name is refused."""
    with pytest.raises(noxfile.UsageError) as refused:
        noxfile.parse_args(["train", option], "run-k8s")
    assert "\n" not in str(refused.value) and str(refused.value).startswith(option.split("=")[0] + " expects ")


def test_only_the_cluster_runners_take_an_image():
    with pytest.raises(noxfile.UsageError, match="--image is an option of run-k8s and run-kubeflow, not of run-docker"):
        noxfile.parse_args(["train", "--image=mnist-jax:1"], "run-docker")
    assert noxfile.parse_args(["train", "--image=mnist-jax:1"], "run-kubeflow").image == "mnist-jax:1"


# ------------------------------------------------------- the workspace's configs, sent to an empty claim
def config_maps(docs: list[dict]) -> dict[str, dict]:
    """Each ConfigMap's files by their paths on the claim, as the pod that mounts it sees them: the
    bytes of its data (text) or binaryData, placed by the pod's items."""
    maps = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "ConfigMap"}
    files = {}
    for job in (doc for doc in docs if doc["kind"] == "Job"):
        for volume in job["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in volume:
                config_map = maps[volume["configMap"]["name"]]
                contents = {**{key: text.encode() for key, text in config_map.get("data", {}).items()},
                            **{key: base64.b64decode(data) for key, data in config_map.get("binaryData", {}).items()}}
                files[job["metadata"]["name"]] = {item["path"]: contents[item["key"]]
                                                  for item in volume["configMap"]["items"]}
    return files


def test_session_dry_run_sends_the_configs_to_the_claim_in_schema_valid_manifests(tmp_path, faults):
    """The README's run from an empty claim, printed: each task's Job comes after a ConfigMap holding,
    byte for byte, the workspace's files it reads (download data.yaml, train train.yaml), which its pod
    mounts read-only in the init container that copies them onto the claim; every manifest passes the
    Kubernetes schemas (kubernetes-validate: a schema check, no cluster)."""
    for name in ("data.yaml", "train.yaml"):
        shutil.copy(ROOT / "workspace" / name, tmp_path / name)
    result = nox("-s", "run-k8s", "--", "download", "train", "--create-pvc", f"--workspace={tmp_path}", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "ConfigMap", "NetworkPolicy", "Job", "ConfigMap",
                                         "NetworkPolicy", "Job"]
    download, train = (doc["metadata"]["name"] for doc in docs if doc["kind"] == "Job")
    assert config_maps(docs) == {download: {"data.yaml": (tmp_path / "data.yaml").read_bytes()},
                                 train: {"train.yaml": (tmp_path / "train.yaml").read_bytes()}}
    assert "data.yaml: |\n    # Where the download task" in result.stdout  # a block of lines, as people write it
    for job in (doc for doc in docs if doc["kind"] == "Job"):
        pod = job["spec"]["template"]["spec"]
        [copy] = [c for c in pod["initContainers"] if c["name"] == "configs"]
        assert {"name": "configs", "mountPath": "/configs", "readOnly": True} in copy["volumeMounts"]
        assert copy["securityContext"] == pod["containers"][0]["securityContext"]
        assert not any(m["name"] == "configs" for m in pod["containers"][0]["volumeMounts"])
    assert faults(docs) == [""] * len(docs)


def test_the_data_that_data_yaml_names_goes_beside_it_as_binary_data(tmp_path):
    """The offline route: an npz beside data.yaml, sent as binaryData with it, to the same place on the
    claim; a task after download reads what download wrote, and is sent nothing of it."""
    body = npz_bytes(make_digits(64, 16))
    workspace = source_workspace(tmp_path / "ws", body)
    docs = manifests("download", "infer", workspace=workspace)
    download, infer = (doc for doc in docs if doc["kind"] == "Job")
    files = config_maps(docs)
    assert files == {download["metadata"]["name"]: {"data.yaml": (workspace / "data.yaml").read_bytes(),
                                                    "mnist.npz": body}}
    assert [doc["kind"] for doc in docs].count("ConfigMap") == 1
    assert [c["name"] for c in infer["spec"]["template"]["spec"]["initContainers"]] == ["folders"]


def test_more_than_a_configmap_holds_is_refused_in_one_line(tmp_path):
    workspace = source_workspace(tmp_path / "ws", os.urandom(1024 * 1024))
    with pytest.raises(noxfile.UsageError) as refused:
        manifests("download", workspace=workspace)
    message = str(refused.value)
    assert "\n" not in message
    assert f"the largest is {workspace / 'mnist.npz'}: put it on the claim at mnist.npz yourself" in message
    assert "more than the 1,048,576 a ConfigMap holds" in message


def test_a_file_too_big_to_send_is_refused_unread(tmp_path):
    """The refusal comes from the files' sizes: a 64 MiB npz (sparse) and a 64 MiB data.yaml are not
    read into memory to learn that they do not fit."""
    workspace = source_workspace(tmp_path / "ws", b"npz")
    os.truncate(workspace / "mnist.npz", 64 * 1024 * 1024)
    tracemalloc.start()
    with pytest.raises(noxfile.UsageError, match="a ConfigMap holds"):
        manifests("download", workspace=workspace)
    os.truncate(workspace / "data.yaml", 64 * 1024 * 1024)
    with pytest.raises(noxfile.UsageError, match="a ConfigMap holds"):
        manifests("download", workspace=workspace)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


@pytest.mark.parametrize("uri", ["file:///srv/mnist.npz", "/srv/mnist.npz", "C:/data/mnist.npz"])
def test_a_path_of_this_machine_in_data_yaml_is_refused(tmp_path, uri):
    (tmp_path / "data.yaml").write_text(f"uri: {uri}\nhash: {'0' * 64}\n")
    with pytest.raises(noxfile.UsageError, match=f"data.yaml: uri '{uri}' is a path of this machine"):
        manifests("download", workspace=tmp_path)


def test_standin_pods_run_download_train_evaluate_from_an_empty_claim(tmp_path):
    """STAND-IN for a cluster: each Job's init containers and task, in turn, as local processes on a
    folder laid out as its pods see the claim. The copy command runs as written, from a folder holding
    configs/ (the ConfigMap's files, as the pod's volume places them) and workspace/ (the claim, empty at
    first); then mnist.py runs the task's arguments against the claim. The configs reach the claim, and
    the three tasks succeed on it."""
    workspace = source_workspace(tmp_path / "ws", npz_bytes(make_digits(512, 128)))
    claim = tmp_path / "claim"
    claim.mkdir()
    docs = manifests("download", "train", "evaluate", workspace=workspace)
    sent = config_maps(docs)
    for index, job in enumerate(doc for doc in docs if doc["kind"] == "Job"):
        pod, root = job["spec"]["template"]["spec"], tmp_path / f"root{index}"
        (root / "configs").mkdir(parents=True)
        (root / "workspace").symlink_to(claim)
        for path, content in sent.get(job["metadata"]["name"], {}).items():
            (root / "configs" / path).parent.mkdir(parents=True, exist_ok=True)
            (root / "configs" / path).write_bytes(content)
        for init in pod["initContainers"]:
            command = [arg.replace("/workspace", str(root / "workspace")) for arg in init["command"]]
            subprocess.run(command, cwd=root / init.get("workingDir", "/").lstrip("/"), check=True)
        command, env = pod_command(job, index, claim)
        task = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
        assert task.returncode == 0, task.stderr[-2000:]
    assert sorted(os.listdir(claim)) == ["data", "data.yaml", "logs", "mnist.npz", "model", "train.yaml"]
    assert (claim / "train.yaml").read_bytes() == (workspace / "train.yaml").read_bytes()
    assert json.loads((claim / "logs" / "evaluate_metrics.json").read_text())["test_accuracy"] > 0.5


def test_a_folder_that_data_yaml_names_goes_file_by_file_to_the_same_paths(tmp_path):
    """An image set's folder: each file under its own key (in the characters a key may hold), placed
    back at its path by the pod's items."""
    files = {"images/cat/1.png": b"\x89PNG cat", "images/dog x/2.png": b"\x89PNG dog", "images/.hidden": b"x"}
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(content)
    (tmp_path / "data.yaml").write_text("uri: images\n")
    docs = manifests("download", workspace=tmp_path)
    [sent] = config_maps(docs).values()
    assert sent == {"data.yaml": b"uri: images\n", **files}
    [config_map] = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    keys = [*config_map["data"], *config_map.get("binaryData", {})]
    assert all(re.fullmatch(r"[-._a-zA-Z0-9]+", key) and not key.startswith("..") for key in keys)


def test_a_data_yaml_that_is_not_yaml_is_refused_in_one_line(tmp_path):
    (tmp_path / "data.yaml").write_text("uri: [mnist.npz\nhash: 0\n")
    with pytest.raises(noxfile.UsageError) as refused:
        manifests("download", workspace=tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / 'data.yaml'}: not a YAML file (")
    assert "\n" not in str(refused.value)


# ------------------------------------------------------- what is sent: regular files of the workspace only
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not to be sent"


def linked_workspace(tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """A workspace whose data.yaml names data that reaches a host file outside it (a stand-in for
    ~/.ssh/id_rsa) through a symbolic link, or names a FIFO; with the path that run-k8s must refuse."""
    ws, secret = tmp_path / "ws", tmp_path / "id_rsa"
    secret.write_bytes(SECRET)
    (ws / "imgs" / "a").mkdir(parents=True)
    (ws / "imgs" / "a" / "1.png").write_bytes(b"\x89PNG")
    uri, refused = {"link in folder": ("imgs", ws / "imgs" / "a" / "0.png"),
                    "folder link in folder": ("imgs", ws / "imgs" / "b"),
                    "uri is a link": ("key.npz", ws / "key.npz"),
                    "uri through a linked folder": ("outside/id_rsa", ws / "outside" / "id_rsa"),
                    "fifo in folder": ("imgs", ws / "imgs" / "a" / "fifo")}[layout]
    if layout == "folder link in folder":
        refused.symlink_to(tmp_path)
    elif layout == "uri through a linked folder":
        (ws / "outside").symlink_to(tmp_path)
    elif layout == "fifo in folder":
        os.mkfifo(refused)
    else:
        refused.symlink_to(secret)
    (ws / "data.yaml").write_text(f"uri: {uri}\n")
    return ws, refused


@pytest.mark.parametrize("layout", ["link in folder", "folder link in folder", "uri is a link",
                                    "uri through a linked folder", "fifo in folder"])
def test_a_link_or_special_file_in_the_data_is_refused_in_one_line(tmp_path, layout):
    """mnist.py follows no link out of the workspace, and neither does what run-k8s sends: the path is
    named, with what to do, and nothing of what it reaches is read (a FIFO would block the read)."""
    ws, refused = linked_workspace(tmp_path, layout)
    with pytest.raises(noxfile.UsageError) as error:
        manifests("download", workspace=ws)
    message = str(error.value)
    assert "\n" not in message and str(refused) in message and "put the file itself there" in message
    assert SECRET.decode() not in message


def test_session_dry_run_prints_nothing_of_a_linked_file(tmp_path):
    """Through the session: ws/imgs/a/0.png -> id_rsa ends the dry run with one line, before any manifest."""
    ws, refused = linked_workspace(tmp_path, "link in folder")
    result = nox("-R", "-s", "run-k8s", "--", "download", "--dry-run", f"--workspace={ws}")
    assert result.returncode == 1, result.stdout[-2000:]
    assert SECRET.decode() not in result.stdout + result.stderr
    assert base64.b64encode(SECRET).decode()[:40] not in result.stdout + result.stderr
    assert "kind: ConfigMap" not in result.stdout
    [line] = [line for line in (result.stdout + result.stderr).splitlines() if str(refused) in line]
    assert "put the file itself there" in line


@pytest.mark.parametrize("paths", [["imgs/a b", "imgs/a_b", "2-imgs/a_b"],
                                   ["imgs/a b", "imgs/a_b", "2-imgs/a_b", "imgs/a.b", "1-imgs/a b", ".x", "_x"]])
def test_colliding_paths_get_distinct_keys(paths):
    """'imgs/a b' and 'imgs/a_b' share a key; the number that tells them apart must not make the key of
    a third path ('2-imgs/a_b'), or one file's bytes would land at two paths."""
    keys = noxfile.k8s_keys({path: f"/ws/{path}" for path in paths})
    assert sorted(keys) == sorted(paths)
    assert len(set(keys.values())) == len(paths)
    assert all(re.fullmatch(r"[-._a-zA-Z0-9]+", key) and not key.startswith(".") for key in keys.values())


def test_colliding_paths_each_come_back_with_their_own_bytes(tmp_path):
    """Through the ConfigMap and the pod's items: beside data.yaml (the second key), 'imgs/a_b' would
    be numbered 3, the key of '3-imgs/a_b'."""
    files = {"imgs/a b": b"space", "imgs/a_b": b"underscore", "3-imgs/a_b": b"numbered"}
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(content)
    (tmp_path / "data.yaml").write_text("files:\n  a: {uri: imgs}\n  b: {uri: 3-imgs}\n")
    [sent] = config_maps(manifests("download", workspace=tmp_path)).values()
    assert sent == {"data.yaml": (tmp_path / "data.yaml").read_bytes(), **files}


def test_the_copy_runs_in_every_pod_of_an_indexed_job_at_once(tmp_path):
    """sweep --workers=4: the four pods' init containers copy the same ConfigMap onto the shared claim at
    the same time (STAND-IN: four processes of K8S_COPY on one folder). Each succeeds, and the claim
    holds each file's bytes, readable as a plain copy's, and no half-written part."""
    files = {f"data/{index:03d}.bin": os.urandom(64 * 1024 + index) for index in range(200)}
    files["train.yaml"] = b"epochs: 1\n"
    for path, content in files.items():
        (tmp_path / "configs" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "configs" / path).write_bytes(content)
    (tmp_path / "workspace").mkdir()
    command = [sys.executable, "-c", noxfile.K8S_COPY, *sorted(files)]
    copies = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [copy.communicate(timeout=120)[1] for copy in copies]
    assert [copy.returncode for copy in copies] == [0] * 4, errors
    claim = tmp_path / "workspace"
    assert {str(p.relative_to(claim)) for p in claim.rglob("*") if p.is_file()} == set(files)
    assert all((claim / path).read_bytes() == content for path, content in files.items())
    mask = os.umask(0o022)
    os.umask(mask)
    assert {(claim / path).stat().st_mode & 0o777 for path in files} == {0o666 & ~mask}  # as a plain copy's
