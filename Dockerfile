# syntax=docker/dockerfile:1
# Engram's image: the `engram` binary on distroless (glibc and CA certificates, no shell),
# running as uid/gid 65532. Conventional, but not built in this repository's CI: its machines
# have no Docker engine.
#
#   docker build -t engram:dev .
#   docker run --rm -p 50051:50051 -p 9090:9090 engram:dev     # SQLite in /home/nonroot/data

# Bookworm, like the runtime's Debian 12, so the binary needs no newer glibc than it has.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p engram-server --bin engram \
    && install -D -m 0755 target/release/engram /out/engram

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/engram /usr/local/bin/engram
USER 65532:65532
# The default SQLite path (./data/engram.db) lands in the user's home; Kubernetes sets DATABASE_URL.
WORKDIR /home/nonroot
# gRPC, Prometheus metrics
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/engram"]
CMD ["serve", "--listen", "0.0.0.0:50051"]
