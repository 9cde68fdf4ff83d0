# The cq broker image: `docker build -f docker/broker.Dockerfile -t cq-broker .`
#
# Build arguments (all optional):
#   RUST_IMAGE   the build stage's image (default rust:1-bookworm)
#   BASE_IMAGE   the final stage's image (default debian:bookworm-slim)
#   CQ_PREBUILT  a `cq` binary's path inside the build context, used instead of compiling; it must
#                be built against a glibc no newer than BASE_IMAGE's (the image tests use this)
ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

# Build stage: compile the one `cq` binary (broker, worker and CLI in one).
FROM ${RUST_IMAGE} AS build
ARG CQ_PREBUILT=
WORKDIR /src
COPY . .
RUN if [ -n "$CQ_PREBUILT" ]; then cp "$CQ_PREBUILT" /cq; \
    else cargo build --release --locked -p cq && cp target/release/cq /cq && strip /cq; fi

# Final stage: the binary, CA certificates (for S3 over TLS), a non-root user.
FROM ${BASE_IMAGE}
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home cq \
 && mkdir /data && chown 10001:10001 /data
COPY --from=build /cq /usr/local/bin/cq
USER 10001:10001
EXPOSE 8000
VOLUME /data
ENTRYPOINT ["/usr/local/bin/cq"]
CMD ["broker", "--listen=0.0.0.0:8000", "--data-dir=/data"]
