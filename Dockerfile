# syntax=docker/dockerfile:1
# HistoHelper server image: CPU by default, CUDA with a build argument.
#   docker build -t histohelper .                                  # CPU torch
#   docker build -t histohelper:cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#   docker build -t histohelper:baked --target baked .             # bakes artifacts/model.pt
# The server binds 0.0.0.0 in the container, so it starts only with TLS or an explicit
# plaintext opt-in. Model and slides are mounted read-only in both examples.
# Run with TLS (certificates from `histohelper certs tls --host <server name>`; --user lets
# the server read the 0600 key written by your user):
#   docker run -p 50051:50051 --user "$(id -u):$(id -g)" \
#     -v "$PWD/artifacts:/models:ro" -v /data/slides:/slides:ro -v "$PWD/tls:/tls:ro" \
#     -e HISTOHELPER_TLS_CERT=/tls/server.pem -e HISTOHELPER_TLS_KEY=/tls/server.key \
#     histohelper
#   (mutual TLS: add -e HISTOHELPER_TLS_CLIENT_CA=/tls/ca.pem)
# Local try only, PLAINTEXT (anyone who reaches the port can call it; published on the
# host's loopback only):
#   docker run -p 127.0.0.1:50051:50051 -e HISTOHELPER_ALLOW_INSECURE=1 \
#     -v "$PWD/artifacts:/models:ro" -v /data/slides:/slides:ro histohelper
# The install steps are the ones CI runs (pip with constraints.txt), minus the dev extras.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY constraints.txt ./
# torch first, from the chosen index (CPU or CUDA wheels of the pinned version).
# hadolint ignore=DL3013
RUN TORCH="$(grep -E '^torch==' constraints.txt)" \
    && TV="$(grep -E '^torchvision==' constraints.txt)" \
    && pip install --index-url "${TORCH_INDEX}" "${TORCH}" "${TV}"
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY histohelper ./histohelper
COPY server ./server
COPY client ./client
COPY model_export ./model_export
RUN pip install -c constraints.txt ".[server,export]"

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin histo \
    && mkdir -p /models /slides && chown histo /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HISTOHELPER_HOST=0.0.0.0 \
    HISTOHELPER_PORT=50051 \
    HISTOHELPER_MODEL=/models/model.pt \
    HISTOHELPER_SLIDE_ROOT=/slides \
    HISTOHELPER_HEALTH_PORT=50052
USER 10001
EXPOSE 50051
# Liveness through the standard grpc.health.v1 service (grpcio-health-checking), on the
# loopback-only plaintext health port, so the probe works when the main port needs TLS.
# The main port binds 0.0.0.0: give it TLS (HISTOHELPER_TLS_CERT/_KEY) or, on a private
# network behind a TLS-terminating sidecar only, HISTOHELPER_ALLOW_INSECURE=1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import grpc,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;r=g.HealthStub(grpc.insecure_channel('127.0.0.1:50052')).Check(h.HealthCheckRequest(),timeout=4);sys.exit(r.status!=h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["histohelper", "serve"]

# Optional: bake the exported artifact into the image (docker build --target baked).
FROM runtime AS baked
COPY --chown=histo artifacts/model.pt /models/model.pt
