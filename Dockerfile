# kvroute image: `kvroute serve` (Envoy ext_proc endpoint picker), `kvroute proxy`, tools.
#   docker build -t kvroute:0.1.0 .
#   docker run -p 9002:9002 -p 9003:9003 -p 9090:9090 -v $PWD/configs:/etc/kvroute kvroute:0.1.0 \
#       serve --config /etc/kvroute/single-pool.yaml
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
COPY scorers ./scorers
COPY envoy_extproc ./envoy_extproc
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 65532 kvroute
USER 65532
# ext_proc gRPC, gRPC health, Prometheus metrics (envoy_extproc/settings.py)
EXPOSE 9002 9003 9090
ENTRYPOINT ["kvroute"]
CMD ["serve", "--config", "/etc/kvroute/router.yaml"]
