# syntax=docker/dockerfile:1
# The mlplane operator image: a static (musl) binary on distroless.
#   docker build -t ghcr.io/mlplane/mlplane:0.1.0 .
# The image runs as UID/GID 65532 with a read-only root filesystem (see the
# chart's securityContext); `mlplane run` is the default command. The binary
# is on PATH (/usr/local/bin), so init containers of this image run
# `["mlplane", "fetch", ...]` as their command.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG BASE_IMAGE=gcr.io/distroless/static-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
ARG TARGET=x86_64-unknown-linux-musl
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "${TARGET}"
WORKDIR /src

# Dependency layer: the workspace manifests and lock file with stub sources,
# so dependencies are rebuilt only when a manifest or Cargo.lock changes.
# Every `path = "*.rs"` target of a member manifest gets an empty stub (cargo
# loads every workspace member, including tests/).
COPY Cargo.toml Cargo.lock ./
COPY operator/Cargo.toml operator/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
RUN for member in operator tests; do \
      grep -o 'path = "[^"]*\.rs"' "${member}/Cargo.toml" | cut -d'"' -f2 \
        | while read -r f; do mkdir -p "$(dirname "${member}/${f}")"; : > "${member}/${f}"; done; \
    done \
 && echo 'fn main() {}' > operator/src/main.rs \
 && cargo build --release --locked -p mlplane --target "${TARGET}" \
 && rm -rf operator/src

# The operator itself. Touch the crate roots so cargo does not take the stub
# build as up to date (COPY keeps the sources' older mtimes).
COPY operator/src operator/src
RUN touch operator/src/main.rs operator/src/lib.rs \
 && cargo build --release --locked -p mlplane --target "${TARGET}" \
 && cp "target/${TARGET}/release/mlplane" /mlplane \
 && /mlplane --version

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="mlplane" \
      org.opencontainers.image.description="Kubernetes operator giving a cluster the workflow of a hosted ML service" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /mlplane /usr/local/bin/mlplane
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mlplane"]
CMD ["run"]
