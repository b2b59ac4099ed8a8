# syntax=docker/dockerfile:1.7
# The node agent image: `edpilot agent`. Its base is NVIDIA's CUDA "base" image: with it the NVIDIA
# container runtime injects the host driver's NVML library (NVIDIA_DRIVER_CAPABILITIES=utility),
# and nothing of the CUDA compute stack is needed.
# Build from the repository root:  docker build -f docker/agent.Dockerfile -t ghcr.io/edpilot/edpilot-agent:0.1.0 .
# Base images are pinned to exact tags; pin them by digest in your registry mirror if you need
# byte-for-byte reproducible builds.

FROM python:3.12.8-slim-bookworm AS build
WORKDIR /src
# Every dependency from hash-pinned locks (hack/lock-image-deps.py): a package that changed on the
# index, or one nobody locked, fails the build instead of landing in the image.
COPY docker/requirements.lock docker/build-requirements.lock docker/
RUN pip install --no-cache-dir --disable-pip-version-check --require-hashes -r docker/build-requirements.lock \
    && pip wheel --no-cache-dir --disable-pip-version-check --require-hashes --only-binary=:all: \
       --wheel-dir /wheels -r docker/requirements.lock \
    && cp docker/requirements.lock /wheels/
COPY pyproject.toml README.md ./
COPY edpilot/ edpilot/
COPY operator/ operator/
COPY node_agent/ node_agent/
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir /wheels .

FROM nvidia/cuda:12.6.3-base-ubuntu24.04
LABEL org.opencontainers.image.title="edpilot-agent" \
      org.opencontainers.image.description="edpilot node agent (NVML and simulated GPU backends)" \
      org.opencontainers.image.licenses="Apache-2.0"
# Ubuntu 24.04's Python is 3.12, the version the wheels above were built for.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/edpilot/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=utility
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/edpilot \
    && /opt/edpilot/bin/pip install --no-index --find-links=/wheels --require-hashes -r /wheels/requirements.lock \
    && /opt/edpilot/bin/pip install --no-index --no-deps /wheels/edpilot-*.whl \
    && edpilot --version
# Non-root by default (the sim backend needs nothing more). With the NVML backend the Helm chart
# runs the container as uid 0, because the kubelet's pod-resources socket is root-owned, and adds
# CAP_SYS_ADMIN only when it may set power limits (the NVIDIA driver's requirement).
USER 65532:65532
# 9464: agent metrics.
EXPOSE 9464
ENTRYPOINT ["edpilot"]
CMD ["agent", "--help"]
