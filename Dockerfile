# kubenode-exporter image: the exporter in a virtual environment on Python 3.11, nothing else.
# Build: docker build -t kubenode-exporter:0.1.0 .
# tests/test_dockerfile.py lints this file and replays its steps in a fresh virtual environment.

# Exact upstream tag (Debian 12 "bookworm", as the development machines); pin by digest
# in your own build pipeline with --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# A wheel of the project, then a venv with it and its pinned dependencies; bytecode is
# compiled here because the running container's root file system is read-only.
# The exporter runs no pip: it leaves the venv last.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/kubenode-exporter \
 && /opt/kubenode-exporter/bin/python -m pip install --compile /wheels/kubenode_exporter-*.whl \
 && /opt/kubenode-exporter/bin/python -m pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kubenode-exporter" \
      org.opencontainers.image.description="Per-node Prometheus exporter for Kubernetes dataplane health" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/kubenode-exporter /opt/kubenode-exporter
ENV PATH=/opt/kubenode-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# No ipset, ipvsadm or other tool: the exporter reads netlink and /proc itself.
# Non-root by default; the DaemonSet runs it as uid 0 holding only CAP_NET_ADMIN
# (docs/security.md explains why a non-root user cannot hold it in Kubernetes).
USER 65534:65534
EXPOSE 9815
ENTRYPOINT ["kubenode-exporter"]
