# One image for both commands: `cp-token serve` (the default) and `cp-token-sidecar`.
#
#   docker build -t cp-token:0.1.0 .      # the tag is cp_token.__version__ (k8s/ pins it)
#
# Pin the base image by digest in production (PYTHON_IMAGE=python:3.11-slim@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: build the wheel and install it, with its dependencies, into /opt/venv ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# The image serves (`serve`, `dev`, `inject`, the sidecar): the `server` extra and `grpc`
# (the sealed sidecar's gRPC listener, SIDECAR_GRPC_UPSTREAM; grpcio is imported only then),
# installed from requirements.lock, where every distribution is pinned with its hashes (`make lock`
# regenerates it): two builds of one version install the same packages, and a tampered
# download fails the build. A runner that only needs the client library installs plain
# `cp-token` (httpx alone) instead.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY cp_token ./cp_token
COPY sidecar ./sidecar
# Then the project itself, without resolving anything again (--no-deps): its dependencies
# are exactly the lock's. The runtime needs neither pip nor setuptools: less to patch, less
# to abuse.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /dist . \
 && /opt/venv/bin/pip install --no-deps /dist/*.whl \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

# ---- runtime: the interpreter and /opt/venv, nothing else (no compilers, no pip) ----
FROM ${PYTHON_IMAGE}
# The package's version (cp_token.__version__); k8s/ pins the image tag to the same value.
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cp-token" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Numeric, so the kubelet can verify runAsNonRoot (it cannot resolve a user name).
# Matches runAsUser/runAsGroup in k8s/.
USER 10001:10001
# 8080: /token and the JWKS; 9090: /metrics, /healthz, /readyz.
EXPOSE 8080 9090
# No HEALTHCHECK: Kubernetes probes (k8s/) and compose healthchecks say what to check.
ENTRYPOINT []
CMD ["cp-token", "serve"]
