# syntax=docker/dockerfile:1
# LineWatch GPU image: ONNX Runtime (CUDA 13 build) on an NVIDIA CUDA 13 + cuDNN 9 runtime,
# the shipped model and a container config; no torch, no compilers.
#
#   docker build -t linewatch:0.1.0 .
#   docker run --gpus all -p 8000:8000 -e LINEWATCH_API__AUTH__TOKENS__0__TOKEN=change-me linewatch:0.1.0
#
# Needs an NVIDIA driver >= 580 on the host (CUDA 13) and the NVIDIA Container Toolkit.
# Without a GPU the same image runs on the CPU (see docs/operations.md).

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# --- build: a virtual environment with LineWatch and its runtime dependencies ----------
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Distribution packages track the base image's Ubuntu release (security updates), not pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
COPY service ./service
COPY models ./models
# onnxruntime-gpu from PyPI: 1.31.x is built for CUDA 13 and cuDNN 9 (its wheel's `cuda`
# extra asks for nvidia-cuda-runtime~=13.0, nvidia-cudnn-cu13~=9.0); the base image
# provides those libraries, so the extras are not installed.
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
# The runtime and OpenVINO (providers: [openvino, cpu] on Intel hosts without a GPU); no
# [train] extra (torch), no [test] extra. Every dependency is a binary
# wheel, so no compiler is needed. The build fails if torch crept in or if the installed
# onnxruntime lacks the CUDA provider (e.g. the CPU package shadowing the GPU one).
RUN /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install ".[openvino]" "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && /opt/venv/bin/python -c "import onnxruntime as ort, service.cli; assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers()" \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# --- runtime -------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="LineWatch" \
      org.opencontainers.image.description="Real-time industrial vision monitoring: keypoint models on camera streams" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LINEWATCH_API__AUTH__ENABLED=true
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 linewatch \
    && useradd --system --uid 10001 --gid linewatch --home-dir /var/lib/linewatch \
       --shell /usr/sbin/nologin linewatch \
    && install -d -o linewatch -g linewatch -m 0750 /var/lib/linewatch
COPY --from=build /opt/venv /opt/venv
COPY models/zoo/linewatch-parts-s.onnx /opt/linewatch/models/zoo/linewatch-parts-s.onnx
COPY deploy/docker/config.yaml /etc/linewatch/config.yaml

USER 10001:10001
WORKDIR /var/lib/linewatch
VOLUME ["/var/lib/linewatch"]
EXPOSE 8000
# /healthz needs no token, also with auth on.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LINEWATCH_API__PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["linewatch"]
CMD ["serve", "--config", "/etc/linewatch/config.yaml"]
