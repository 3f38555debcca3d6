# FedSim: `make demo` runs the svd workflow on localfc, `make test` runs the tests. Both set up everything they need
# on a fresh Debian machine (as root: Debian packages; then the two Python environments).
SHELL := /bin/bash
# Debian's interpreter, not a per-user one: site users in namespace sites must be able to run both environments.
PYTHON ?= /usr/bin/python3
VENV := .venv
APPS_VENV := .venv-apps
PY := $(VENV)/bin/python
# vagrant-libvirt: `vagrant validate` needs a usable provider (the Vagrantfile defaults to libvirt)
DEB_PACKAGES := python3-venv python3-dev chromium openssh-server openssh-client iproute2 procps util-linux \
                docker.io vagrant vagrant-libvirt rsync sudo git
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test test-fast lint bench system venv clean help

help:
	@echo "make demo   - federated SVD across 3 isolated local sites on localfc, compared with the centralized SVD"
	@echo "make test   - all tests (end-to-end ones need root, namespaces and chromium: installed here)"
	@echo "make lint   - ruff and ansible-lint"
	@echo "make bench  - benchmarks; results in bench/results/"

demo: venv
	$(PY) -m fedsim_runner svd

test: venv
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not e2e"

lint: venv
	$(VENV)/bin/ruff check fedsim_runner tests bench apps
	$(VENV)/bin/ansible-lint

bench: venv
	@mkdir -p bench/results
	@set -e; for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# Debian packages, only those missing, only as root (elsewhere the tests that need them skip and say why).
system: .system.stamp
.system.stamp:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "not root: missing Debian packages $$missing (tests that need them will skip)"; fi; \
	fi
	@touch $@

venv: system $(VENV)/.stamp $(APPS_VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# The FeatureCloud engine pins Click~=8.0 and urllib3~=1.26: apps get their own environment (DESIGN §5).
$(APPS_VENV)/.stamp: apps/requirements.txt $(wildcard apps/*/requirements.txt)
	test -x $(APPS_VENV)/bin/python || $(PYTHON) -m venv $(APPS_VENV)
	$(APPS_VENV)/bin/python -m pip install -q --upgrade pip
	$(APPS_VENV)/bin/python -m pip install -q -r apps/requirements.txt $(foreach r,$(wildcard apps/*/requirements.txt),-r $(r))
	@touch $@

clean:
	rm -rf $(VENV) $(APPS_VENV) .system.stamp .pytest_cache
