# The cq worker image: `docker build -f docker/worker.Dockerfile -t cq-worker .`
# It talks to a Docker engine through DOCKER_HOST or a mounted /var/run/docker.sock, so it runs
# as root; the jobs themselves run in their own hardened containers.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cq \
 && cp target/release/cq /cq && strip /cq

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/cq-worker
COPY --from=build /cq /usr/local/bin/cq
VOLUME /var/lib/cq-worker
ENTRYPOINT ["/usr/local/bin/cq"]
CMD ["worker", "--data-dir=/var/lib/cq-worker"]
