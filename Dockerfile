# syntax=docker/dockerfile:1
#
# smtppool container image: a static binary on distroless, run as non-root.
#
#   make image     (docker buildx build --build-arg VERSION=$(git describe ...))
#
# The build flags live in build.sh, which build_test.go also runs (CI has
# no Docker engine), so the binary tested there is the binary shipped here.

# Build stage. The golang:1.26 tag is the newest Go 1.26 patch release,
# which satisfies go.mod's "go 1.26.8". It runs on the builder's own
# platform and cross-compiles for the target's (docker buildx build
# --platform linux/amd64,linux/arm64), so no stage runs under emulation.
FROM --platform=$BUILDPLATFORM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
# The version to stamp. Empty: build.sh asks git, and without the .git
# directory (see .dockerignore) it stamps "dev".
ARG VERSION=
# Set by BuildKit from --platform (the builder's own without it).
ARG TARGETOS TARGETARCH
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    GOOS="$TARGETOS" GOARCH="$TARGETARCH" VERSION="$VERSION" sh ./build.sh /out/smtppool

# Final stage: distroless static has CA certificates (for TLS to the
# upstream), time zone data and /etc/passwd, and no shell or libc.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/smtppool /smtppool
# 65532 is distroless's "nonroot". A numeric user lets Kubernetes'
# runAsNonRoot check it without a runAsUser.
USER 65532:65532
# 2525: SMTP (SMTPPOOL_LISTEN_ADDR; its default 127.0.0.1:2525 is for a
# sidecar sharing the pod's loopback). 9025: the admin HTTP endpoint
# (/healthz, /readyz, /metrics; SMTPPOOL_ADMIN_ADDR).
EXPOSE 2525 9025
# No HEALTHCHECK: the image has no shell or HTTP client to run one, and
# Kubernetes ignores it; its probes call /healthz and /readyz directly.
ENTRYPOINT ["/smtppool"]
