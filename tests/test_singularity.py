"""The Singularity runner and recipe.

No Singularity or Apptainer binary can be installed on the test machines, so the runner tests put a
STAND-IN on PATH (tests/standin/singularity): it records every command line it is given and acts
it out on the host (a placeholder image for `build`; `run` maps the binds back to host paths and
runs mnist.py). Everything up to that boundary is real: the nox session, spython, the exact command
lines, and mnist.py writing into the workspace. The recipe is parsed with spython's real parser.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import BASE, CUBE_FILES, ROOT, make_digits, needs_docker, nox, npz_bytes, sha256, source_workspace
from conftest import IMAGE as DOCKER_IMAGE
from spython.main.parse.parsers import DockerParser, SingularityParser

import noxfile

STANDIN = ROOT / "tests" / "standin"
IMAGE = "mnist-0.0.1.simg"


@pytest.fixture
def standin(tmp_path):
    """PATH with the stand-in binary first, and a function returning what it was asked to do."""
    log = tmp_path / "standin.log"
    log.touch()
    env = {"PATH": f"{STANDIN}:{os.environ['PATH']}", "STANDIN_LOG": str(log),
           "MNIST_COMPILATION_CACHE": str(tmp_path / "cache")}

    def recorded():
        return [cmd for cmd in map(json.loads, log.read_text().splitlines()) if cmd != ["singularity", "--version"]]

    return env, recorded


def served_workspace(tmp_path, server, digest=None):
    return source_workspace(tmp_path / "ws", npz_bytes(make_digits()), server, digest)


def test_standin_configure_singularity_builds_the_recipe_without_root(tmp_path, standin):
    env, recorded = standin
    result = nox("-s", "configure-singularity", "--", f"--workspace={tmp_path}", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert recorded() == [["singularity", "build", "--force", "--fakeroot", str(tmp_path / ".image" / IMAGE),
                           str(ROOT / "Singularity.recipe")]]
    assert (tmp_path / ".image" / IMAGE).is_file() and "Build complete" in result.stdout

@needs_docker
def test_standin_configure_singularity_from_the_docker_image(tmp_path, standin, image):
    env, recorded = standin
    result = nox("-s", "configure-singularity", "--", f"--workspace={tmp_path}", "--from-docker", *BASE, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert recorded() == [["singularity", "build", "--force", str(tmp_path / ".image" / IMAGE),
                           f"docker-daemon://{DOCKER_IMAGE}"]]


@needs_docker
def test_standin_from_docker_converts_the_sources_as_they_are_now(tmp_path, standin, image):
    """A copy of the cube, with an image name of its own, whose Docker image was built before its
    mnist.py changed: --from-docker rebuilds that image first, saying why, then converts it, and the
    Singularity image records the sources the Docker image was built from."""
    import docker

    env, recorded = standin
    cube = tmp_path / "cube"
    cube.mkdir()
    for name in CUBE_FILES:
        shutil.copy(ROOT / name, cube / name)
    spec = yaml.safe_load((cube / "mlcube.yaml").read_text())
    spec["docker"]["image"] = own = f"mnist-from-docker-test:{os.getpid()}"
    (cube / "mlcube.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    nox_in_cube = [sys.executable, "-m", "nox", "-f", str(cube / "noxfile.py"), "-s"]
    try:
        built = subprocess.run([*nox_in_cube, "configure-docker", "--", *BASE], capture_output=True, text=True)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        with open(cube / "mnist.py", "a") as f:
            f.write("# edited\n")
        result = subprocess.run([*nox_in_cube, "configure-singularity", "--", "--from-docker", *BASE,
                                 f"--workspace={tmp_path / 'ws'}"], capture_output=True, text=True,
                                env={**os.environ, **env}, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "building the image: changed since it was built: mnist.py" in result.stderr
        label = docker.from_env().images.get(own).labels[noxfile.SOURCES_LABEL]
    finally:
        subprocess.run(["docker", "rmi", "-f", own], capture_output=True)
    assert json.loads(label)["files"]["mnist.py"] == sha256((cube / "mnist.py").read_bytes())
    assert json.loads((tmp_path / "ws" / ".image" / f"{IMAGE}.sources.json").read_text()) == json.loads(label)
    assert recorded() == [["singularity", "build", "--force", str(tmp_path / "ws" / ".image" / IMAGE),
                           f"docker-daemon://{own}"]]


def test_standin_run_singularity_download_and_train(tmp_path, server, standin):
    env, recorded = standin
    ws = served_workspace(tmp_path, server)
    result = nox("-s", "run-singularity", "--", "download", "train", f"--workspace={ws}", "--env=SEEN=1", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    image = str(ws / ".image" / IMAGE)
    built = json.loads((ws / ".image" / f"{IMAGE}.sources.json").read_text())
    assert sorted(built["files"]) == ["Singularity.recipe", "mnist.py", "requirements.txt"]
    provenance = ["--env", f"MNIST_IMAGE={image} (sources {sha256(json.dumps(built, sort_keys=True).encode())[:16]})"]
    cache = tmp_path / "cache-containers"  # the containers' own, beside the one local runs use
    assert recorded() == [
        ["singularity", "build", "--force", "--fakeroot", image, str(ROOT / "Singularity.recipe")],
        ["singularity", "run", "--bind", f"{ws}:/mlcube_io0:ro", "--bind", f"{ws}/data:/mlcube_io1:rw",
         "--bind", f"{ws}/logs:/mlcube_io2:rw", "--containall", "--no-home", *provenance,
         "--env", "MNIST_COMPILATION_CACHE=off", "--env", "JAX_PLATFORMS=cpu", "--env", "SEEN=1", image,
         "download", "--data_config=/mlcube_io0/data.yaml", "--data_dir=/mlcube_io1", "--log_dir=/mlcube_io2"],
        ["singularity", "run", "--bind", f"{ws}/data:/mlcube_io0:ro", "--bind", f"{ws}:/mlcube_io1:ro",
         "--bind", f"{ws}/logs:/mlcube_io2:rw", "--bind", f"{ws}/model:/mlcube_io3:rw", "--bind", f"{cache}:/cache:rw",
         "--containall", "--no-home", "--net", "--network=none", *provenance,
         "--env", "MNIST_COMPILATION_CACHE=/cache", "--env", "JAX_PLATFORMS=cpu", "--env", "SEEN=1", image,
         "train", "--data_dir=/mlcube_io0", "--train_config=/mlcube_io1/train.yaml", "--log_dir=/mlcube_io2",
         "--model_dir=/mlcube_io3"]]
    assert json.loads((ws / "model" / "model.json").read_text())["image"] == provenance[1].removeprefix("MNIST_IMAGE=")
    assert any(cache.iterdir())  # train kept its compiled programs in the bound cache folder
    assert cache.stat().st_mode & 0o777 == 0o700 and not (tmp_path / "cache").exists()
    assert json.loads((ws / "model" / "model.json").read_text())["epochs_run"] == 1
    assert "epoch 1/1" in result.stdout  # the task's output streamed through spython
    dry = nox("-s", "run-singularity", "--", "download", "train", f"--workspace={ws}", "--env=SEEN=1", "--dry-run",
              env={"MNIST_COMPILATION_CACHE": str(tmp_path / "cache")})
    up_to_date, *runs = dry.stdout.splitlines()  # the image's plan first, as '#' lines
    assert up_to_date == f"# {image} is up to date: nothing to build"
    assert [shlex.split(line) for line in runs] == recorded()[1:]


def test_standin_gpus_add_nv(tmp_path, server, standin):
    env, recorded = standin
    ws = served_workspace(tmp_path, server)
    result = nox("-s", "run-singularity", "--", "download", f"--workspace={ws}", "--gpus=all", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert recorded()[-1][:3] == ["singularity", "run", "--nv"]


def test_standin_failing_task_propagates_its_code(tmp_path, server, standin):
    env, recorded = standin
    ws = served_workspace(tmp_path, server, digest="d" * 64)
    result = nox("-s", "run-singularity", "--", "download", "train", f"--workspace={ws}", env=env)
    assert result.returncode == 1 and "SHA-256 mismatch" in result.stdout + result.stderr
    legend = f"(/mlcube_io0 is {ws}; /mlcube_io1 is {ws / 'data'}; "  # the host paths behind the task's line
    assert f"task download failed with exit code 1 {legend}" in result.stderr
    image = str(ws / ".image" / IMAGE)
    assert [cmd[cmd.index(image) + 1] for cmd in recorded() if cmd[1] == "run"] == ["download"]  # no train


@pytest.mark.parametrize("binaries, message", [
    ([], "neither apptainer nor singularity is on PATH: install Apptainer"),
    (["apptainer"], "found apptainer but no `singularity` command"),
])
def test_missing_binary_is_one_clear_line(tmp_path, binaries, message):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in binaries:
        (bin_dir / name).symlink_to("/bin/true")
    python_dir = os.path.dirname(os.path.realpath(os.sys.executable))
    result = nox("-s", "run-singularity", "--", "download", f"--workspace={tmp_path}",
                 env={"PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin"})
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_standin_dry_run_shows_the_image_build_that_configure_singularity_runs(tmp_path, standin):
    """run-singularity's --dry-run, with the Singularity STAND-IN (tests/standin/singularity) on PATH:
    first the image's plan, a '#' line with the reason to build and the very command line that
    configure-singularity then runs; once the image is built, a '#' line saying it is up to date; once
    its sources change, the build again, saying why. Every other line is a task's command, and a dry
    run runs nothing."""
    env, recorded = standin
    image = tmp_path / ".image" / IMAGE

    def planned():
        dry = nox("-s", "run-singularity", "--", "download", "train", f"--workspace={tmp_path}", "--dry-run", env=env)
        assert dry.returncode == 0, dry.stderr
        *plan, download, train = dry.stdout.splitlines()
        assert [shlex.split(line)[:2] for line in (download, train)] == [["singularity", "run"]] * 2
        return plan

    reason, build = planned()
    assert reason == "# building the image first: there is no image yet" and not image.parent.exists()
    assert recorded() == []
    assert nox("-s", "configure-singularity", "--", f"--workspace={tmp_path}", env=env).returncode == 0
    assert recorded() == [shlex.split(build)]
    assert planned() == [f"# {image} is up to date: nothing to build"]
    record = image.with_name(f"{IMAGE}.sources.json")
    built = json.loads(record.read_text())
    record.write_text(json.dumps({**built, "files": {**built["files"], "mnist.py": "0" * 64}}))
    assert planned() == ["# building the image first: changed since it was built: mnist.py", build]
    assert recorded() == [shlex.split(build)]


HIDE_PACKAGE = """import runpy, sys
sys.modules[sys.argv[1]] = None  # its import fails, as where the package is not installed
sys.argv = ["nox", *sys.argv[2:]]
runpy.run_module("nox", run_name="__main__")
"""


@pytest.mark.parametrize("package, session", [
    ("spython", ["run-singularity", "--", "train", "--dry-run"]),
    ("spython", ["run-slurm", "--", "train", "--container=apptainer", "--dry-run"]),
    ("docker", ["run-singularity", "--", "train", "--from-docker", "--dry-run"]),
])
def test_a_missing_package_is_one_line_saying_how_to_install_it(tmp_path, package, session):
    """The Singularity route's --dry-run, which needs no binary, in a nox whose Python cannot import
    `package` (this Python, the package hidden from it): that one line, exit code 1, no traceback."""
    result = subprocess.run([sys.executable, "-c", HIDE_PACKAGE, package, "-f", str(ROOT / "noxfile.py"), "-s",
                             *session, f"--workspace={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if "pip install" in line] == [
        f"nox > Session {session[0]} aborted: {noxfile.MISSING[package]}."]
    assert result.stdout == ""


def test_recipe_stays_in_step_with_the_dockerfile():
    """spython's parsers read both files: same base, same files (each image copies in what it is built
    from, its own recipe included, and records their SHA-256), same venv install, same entry point."""
    docker = DockerParser(str(ROOT / "Dockerfile")).recipe["spython-base"]
    recipe = SingularityParser(str(ROOT / "Singularity.recipe")).recipe["spython-base"]
    assert recipe.fromHeader == docker.fromHeader
    assert [line.split() for line in recipe.files] == [
        ["requirements.txt", "/mlcube/requirements.txt"], ["mnist.py", "/mlcube/mnist.py"],
        ["Singularity.recipe", "/mlcube/Singularity.recipe"]]
    assert docker.files == [["requirements.txt", "/mlcube/requirements.txt"], [".", "/mlcube/"]]
    assert {"Dockerfile", "mnist.py", "requirements.txt"} <= set(noxfile.docker_sources())
    record = "cd /mlcube && sha256sum $(ls -A) > /opt/sources.sha256"
    assert record in recipe.install and record in docker.install
    assert "MNIST_IMAGE_SOURCES=/opt/sources.sha256" in docker.environ
    assert shlex.split(recipe.cmd) == ["exec", *docker.entrypoint, "$@"]
    assert "python3 -m venv /opt/venv" in recipe.install and "python3 -m venv /opt/venv" in docker.install
    assert any("pip install" in line and "-r /mlcube/requirements.txt" in line for line in recipe.install)
    environ = " ".join(recipe.environ).split()
    assert {"PATH=/opt/venv/bin:$PATH", "PYTHONUNBUFFERED=1", "PYTHONNOUSERSITE=1",
            "MNIST_IMAGE_SOURCES=/opt/sources.sha256"} <= set(environ)
    assert {"PATH=/opt/venv/bin:$PATH", "PYTHONUNBUFFERED=1"} <= set(docker.environ)
    assert recipe.labels and "%help" in (ROOT / "Singularity.recipe").read_text()


def test_standin_run_singularity_rebuilds_a_stale_image_and_says_why(tmp_path, server, standin):
    """The image records its sources beside it; a run rebuilds when they no longer match, else not."""
    env, recorded = standin
    ws = served_workspace(tmp_path, server)
    assert nox("-s", "run-singularity", "--", "download", f"--workspace={ws}", env=env).returncode == 0
    record = ws / ".image" / f"{IMAGE}.sources.json"
    again = nox("-s", "run-singularity", "--", "download", f"--workspace={ws}", env=env)
    assert again.returncode == 0 and "building the image" not in again.stderr
    built = json.loads(record.read_text())
    record.write_text(json.dumps({**built, "files": {**built["files"], "mnist.py": "0" * 64}}))
    stale = nox("-s", "run-singularity", "--", "download", f"--workspace={ws}", env=env)
    assert stale.returncode == 0, stale.stdout + stale.stderr
    assert "building the image: changed since it was built: mnist.py" in stale.stderr
    assert [cmd[1] for cmd in recorded()] == ["build", "run", "run", "build", "run"]
    assert json.loads(record.read_text()) == built
