# The cq broker image: `docker build -f docker/broker.Dockerfile -t cq-broker .`
# Build stage: compile the one `cq` binary (broker, worker and CLI in one).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cq \
 && cp target/release/cq /cq && strip /cq

# Final stage: the binary, CA certificates (for S3 over TLS), a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home cq \
 && mkdir /data && chown 10001:10001 /data
COPY --from=build /cq /usr/local/bin/cq
USER 10001:10001
EXPOSE 8000
VOLUME /data
ENTRYPOINT ["/usr/local/bin/cq"]
CMD ["broker", "--listen=0.0.0.0:8000", "--data-dir=/data"]
