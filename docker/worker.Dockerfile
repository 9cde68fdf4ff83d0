# The cq worker image: `docker build -f docker/worker.Dockerfile -t cq-worker .`
# It talks to a Docker engine through DOCKER_HOST or a mounted /var/run/docker.sock, so it runs
# as root; the jobs themselves run in their own hardened containers. Job mounts are paths on the
# Docker host: mount the data directory at the same path inside and outside.
#
# Build arguments (all optional): RUST_IMAGE, BASE_IMAGE and CQ_PREBUILT, as in broker.Dockerfile.
ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
ARG CQ_PREBUILT=
WORKDIR /src
COPY . .
RUN if [ -n "$CQ_PREBUILT" ]; then cp "$CQ_PREBUILT" /cq; \
    else cargo build --release --locked -p cq && cp target/release/cq /cq && strip /cq; fi

FROM ${BASE_IMAGE}
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && mkdir -p /var/lib/cq-worker
COPY --from=build /cq /usr/local/bin/cq
VOLUME /var/lib/cq-worker
ENTRYPOINT ["/usr/local/bin/cq"]
CMD ["worker", "--data-dir=/var/lib/cq-worker"]
