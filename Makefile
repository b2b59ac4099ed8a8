# One entry point for people and CI. Every target makes the project virtualenv on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODES ?= 2
GPUS ?= 8
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv tools lint test test-unit test-images test-prometheus images demo simulate cluster-up cluster-down kubectl helm docs priors clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@touch $@

venv: $(STAMP) ## create .venv and install edpilot with its dev tools

tools: ## build the pinned control-plane binaries (cached in ~/.cache/edpilot/bin)
	@hack/build-tools.sh

lint: $(STAMP) ## ruff, mypy and the import-linter contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy edpilot operator/edpilot_operator node_agent/edpilot_agent bench tests
	$(BIN)/lint-imports

test: $(STAMP) tools lint ## everything CI runs: lint, unit, agent, operator, chart and e2e tests on a real control plane, then test-images and test-prometheus (root)
	$(BIN)/python -m pytest
	@$(MAKE) --no-print-directory test-images test-prometheus

test-unit: $(STAMP) ## the tests that need no cluster
	EDPILOT_NO_CLUSTER=1 $(BIN)/python -m pytest -m 'not k8s and not chaos'

priors: $(STAMP) ## regenerate edpilot/gpu_priors.py (placement and budget priors) from gpusim
	$(BIN)/python -m edpilot.make_priors
	$(BIN)/ruff format edpilot/gpu_priors.py

images: ## build localhost/edpilot/edpilot:dev and edpilot-agent:dev with buildah from a local Debian base (cached in ~/.cache/edpilot/images)
	@hack/build-images.sh >/dev/null

test-images: $(STAMP) tools ## build the images, run them under podman and runc, converge a policy with them, and install the chart on a real kubelet node (root)
	$(BIN)/python -m pytest -m images tests/images

test-prometheus: $(STAMP) tools ## Debian's prometheus scrapes the demo cluster; every dashboard panel must have data
	@hack/install-packages.sh prometheus
	$(BIN)/python -m pytest -m prometheus tests/prometheus

simulate: $(STAMP) ## the closed loop on a simulated fleet, in one process, no cluster
	$(BIN)/edpilot simulate

demo: $(STAMP) tools ## local cluster + KWOK GPU nodes + operator + simulated agents, converging a sample policy
	$(BIN)/edpilot demo $(ARGS)

cluster-up: $(STAMP) tools ## start etcd, kube-apiserver, controller-manager, scheduler and KWOK on loopback
	@NODES=$(NODES) GPUS=$(GPUS) hack/cluster-up.sh

cluster-down: ## stop everything cluster-up started and remove its state
	@hack/cluster-down.sh

# kubectl and helm talk to the cluster of an exported KUBECONFIG (the demo prints one), else to
# `make cluster-up`'s. They build the tools themselves rather than through `tools`, whose printed
# path would come before their output.
CLUSTER_KUBECONFIG := $(or $(KUBECONFIG),$(CURDIR)/.cluster/kubeconfig)
TOOL_BIN := set -o pipefail; bin=$$(hack/build-tools.sh | tail -n1)

kubectl: ## the pinned kubectl against $KUBECONFIG or the local cluster: make kubectl ARGS='get nodes'
	@$(TOOL_BIN) && KUBECONFIG='$(CLUSTER_KUBECONFIG)' "$$bin/kubectl" $(ARGS)

helm: ## the pinned helm against $KUBECONFIG or the local cluster: make helm ARGS='list -A'
	@$(TOOL_BIN) && KUBECONFIG='$(CLUSTER_KUBECONFIG)' "$$bin/helm" $(ARGS)

docs: $(STAMP) ## regenerate docs/api.md, helm-values.md and metrics.md from the CRDs, chart and code
	$(BIN)/python hack/gen-docs.py

clean: cluster-down ## remove the virtualenv and caches of this checkout
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
