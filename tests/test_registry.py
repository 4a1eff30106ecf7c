"""The image where a cluster can pull it: `nox -s push` to a real registry (Docker Distribution, Debian's
docker-registry, on 127.0.0.1, which Docker reaches without TLS), the image pulled back by the digest it
printed and run, and run-k8s naming that digest in its manifests."""
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml
from conftest import BASE, free_port, needs_docker, nox

import noxfile

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def registry(tmp_path):
    """A registry on a free port of 127.0.0.1, storing in tmp_path: its host:port."""
    binary = shutil.which("docker-registry")
    if not binary:
        pytest.skip("no docker-registry binary (apt-get install docker-registry)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(yaml.safe_dump({"version": 0.1, "log": {"level": "warn"},
                                      "storage": {"filesystem": {"rootdirectory": str(tmp_path / "storage")}},
                                      "http": {"addr": f"127.0.0.1:{port}"}}))
    process = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(f"http://127.0.0.1:{port}/v2/", process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for(url: str, process: subprocess.Popen, seconds: float = 30) -> None:
    """Until `url` answers; the server's error output if it ends first or never answers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.terminate()
    pytest.fail(f"the registry did not answer at {url}: {process.communicate(timeout=10)[1].decode()[-2000:]}")


def registry_digest(registry: str, repository: str, tag: str) -> str:
    """The digest the registry holds for repository:tag, as a pull by tag would get it."""
    request = urllib.request.Request(f"http://{registry}/v2/{repository}/manifests/{tag}", method="HEAD",
                                     headers={"Accept": MANIFEST_V2})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.headers["Docker-Content-Digest"]


def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True)


@needs_docker
def test_push_pull_by_digest_run_and_name_it_in_manifests(registry, image):
    tagged = f"{registry}/mnist-jax:test"
    pushed = nox("-s", "push", "--", tagged, *BASE)
    assert pushed.returncode == 0, pushed.stdout[-3000:] + pushed.stderr[-3000:]
    reference = pushed.stdout.splitlines()[-1]
    digest = registry_digest(registry, "mnist-jax", "test")
    assert reference == f"{registry}/mnist-jax@{digest}" and digest.startswith("sha256:")
    try:
        shown = nox("-s", "run-k8s", "--", "train", f"--image={tagged}", "--dry-run")
        assert shown.returncode == 0, shown.stdout[-3000:] + shown.stderr[-3000:]
        assert f"run-k8s: {tagged} is {reference}" in shown.stderr
        pods = [doc["spec"]["template"]["spec"] for doc in yaml.safe_load_all(shown.stdout) if doc["kind"] == "Job"]
        assert {c["image"] for pod in pods for c in pod["containers"] + pod["initContainers"]} == {reference}

        assert docker("rmi", tagged).returncode == 0
        pulled = docker("pull", reference)
        assert pulled.returncode == 0, pulled.stderr
        ran = docker("run", "--rm", "--network=none", reference, "train", "--help")
        assert ran.returncode == 0 and "--model_dir" in ran.stdout, ran.stdout + ran.stderr
    finally:
        docker("rmi", tagged)
        docker("rmi", reference)


@needs_docker
def test_a_push_nowhere_fails_in_one_line_naming_the_registry(image):
    port = free_port()  # nothing listens there
    pushed = nox("-s", "push", "--", f"127.0.0.1:{port}/mnist-jax:test", *BASE)
    try:
        assert pushed.returncode == 1
        assert f"docker push of 127.0.0.1:{port}/mnist-jax:test to 127.0.0.1:{port} failed: " in pushed.stderr
        assert "Traceback" not in pushed.stderr
    finally:
        docker("rmi", f"127.0.0.1:{port}/mnist-jax:test")


@pytest.mark.parametrize("args, message", [
    ([], "name the image to push, once"),
    (["a/b", "c/d"], "name the image to push, once"),
    (["Not An Image"], "push takes an image reference, NAME[:TAG]"),
    (["a/b@sha256:" + "0" * 64], "push takes NAME[:TAG], not a digest"),
    (["a/b", "--pvc=x"], "--pvc is an option of run-k8s, not of push"),
])
def test_push_usage_errors(args, message):
    result = nox("-s", "push", "--", *args)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_push_takes_the_tag_of_mlcube_yamls_image_by_default():
    opts = noxfile.push_args(["registry.example:5000/mnist-jax", "--build-arg", "BASE_IMAGE=b"], "push")
    assert opts.image == "registry.example:5000/mnist-jax:" + noxfile.IMAGE.rsplit(":", 1)[1]
    assert opts.build_args == {"BASE_IMAGE": "b"}


def test_push_dry_run_pushes_nothing():
    result = nox("-s", "push", "--", "registry.example:5000/mnist-jax:1", "--dry-run")
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "docker push registry.example:5000/mnist-jax:1"
