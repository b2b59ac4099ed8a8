# syntax=docker/dockerfile:1.7
# The operator and scheduler-extender image: `edpilot operator` and `edpilot extender`.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t ghcr.io/edpilot/edpilot:0.1.0 .
# `make images` builds it with buildah from a local Debian base instead (hack/build-images.sh):
# PYTHON_IMAGE may be any Debian-like image whose python3 has the venv module and matches a Python
# the locks cover (3.11 or 3.12). Base images are pinned to exact tags; pin them by digest in your
# registry mirror if you need byte-for-byte reproducible builds.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

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
# edpilot's own wheel, built with the locked setuptools: the runtime stage needs no network.
RUN /build/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir /dist .

# The dependencies' venv is made on the runtime base itself, so that its links to python3 hold
# there; it changes only with the locks, so a change to edpilot's code reuses it from the cache.
# Only venvs move on: the final image keeps no wheel. (COPY --from, not RUN --mount=from: buildah
# before 1.29 mounts a stale stage when its layers come from the cache.)
FROM ${PYTHON_IMAGE} AS deps
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

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edpilot" \
      org.opencontainers.image.description="edpilot operator and scheduler extender" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/edpilot/bin:$PATH
COPY --from=deps /opt/edpilot /opt/edpilot
COPY --from=app /app/ /
RUN edpilot --version
# A fixed numeric non-root user, so Kubernetes can verify runAsNonRoot without /etc/passwd.
USER 65532:65532
# 8080: kopf liveness; 9465: operator metrics; 8888: extender (TLS); 9466: extender metrics.
EXPOSE 8080 9465 8888 9466
ENTRYPOINT ["edpilot"]
CMD ["operator", "--all-namespaces"]
