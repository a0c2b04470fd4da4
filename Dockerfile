# kvroute image: `kvroute serve` (Envoy ext_proc endpoint picker), `kvroute proxy`, tools; the
# image configs/kubernetes/deployment.yaml runs (REGISTRY/kvroute:0.1.0). Build from the
# repository root and push where your cluster pulls from (REGISTRY is yours, e.g.
# ghcr.io/acme or 123456789012.dkr.ecr.us-east-1.amazonaws.com):
#   docker build -t REGISTRY/kvroute:0.1.0 .
#   docker push REGISTRY/kvroute:0.1.0
# Locally: docker run -p 9002:9002 -p 9003:9003 -p 9090:9090 -v $PWD/configs:/etc/kvroute \
#   REGISTRY/kvroute:0.1.0 serve --config /etc/kvroute/single-pool.yaml
# It runs as UID/GID 65532 (deployment.yaml's runAsUser) with nothing written to the image's
# filesystem: HOME and TMPDIR point at /tmp, an emptyDir in the pod.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
COPY scorers ./scorers
COPY envoy_extproc ./envoy_extproc
# envoy_extproc/bootstraps links to configs/envoy (package data).
COPY configs/envoy ./configs/envoy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp TMPDIR=/tmp
USER 65532:65532
# ext_proc gRPC, gRPC health, Prometheus metrics (envoy_extproc/settings.py)
EXPOSE 9002 9003 9090
ENTRYPOINT ["kvroute"]
CMD ["serve", "--config", "/etc/kvroute/router.yaml"]
