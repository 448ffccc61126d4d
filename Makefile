# mlplane developer targets (kubebuilder-style names). `make help` lists them.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

ROOT := $(CURDIR)
BIN_CACHE ?= $(HOME)/.cache/mlplane/bin
BIN := $(BIN_CACHE)/current
export KUBECONFIG ?= $(ROOT)/.cluster/kubeconfig
export PATH := $(BIN):$(PATH)

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

##@ Local control plane
.PHONY: tools
tools: ## Build (or reuse) the pinned upstream binaries into ~/.cache/mlplane/bin
	@tests/cluster/build.sh >/dev/null

.PHONY: cluster
cluster: tools ## Start the local control plane (idempotent); kubeconfig in .cluster/kubeconfig
	@tests/cluster/up.sh

.PHONY: cluster-down
cluster-down: ## Stop the local control plane (and the demo's operator and tracking server) and remove its state
	@if [[ -f .cluster/operator.pid ]]; then kill "$$(cat .cluster/operator.pid)" 2>/dev/null || true; fi
	@if [[ -f .cluster/tracking.pid ]]; then kill "$$(cat .cluster/tracking.pid)" 2>/dev/null || true; fi
	@tests/cluster/down.sh

##@ Generated files
.PHONY: crds
crds: ## Regenerate crds/ from the Rust types
	cargo run -q -p mlplane -- crds --dir crds

.PHONY: manifests
manifests: crds tools ## Regenerate the chart's CRDs and manifests/install.yaml
	hack/render-manifests.sh

.PHONY: check-generated
check-generated: manifests ## Fail when crds/ or manifests/ are stale
	@git diff --exit-code -- crds charts/mlplane/crds manifests/install.yaml \
	  || { echo "generated files are stale: run 'make manifests' and commit" >&2; exit 1; }
	@test -z "$$(git status --porcelain -- crds charts/mlplane/crds manifests/install.yaml)" \
	  || { echo "untracked generated files: run 'make manifests' and commit" >&2; exit 1; }

##@ Install and run
.PHONY: install
install: tools ## Install the CRDs and the Helm chart into the cluster of KUBECONFIG
	kubectl apply --server-side --force-conflicts -f crds/
	helm upgrade --install mlplane charts/mlplane --namespace mlplane-system --create-namespace --wait

.PHONY: run
run: tools ## Run the operator out of cluster as the chart's ServiceAccount (exact chart RBAC)
	hack/run-local.sh

.PHONY: demo
demo: tools ## Local cluster, install, operator, every example, then `kubectl get mlplane -A`
	hack/demo.sh

.PHONY: tracking
tracking: ## Standalone tracking server on 127.0.0.1:5000 (SQLite in .tracking/, auth off), like `mlflow server`
	@mkdir -p .tracking
	cargo run -q -p mlplane -- tracking --addr 127.0.0.1:5000 --auth=false \
	  --database-url sqlite://.tracking/mlplane.db --artifact-root .tracking/artifacts

##@ Development
.PHONY: build
build: ## Build the operator
	cargo build --workspace

.PHONY: fmt
fmt: ## Format the code
	cargo fmt --all

.PHONY: lint
lint: ## rustfmt check and clippy with warnings as errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

.PHONY: unit
unit: ## Unit tests only (no cluster needed)
	cargo test -p mlplane

.PHONY: bench
bench: cluster ## Benchmarks (release build): figures against a baseline measured in the same run
	cargo build --release -p mlplane -p mlplane-bench
	MLPLANE_BIN=$(ROOT)/target/release/mlplane target/release/tracking
	MLPLANE_BIN=$(ROOT)/target/release/mlplane target/release/experiments
	MLPLANE_BIN=$(ROOT)/target/release/mlplane target/release/compute
	target/release/data
	MLPLANE_BIN=$(ROOT)/target/release/mlplane target/release/serving

.PHONY: test
test: cluster ## Start the local cluster if needed and run every test
	cargo build -p mlplane
	cargo test --workspace --no-fail-fast -- --test-threads=$${TEST_THREADS:-4}
