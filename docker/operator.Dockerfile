# syntax=docker/dockerfile:1.7
# The operator and scheduler-extender image: `edpilot operator` and `edpilot extender`.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t ghcr.io/edpilot/edpilot:0.1.0 .
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
# edpilot's own wheel, built with the locked setuptools: the runtime stage needs no network.
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.12.8-slim-bookworm
LABEL org.opencontainers.image.title="edpilot" \
      org.opencontainers.image.description="edpilot operator and scheduler extender" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels --require-hashes -r /wheels/requirements.lock \
    && pip install --no-index --no-deps /wheels/edpilot-*.whl \
    && edpilot --version
# A fixed numeric non-root user, so Kubernetes can verify runAsNonRoot without /etc/passwd.
USER 65532:65532
# 8080: kopf liveness; 9465: operator metrics; 8888: extender (TLS); 9466: extender metrics.
EXPOSE 8080 9465 8888 9466
ENTRYPOINT ["edpilot"]
CMD ["operator", "--all-namespaces"]
