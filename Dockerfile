# syntax=docker/dockerfile:1
#
# s2s-proxy container image: a build stage and a distroless, non-root runtime. No CA bundle
# is needed: the public roots are built into the binary (add private ones with
# server.upstream_ca_file). Logs go to stderr. Port 8080 is the proxy, 9090 the admin
# listener (/healthz, /readyz, /metrics, the status page) when proxy.yaml says
# `admin: { listen: 0.0.0.0:9090, auth: … }` (auth is required off loopback);
# the HEALTHCHECK uses the binary itself (`s2s-proxy healthcheck`: distroless has no shell
# or curl) against http://127.0.0.1:9090/healthz.
#
# Build:
#   docker build -t s2s-proxy .
#
# Run with the config mounted read-only and secrets from the environment (proxy.yaml
# must say `listen: 0.0.0.0:8080`; the default 127.0.0.1 is unreachable from outside):
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 --stop-timeout 35 --read-only \
#     -v "$PWD/proxy.yaml:/etc/s2s-proxy/proxy.yaml:ro" \
#     -e BC_TENANT_ID -e BC_CLIENT_ID -e BC_CLIENT_SECRET -e ERP_SYNC_PASSWORD \
#     s2s-proxy
#   (or --env-file ./s2s-proxy.env). On SIGTERM the proxy drains for up to 30 s; Docker's
#   default grace period is 10 s, hence --stop-timeout 35. `docker kill -s HUP` reloads the
#   configuration (so does editing the mounted file; mount its directory, not the file, if
#   your editor replaces files, since a single-file bind mount keeps the old inode).
#
# Secrets as files instead: mount them, e.g. -v "$PWD/secrets:/run/secrets:ro", and write
# `client_secret: ${file:/run/secrets/bc_client_secret}` in proxy.yaml.
#
# Other commands:
#   docker run --rm -v "$PWD/proxy.yaml:/etc/s2s-proxy/proxy.yaml:ro" --env-file ./s2s-proxy.env s2s-proxy check
#   docker run --rm -v "$PWD/proxy.yaml:/etc/s2s-proxy/proxy.yaml:ro" --env-file ./s2s-proxy.env s2s-proxy token --route /bc/

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts (BuildKit) keep the crate registry and compiled dependencies between
# builds; the binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/s2s-proxy /out/s2s-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/s2s-proxy /usr/local/bin/s2s-proxy
ENV S2S_PROXY_CONFIG=/etc/s2s-proxy/proxy.yaml
# 65532:65532 is distroless's `nonroot`; numeric so that Kubernetes' runAsNonRoot can check it.
USER 65532:65532
EXPOSE 8080 9090
# Without `admin:` in proxy.yaml nothing listens on 9090: the check then fails; override it
# with --no-healthcheck or `--health-cmd`, or add the admin listener.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/s2s-proxy", "healthcheck", "--url", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["/usr/local/bin/s2s-proxy"]
CMD ["run"]
