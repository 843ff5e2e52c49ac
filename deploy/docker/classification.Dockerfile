# syntax=docker/dockerfile:1.7
# cxr classification service image. Build from the repository root (the .dockerignore there keeps the
# context to what images need):
#   docker build -f deploy/docker/classification.Dockerfile -t cxr/classification:0.1.0 .
# Stage 1 installs Python 3.11 (python-build-standalone via uv, relocatable) and this service
# with only its own dependencies into /opt/venv, pinned by requirements/constraints.txt.
# Stage 2 is the CUDA runtime with that venv, a non-root user and a gRPC health check.
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.22

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_RUNTIME_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# a C compiler for cxr_serving's one extension (PNG row filters, one-pass preprocessing);
# the runtime stage gets only the venv
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN uv python install 3.11 && uv venv --seed --python 3.11 /opt/venv
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY libs/protos libs/protos
COPY libs/serving libs/serving
COPY services/classification services/classification
RUN /opt/venv/bin/pip install -c requirements/constraints.txt ./libs/protos ./libs/serving ./services/classification \
 && /opt/venv/bin/python -c "import cxr_classification, cxr_serving._pixels, grpc_health.v1.health_pb2"

FROM ${CUDA_RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cxr-classification" \
      org.opencontainers.image.description="cxr classification gRPC service" \
      org.opencontainers.image.source="deploy/docker/classification.Dockerfile"
RUN groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --home-dir /tmp --no-create-home --shell /usr/sbin/nologin cxr
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    CXR_CONFIG_PATH=/etc/cxr/config.json \
    CXR_HEALTH_ADDR=127.0.0.1:50051
USER 10001:10001
EXPOSE 50051 9090
# gRPC health (service ""), the same check the kubelet's grpc probe makes; no key needed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel(os.environ.get('CXR_HEALTH_ADDR', '127.0.0.1:50051')); r = g.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=4); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["python", "-m", "cxr_classification"]
CMD ["--config", "/etc/cxr/config.json"]
