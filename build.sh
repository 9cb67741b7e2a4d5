#!/bin/sh
# Builds the smtppool binary: static (no cgo, no dynamic loader), without
# local paths (-trimpath), stripped (-s -w), with its version stamped in.
# The Dockerfile and build_test.go both run this script, so these flags
# live here only.
#
#   ./build.sh [output]    default output: ./smtppool
#
# VERSION, when set, is the version to stamp; otherwise
# `git describe --tags --always --dirty`, or "dev" outside a git checkout.
set -eu

out=${1:-smtppool}
case $out in
/*) ;;
*) out="$PWD/$out" ;;
esac
cd "$(dirname "$0")"

if [ -z "${VERSION:-}" ]; then
	VERSION=$(git describe --tags --always --dirty 2>/dev/null) || VERSION=
	[ -n "$VERSION" ] || VERSION=dev
fi

CGO_ENABLED=0 exec go build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o "$out" .
