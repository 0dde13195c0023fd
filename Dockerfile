# syntax=docker/dockerfile:1
# Images of xpyd: `agent` (the process in every DisaggDeployment pod, with
# the NIXL libraries) and `operator`. Build from the repository root:
#
#   docker build --target agent    -t ghcr.io/xpyd/agent:0.1.0 .
#   docker build --target operator -t ghcr.io/xpyd/operator:0.1.0 .
#
# For GPU nodes with CUDA 13 pick the matching NIXL wheel:
#   --build-arg NIXL_PACKAGE=nixl-cu13 --build-arg NIXL_VERSION=<v> --build-arg NIXL_WHEEL_SHA256=<sha>
# CI does not build these images (no container engine on its machines).

ARG RUST_VERSION=1.95.0
ARG DEBIAN=bookworm

# ---- build: both binaries, release profile -----------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN} AS build
# protoc for etcd-client, libclang for nixl-sys' bindgen.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev libclang-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p xpyd-agent -p xpyd-operator \
 && mkdir -p /out \
 && cp target/release/xpyd-agent target/release/xpyd-operator /out/

# ---- NIXL: the shared libraries from the PyPI wheel, checksum-pinned ---------
# Same pin and layout as scripts/setup: lib/ (libnixl_capi.so, plugins/) with
# the wheel's UCX beside it in nixl_cu12.libs/ (found through RPATH $ORIGIN/..).
FROM python:3.11-slim-${DEBIAN} AS nixl
ARG NIXL_PACKAGE=nixl-cu12
ARG NIXL_VERSION=1.5.1
ARG NIXL_WHEEL_SHA256=341d0dfa499f941c054614252f1d8047d1380e33f29c87707372ff5ec7d3779a
RUN python -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 -d /whl "${NIXL_PACKAGE}==${NIXL_VERSION}" \
 && echo "${NIXL_WHEEL_SHA256}  $(ls /whl/*.whl)" | sha256sum -c - \
 && python -m zipfile -e /whl/*.whl /x \
 && mkdir -p /opt/nixl \
 && mv /x/.nixl_*.mesonpy.libs /opt/nixl/lib \
 && mv /x/nixl_*.libs /opt/nixl/ \
 && test -f /opt/nixl/lib/libnixl_capi.so

# ---- operator ----------------------------------------------------------------
FROM debian:${DEBIAN}-slim AS operator
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/xpyd-operator /usr/local/bin/xpyd-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/xpyd-operator"]
CMD ["run"]

# ---- agent -------------------------------------------------------------------
FROM debian:${DEBIAN}-slim AS agent
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=nixl /opt/nixl /opt/nixl
COPY --from=build /out/xpyd-agent /usr/local/bin/xpyd-agent
# The agent dlopens NIXL by absolute path from here and points
# NIXL_PLUGIN_DIR at its plugins/ (runtime/src/transfer/library.rs).
ENV XPYD_NIXL_LIB_DIR=/opt/nixl/lib
# The operator runs `xpyd-agent <role>` (frontend, prefill, decode) and
# serves /metrics, /health, /ready on 9090.
EXPOSE 9090 8000
ENTRYPOINT ["/usr/local/bin/xpyd-agent"]
