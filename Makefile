# smtppool's tasks. `make test` is the whole suite, what .ci/run runs.
#
#   make build      ./smtppool, the static release binary (build.sh)
#   make test       lint, then unit, manifest, monitoring and end-to-end tests
#   make lint       gofmt, go vet (every module, e2e tag too), actionlint
#   make image      the container image for this machine (docker buildx)
#   make dist       static binaries for linux/amd64 and arm64, with SHA256SUMS
#   make release-notes VERSION=v0.1.0   its section of CHANGELOG.md
#   make bench      the benchmarks (as root, with Postfix; about 6 minutes)
#   make generate   the dashboard JSON and the PrometheusRule, from monitoring/
#
# The end-to-end tests need root and Debian's postfix, swaks, python3 and
# iproute2; the monitoring tests need promtool (Debian's prometheus
# package). .ci/run installs all of that, then runs `make test`.

GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
IMAGE ?= ghcr.io/smtppool/smtppool
# Empty: the machine's own platform. For both release platforms:
#   make image PLATFORMS=linux/amd64,linux/arm64 IMAGE_OUTPUT=--push
PLATFORMS ?=
DIST_PLATFORMS := linux/amd64 linux/arm64
ACTIONLINT := github.com/rhysd/actionlint/cmd/actionlint@v1.7.12
BENCH_FLAGS ?=

.PHONY: build test lint fmt vet actionlint test-unit test-k8s test-monitoring test-e2e image dist release-notes bench generate

build:
	VERSION=$(VERSION) ./build.sh smtppool

test: lint test-unit test-k8s test-monitoring test-e2e

lint: fmt vet actionlint

fmt:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...
	$(GO) vet -tags e2e ./e2e/
	cd k8s && $(GO) vet ./...
	cd monitoring && $(GO) vet ./...

# The workflows cannot run here; actionlint checks their syntax, expressions,
# action inputs and (with shellcheck installed) their shell scripts.
actionlint:
	$(GO) run $(ACTIONLINT) -color=false

test-unit:
	$(GO) test -race -count=1 ./...

# k8s/ and monitoring/ are modules of their own, outside the root's ./...
test-k8s:
	cd k8s && $(GO) test -count=1 ./...

test-monitoring:
	cd monitoring && $(GO) test -count=1 ./...

test-e2e:
	$(GO) test -tags e2e -count=1 -v ./e2e/

# Without PLATFORMS the image is loaded into the local image store; with
# several, add the output you want: make image PLATFORMS=... IMAGE_OUTPUT=--push
IMAGE_OUTPUT ?= $(if $(PLATFORMS),,--load)
image:
	docker buildx build $(if $(PLATFORMS),--platform $(PLATFORMS)) $(IMAGE_OUTPUT) \
		--build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) .

dist:
	rm -rf dist
	mkdir -p dist
	set -e; for p in $(DIST_PLATFORMS); do \
		os=$${p%/*}; arch=$${p#*/}; \
		GOOS=$$os GOARCH=$$arch VERSION=$(VERSION) ./build.sh dist/smtppool_$(VERSION)_$${os}_$${arch}; \
	done
	cd dist && sha256sum smtppool_* > SHA256SUMS
	cat dist/SHA256SUMS

# The release notes of VERSION: its section of CHANGELOG.md (release.yml
# uses them). Fails if there is none.
release-notes:
	@awk -v v="$(patsubst v%,%,$(VERSION))" ' \
		/^## \[/ { on = index($$0, "## [" v "]") == 1; if (on) found = 1; next } \
		/^\[/ { on = 0 } \
		on { print } \
		END { if (!found) { print "CHANGELOG.md has no section for " v > "/dev/stderr"; exit 1 } }' CHANGELOG.md

bench:
	$(GO) run ./e2e/bench $(BENCH_FLAGS)

generate:
	cd monitoring && $(GO) run ./cmd/generate
