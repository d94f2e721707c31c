# pixsigma on a CUDA PyTorch base: the image a Ray cluster's nodes and the torchrun trainers run.
# Build: docker build -t pixsigma .   (no Docker engine in the dev sandbox; CI lints this file with hadolint)
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /opt/pixsigma

# Dependencies first (cached layer), then the code. The base image's torch satisfies the torch range.
COPY pyproject.toml README.md constraints.txt ./
COPY manifests ./manifests
COPY curation ./curation
COPY captioning ./captioning
COPY training ./training
COPY configs ./configs
# Versions come from constraints.txt (the tested set), minus the torch stack the base image brings.
# hadolint ignore=DL3013
RUN grep -v -E '^(torch|torchvision|triton|nvidia-)' constraints.txt > /tmp/constraints.txt \
    && python -m pip install --no-cache-dir -c /tmp/constraints.txt ".[dev]" \
    && useradd --create-home --uid 1000 pixsigma
USER 1000

CMD ["python", "-c", "import manifests, curation, captioning, training; print('pixsigma ready')"]
