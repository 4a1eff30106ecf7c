# The MNIST MLCube image: mnist.py and its dependencies in a virtualenv; tasks run as their caller.
#   nox -s configure-docker                              (or: docker build -t mlcommons/mnist-jax:0.0.1 .)
# Classic-builder syntax only: the Docker SDK for Python builds without BuildKit.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# JAX_EXTRA=cuda12 installs JAX's CUDA build for a GPU image; left empty, JAX runs on the CPU.
ARG JAX_EXTRA=
# HOME=/tmp: tasks run as the caller's uid, which has no home in the image.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp

RUN python3 -m venv /opt/venv
# Dependencies before code, so editing mnist.py rebuilds small layers only.
COPY requirements.txt /mlcube/requirements.txt
RUN pip install -r /mlcube/requirements.txt ${JAX_EXTRA:+"jax[$JAX_EXTRA]"}
# The whole build context, which .dockerignore narrows to the files the runners fingerprint; their
# SHA-256s are recorded, so that outputs name the code that made them under any runner, MLCube's too.
COPY . /mlcube/
RUN cd /mlcube && sha256sum $(ls -A) > /opt/sources.sha256
ENV MNIST_IMAGE_SOURCES=/opt/sources.sha256

# A plain user, not root, for whatever starts the image without saying who (Kubeflow, a bare docker run);
# the same uid as run-k8s's pods (noxfile.py's K8S_USER). Our runners pass --user=UID:GID and drop every
# capability. MLCube's runner makes the task's output folders as its caller and can pass no uid of theirs,
# so mlcube.yaml starts its containers as root, and mnist.py then becomes the owner of the folder that
# receives the task's first output, so the caller owns what the task writes (MNIST_RUN_AS_OUTPUT_OWNER).
ENV MNIST_RUN_AS_OUTPUT_OWNER=1
WORKDIR /mlcube
USER 10001:10001
ENTRYPOINT ["python3", "/mlcube/mnist.py"]
