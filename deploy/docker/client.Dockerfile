# syntax=docker/dockerfile:1.7
# cxr client image: the `cxr` CLI with the `evaluate` extra, for the chart's evaluation Job (CPU only: it calls
# the services over gRPC). Build from the repository root (the .dockerignore there keeps the context to what
# images need):
#   docker build -f deploy/docker/client.Dockerfile -t cxr/client:0.1.0 .
# Stage 1 installs Python 3.11 (python-build-standalone via uv, relocatable) and the client with only its own
# dependencies into /opt/venv, pinned by requirements/constraints.txt. Stage 2 is a slim base with that venv
# and a non-root user.
ARG BASE_IMAGE=debian:bookworm-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.22

FROM ${UV_IMAGE} AS uv

FROM ${BASE_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN uv python install 3.11 && uv venv --seed --python 3.11 /opt/venv
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY libs/protos libs/protos
COPY libs/client libs/client
RUN /opt/venv/bin/pip install -c requirements/constraints.txt ./libs/protos "./libs/client[evaluate]" \
 && /opt/venv/bin/python -c "import cxr_client.cli, cxr_client.segmentation_evaluation, cxr_client.evaluation"

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cxr-client" \
      org.opencontainers.image.description="cxr CLI (cxr evaluate, cxr models) for jobs against the services" \
      org.opencontainers.image.source="deploy/docker/client.Dockerfile"
RUN groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --home-dir /tmp --no-create-home --shell /usr/sbin/nologin cxr
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLBACKEND=Agg \
    HOME=/tmp
USER 10001:10001
ENTRYPOINT ["cxr"]
CMD ["--help"]
