# syntax=docker/dockerfile:1.7
# The node agent image: `edpilot agent`. Its base is NVIDIA's CUDA "base" image: with it the NVIDIA
# container runtime injects the host driver's NVML library (NVIDIA_DRIVER_CAPABILITIES=utility),
# and nothing of the CUDA compute stack is needed.
# Build from the repository root:  docker build -f docker/agent.Dockerfile -t ghcr.io/edpilot/edpilot-agent:0.1.0 .
# `make images` builds it with buildah from a local Debian base instead (hack/build-images.sh). The
# wheels are built on PYTHON_IMAGE for the runtime stage's python3, so both must have the same
# Python version (3.12 by default: python:3.12 and Ubuntu 24.04). Base images are pinned to exact
# tags; pin them by digest in your registry mirror if you need byte-for-byte reproducible builds.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm
ARG AGENT_BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Every dependency from hash-pinned locks (hack/lock-image-deps.py): a package that changed on the
# index, or one nobody locked, fails the build instead of landing in the image. A venv, because a
# distribution's python3 (Debian's) forbids pip outside one. Behind a TLS-intercepting proxy, pass
# its CA as the optional build secret pip-ca (`--secret id=pip-ca,src=ca.crt`): it verifies the
# index during the build and never lands in a layer.
COPY docker/requirements.lock docker/build-requirements.lock docker/
RUN --mount=type=secret,id=pip-ca,required=false \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && python3 -m venv /build \
    && /build/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes -r docker/build-requirements.lock \
    && /build/bin/pip wheel --no-cache-dir --disable-pip-version-check --require-hashes --only-binary=:all: \
       --wheel-dir /wheels -r docker/requirements.lock \
    && cp docker/requirements.lock /wheels/
COPY pyproject.toml README.md ./
COPY edpilot/ edpilot/
COPY operator/ operator/
COPY node_agent/ node_agent/
RUN /build/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir /dist .

# The CUDA base has no Python (Ubuntu 24.04's is 3.12, the version the wheels above were built
# for); a base that already has python3 with venv (the local Debian one) needs no package index.
FROM ${AGENT_BASE_IMAGE} AS runtime
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/edpilot/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=utility

# The dependencies' venv is made on the runtime base itself, so that its links to python3 hold
# there; it changes only with the locks, so a change to edpilot's code reuses it from the cache.
# Only venvs move on: the final image keeps no wheel. (COPY --from, not RUN --mount=from: buildah
# before 1.29 mounts a stale stage when its layers come from the cache.)
FROM runtime AS deps
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/edpilot \
    && /opt/edpilot/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --find-links=/wheels \
       --require-hashes -r /wheels/requirements.lock

# edpilot itself on top; /app receives exactly the files its wheel installed (the entry point,
# the packages, their bytecode and metadata), a small layer for the final image.
FROM deps AS app
COPY --from=build /dist /dist
RUN /opt/edpilot/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps /dist/edpilot-*.whl \
    && /opt/edpilot/bin/python3 -c "import importlib.metadata as m, os, shutil; paths = [os.path.normpath(str(f.locate())) for f in m.distribution('edpilot').files]; [(os.makedirs(os.path.dirname('/app' + p), exist_ok=True), shutil.copy2(p, '/app' + p)) for p in paths if os.path.isfile(p)]"

FROM runtime
LABEL org.opencontainers.image.title="edpilot-agent" \
      org.opencontainers.image.description="edpilot node agent (NVML and simulated GPU backends)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=deps /opt/edpilot /opt/edpilot
COPY --from=app /app/ /
RUN edpilot --version
# Non-root by default (the sim backend needs nothing more). With the NVML backend the Helm chart
# runs the setter container as uid 0, because the kubelet's pod-resources socket is root-owned, and
# adds CAP_SYS_ADMIN only when it may set power limits (the NVIDIA driver's requirement).
USER 65532:65532
# 9464: agent metrics.
EXPOSE 9464
ENTRYPOINT ["edpilot"]
CMD ["agent", "--help"]
