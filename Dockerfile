# syntax=docker/dockerfile:1
# The shuffle-server image: one binary for every role (standalone, coordinator,
# worker). Build from the repository root:
#
#   docker build -t shuffle-server:dev .
#
# Not built in CI (no container runtime there); deploy/README.md says what is
# and is not checked.

FROM rust:1.88-slim-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binary
# is copied out of the cached target dir, which the next stage cannot see.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p shuffle-server --locked \
    && install -m 0755 target/release/shuffle-server /shuffle-server

FROM debian:bookworm-slim
# A fixed uid/gid so Kubernetes' runAsUser and fsGroup can name them.
RUN groupadd --system --gid 10001 shuffle \
    && useradd --system --uid 10001 --gid shuffle --home-dir /var/lib/shuffle --shell /usr/sbin/nologin shuffle \
    && install -d -o shuffle -g shuffle -m 0750 /var/lib/shuffle
COPY --from=builder /shuffle-server /usr/local/bin/shuffle-server
USER 10001:10001
WORKDIR /var/lib/shuffle
# Shuffle files, graceful-restart manifests and a worker's id live here.
VOLUME ["/var/lib/shuffle"]
# QUIC (clients, workers and the coordinator) and the admin listener (/metrics,
# /status, POST /decommission).
EXPOSE 7337/udp 9337/tcp
ENTRYPOINT ["/usr/local/bin/shuffle-server"]
# Without arguments: a standalone server reachable from outside the container.
CMD ["--listen", "0.0.0.0:7337", "--metrics-addr", "0.0.0.0:9337", "--data-dir", "/var/lib/shuffle"]
