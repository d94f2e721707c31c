# pixsigma for cluster nodes: the Ray workers of the curation, captioning and materialize jobs and the torchrun
# trainers, on exactly the tested stack of constraints.txt.
#   docker build -t pixsigma .                      the runtime image (default target)
#   docker build -t pixsigma:dev --target dev .     + the dev tools and tests/ (pytest -q tests)
#   docker run --gpus all -v /mnt/shared:/mnt/shared pixsigma torchrun --no-python --nproc_per_node=8 pixsigma-train …
# No Docker engine in the dev sandbox: tests/test_dockerfile.py checks this file and hadolint lints it.
#
# Base: Python 3.11, the version constraints.txt is resolved for. The torch wheel pinned there is PyPI's CUDA
# build and brings its CUDA runtime as the pinned nvidia-* wheels, so a CUDA base image would add nothing; the
# host's driver comes in through the NVIDIA container toolkit (`--gpus`).
FROM python:3.11-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HF_HOME=/work/.cache/huggingface

# The non-root user and its writable work dir (run folders, the HF cache, Ray's working-dir copies).
RUN useradd --create-home --uid 1000 pixsigma \
    && mkdir -p /work \
    && chown pixsigma:pixsigma /work

WORKDIR /opt/pixsigma

# Dependencies in their own layer, before any code: pyproject's ranges at constraints.txt's exact versions,
# torch included; a code change reuses this layer. The build stops if torch is not the pinned version.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt -c constraints.txt \
    && python -c "import torch; pin = [l.split('==')[1].strip() for l in open('constraints.txt') if l.startswith('torch==')][0]; assert torch.__version__.split('+')[0] == pin, (torch.__version__, pin)"

# Test and lint tools: only in the dev target.
FROM base AS dev
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']))" \
        > /tmp/requirements-dev.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements-dev.txt -c constraints.txt
COPY . .
RUN python -m pip install --no-cache-dir --no-deps -e . \
    && chown -R pixsigma:pixsigma /opt/pixsigma
USER 1000
CMD ["pytest", "-q", "tests"]

# The runtime image: the four packages (the LAION head is package data of curation) and the configs.
FROM base AS runtime
COPY README.md ./
COPY manifests ./manifests
COPY curation ./curation
COPY captioning ./captioning
COPY training ./training
COPY configs ./configs
RUN python -m pip install --no-cache-dir --no-deps .
WORKDIR /work
# From /work the packages import from site-packages, not the source tree: the head must be inside the wheel.
RUN python -c "from curation.aesthetic import load_aesthetic_head; print(load_aesthetic_head().model_id)"
USER 1000
CMD ["python", "-c", "import manifests, curation, captioning, training; print('pixsigma ready')"]
