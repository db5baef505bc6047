# One image for the gateway and the workers (the command chooses); CPU PyTorch; runs as non-root with a
# read-only root filesystem. The default bundle is trained at build time from the Debian dataset
# package, so nothing is downloaded at run time.
#   docker build -t coinserve .
#   docker run --rm -p 8000:8000 -p 8001:8001 coinserve up --port 8000      (everything in one container, for a try;
#   8001 is the gRPC endpoint)

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY models models
COPY workers workers
COPY protocol protocol
COPY bench bench
# The CPU wheel of torch comes from PyTorch's own index; the rest from PyPI.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && /opt/venv/bin/pip install .
RUN /opt/venv/bin/coinserve train --out /opt/coinserve/bundle \
 && /opt/venv/bin/coinserve code --bundle /opt/coinserve/bundle \
 && chmod -R a+rX /opt/coinserve

FROM python:3.11-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 coinserve \
 && useradd --system --uid 10001 --gid coinserve --no-create-home --shell /usr/sbin/nologin coinserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/coinserve/bundle /opt/coinserve/bundle
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
