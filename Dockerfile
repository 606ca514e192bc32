# syntax=docker/dockerfile:1
# The darkroom image: workers, producers, Flower, celery beat and the queue exporter all run it
# (docker-compose.yml). Build: docker build -t darkroom:latest .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# Intel's OpenCL runtime, which OpenVINO's GPU plugin needs (the CPU plugin needs nothing). Debian's build knows
# the integrated GPUs and Arc cards of its release; newer ones need Intel's own packages: pass them here, or
# GPU_PACKAGES="" for a CPU-only image. The NPU needs Intel's NPU user-space driver, which Debian does not ship
# (docs/operations.md).
ARG GPU_PACKAGES="intel-opencl-icd"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ${GPU_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/darkroom

# The dependencies first, in a layer of their own, so that changing darkroom's code does not reinstall torch:
# empty packages stand in for the code here. constraints.txt pins every version, torch included.
# PyPI's torch 2.14.1 is a CUDA build (it runs on the CPU, with about 5 GB of nvidia packages); for a smaller
# image pass --build-arg TORCH_INDEX=<the URL of PyTorch's CPU-only wheel index> (the same version, CPU only).
ARG TORCH_INDEX=""
COPY pyproject.toml constraints.txt README.md ./
RUN for p in darkroom tasks broker workers storage; do mkdir -p "$p" && touch "$p/__init__.py"; done \
 && pip install -c constraints.txt ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} '.[worker]' \
 && pip uninstall -y darkroom

COPY darkroom ./darkroom
COPY tasks ./tasks
COPY broker ./broker
COPY workers ./workers
COPY storage ./storage
RUN pip install --no-deps -c constraints.txt '.[worker]' && pip check

# Not root. /cache holds IR fetched from storage and OpenVINO's compiled blobs; a named volume mounted there
# starts with this ownership.
RUN useradd --create-home --uid 10001 darkroom && mkdir -p /cache && chown darkroom /cache
USER darkroom
ENV DARKROOM_CACHE_DIR=/cache

# Flower, worker metrics, the queue exporter.
EXPOSE 5555 9400 9808
CMD ["darkroom", "--help"]
