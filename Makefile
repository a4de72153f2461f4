# Set-up and checks. `make test` installs first when needed; `make install` twice is a no-op.
#   make install   system packages for FFCV (Debian), then .venv/ with requirements.txt
#                  FFCV=0: no FFCV, no system packages, no root (loader=torch and loader=device only;
#                  make test needs the full install: its FFCV tests import ffcv)
#   make quick     the quick US3L CIFAR-10 run (QUICK_ARGS="--data_path=DIR" to point elsewhere)
#   make test      ruff + pytest on 2 workers (PYTEST_ARGS="-k config" to narrow, PYTEST_WORKERS=0 for one process)
#   make lint      ruff only
#   make clean     remove .venv/ and caches (not data, not runs)

SHELL := /bin/bash
comma := ,
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
QUICK_ARGS ?=
FFCV ?= 1
# What FFCV's source build needs: libturbojpeg, OpenCV headers, pkg-config to find both.
APT_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config

.PHONY: install system-deps quick test lint clean

install: $(VENV)/.installed

# The stamp depends on requirements.txt: editing it reinstalls, otherwise nothing happens.
# system-deps is order-only: it re-checks (quietly) but never forces a reinstall.
# FFCV=0 installs requirements.txt without its ffcv line and needs no system packages (make clean to switch).
$(VENV)/.installed: requirements.txt | $(if $(filter 0,$(FFCV)),,system-deps)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(if $(filter 0,$(FFCV)),grep -v '^ffcv==',cat) requirements.txt > $(VENV)/requirements.txt
	$(PY) -m pip install -r $(VENV)/requirements.txt
	$(PY) -c "import torch, torchvision, accelerate, datasets$(if $(filter 0,$(FFCV)),,$(comma) ffcv); print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

system-deps:
	@if ! command -v dpkg >/dev/null 2>&1; then \
	  if pkg-config --exists libturbojpeg && { pkg-config --exists opencv4 || pkg-config --exists opencv; }; then \
	    exit 0; \
	  fi; \
	  echo "error: not a Debian system: install libturbojpeg, the OpenCV headers and pkg-config" \
	       "with your package manager, then rerun make install" >&2; \
	  exit 1; \
	fi; \
	missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else \
	  echo "error: FFCV needs the Debian packages$$missing; run as root:" \
	       "apt-get update && apt-get install -y$$missing" >&2; \
	  exit 1; \
	fi; \
	echo "installing Debian packages:$$missing"; \
	$$sudo apt-get update && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing

quick: install
	$(PY) train_us3l.py --config yaml/cifar10_quick.yaml $(QUICK_ARGS)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
