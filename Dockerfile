# One image for the gateway and the workers (the command chooses); CPU PyTorch; runs as non-root with a
# read-only root filesystem. The default bundle is trained at build time from the Debian dataset
# package, so nothing is downloaded at run time.
#   docker build -t coinserve .
#   docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 coinserve up --host 0.0.0.0 --port 8000
#   (everything in one container, for a try; 8001 is the gRPC endpoint)
# Build arguments, for machines that reach no registry or only a package mirror (docs/containers.md;
# `./dev.sh image` sets them from this machine's pip configuration and builds with podman):
#   BASE_IMAGE       both stages' base: a Debian 12 with python3 (3.11) and python3-venv
#   TORCH_INDEX_URL  where the CPU wheel of torch comes from
#   PIP_INDEX_URL, PIP_FIND_LINKS, PIP_CERT   pip's own settings for the build steps (paths inside
#                    the build, e.g. folders bind-mounted with `podman build -v HOST:/mnt/pip:ro`)
#   BUNDLE_SOURCE    train (default: train the default bundle here, ~8 min on one core) or context
#                    (copy bundles/default from the build context: one `coinserve train` made earlier)
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BUNDLE_SOURCE=train

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# pip reads PIP_INDEX_URL, PIP_FIND_LINKS and PIP_CERT from the environment (build arguments are).
# torch first, before the sources: an edit to them leaves this layer cached
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY models models
COPY workers workers
COPY protocol protocol
COPY bench bench
RUN /opt/venv/bin/pip install .

FROM build AS bundle-train
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
 && rm -rf /var/lib/apt/lists/*
RUN /opt/venv/bin/coinserve train --out /opt/coinserve/bundle \
 && /opt/venv/bin/coinserve code --bundle /opt/coinserve/bundle \
 && chmod -R a+rX /opt/coinserve

FROM build AS bundle-context
# The workers check every file's sha256 against the manifest when they load it.
COPY bundles/default /opt/coinserve/bundle
RUN chmod -R a+rX /opt/coinserve

# hadolint ignore=DL3006
FROM bundle-${BUNDLE_SOURCE} AS bundle

FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 coinserve \
 && useradd --system --uid 10001 --gid coinserve --no-create-home --shell /usr/sbin/nologin coinserve
COPY --from=build /opt/venv /opt/venv
COPY --from=bundle /opt/coinserve/bundle /opt/coinserve/bundle
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    COINSERVE_BUNDLE=/opt/coinserve/bundle \
    COINSERVE_WORKER_BUNDLE=/opt/coinserve/bundle
USER 10001:10001
WORKDIR /tmp
# 8000 gateway HTTP, 8001 gateway gRPC, 8080 worker HTTP (probes, metrics), 8081 worker channel
EXPOSE 8000 8001 8080 8081
ENTRYPOINT ["coinserve"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
