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
tools: ## Build (or reuse) the pinned upstream binaries into $(BIN_CACHE)
	@tests/cluster/build.sh >/dev/null

.PHONY: cluster
cluster: tools ## Start the local control plane (idempotent); kubeconfig in .cluster/kubeconfig
	@tests/cluster/up.sh

.PHONY: cluster-down
cluster-down: ## Stop the local control plane and remove its state
	@tests/cluster/down.sh

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

.PHONY: test
test: cluster ## Start the local cluster if needed and run every test
	cargo test --workspace -- --test-threads=$${TEST_THREADS:-4}
