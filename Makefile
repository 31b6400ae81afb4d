# Two commands do all set-up on a fresh machine (see README):
#   make demo   venv + install + the mini pipeline on generated data
#   make test   venv + install + mypy on the typed interfaces + the test suite (fast and slow)
# and, for the lent GPU machine (docs/gpus-and-clusters.md):
#   make gpu-bundle      gpu_bundle/: wheels of what the device image lacks (offline install there)
#   make gpu-rehearsal   a device-like environment here, the bundle installed offline, gpu_check.sh --smoke
#                        (both in a network namespace with loopback only, where this machine allows it)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.simsiam-transfer-installed
# Exactly these builds lie on the CI machines' disk; other versions are multi-GB downloads.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Upstream detectron2 imports pkg_resources (gone in setuptools 81). torch 2.14 requires setuptools
# >= 77.0.3, so installing torch alone upgrades it past 81: the pin goes into every torch install.
SETUPTOOLS_PIN := "setuptools>=77.0.3,<81"
DEMO_DIR ?= runs/demo
# pytest-xdist processes for `make test`; each test file stays on one worker (module fixtures run once).
TEST_WORKERS ?= 2

# The device image's Python (3.12) always; plus the rehearsal's, whose torch lies on this disk.
BUNDLE_PYTHONS ?= 3.12,$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
REHEARSAL_VENV ?= .venv-gpu-rehearsal
REHEARSAL_STAMP := $(REHEARSAL_VENV)/.device-image-packages
# What the device image holds of what we use (its package list); torch is the build on this disk.
DEVICE_IMAGE_PACKAGES := numpy pillow pyyaml matplotlib tqdm tensorboard scikit-image tabulate cloudpickle portalocker
REHEARSAL_OUT ?= runs/gpu_rehearsal
# The device's CPython 3.12 (pyenv's): no torch for it on this disk, so it imports what needs none.
PY312 ?= $(shell pyenv prefix 3.12 2>/dev/null)/bin/python3.12
PY312_VENV ?= .venv-gpu-py312
PY312_STAMP := $(PY312_VENV)/.device-image-packages

.PHONY: setup demo test test-fast clean gpu-bundle gpu-rehearsal

setup: $(STAMP)

$(STAMP): pyproject.toml simsiam_transfer/install_detectron2.py simsiam_transfer/detectron2_C_shim.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "pip>=21.3" $(SETUPTOOLS_PIN) wheel
	$(BIN)/python -m pip install -q $(TORCH_PINS) $(SETUPTOOLS_PIN)
	$(BIN)/python -m simsiam_transfer.install_detectron2
	$(BIN)/python -m pip install -q $(TORCH_PINS) $(SETUPTOOLS_PIN) -e ".[test]"
	$(BIN)/simsiam-transfer doctor
	touch $(STAMP)

demo: setup
	$(BIN)/simsiam-transfer pipeline --config pipeline/mini.yaml OUTPUT_DIR $(DEMO_DIR)

test: setup
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

gpu-bundle: setup
	$(BIN)/python benchmarks/gpu_bundle.py build --out gpu_bundle --pythons $(BUNDLE_PYTHONS)
	$(BIN)/python benchmarks/gpu_bundle.py check --bundle gpu_bundle

$(REHEARSAL_STAMP): Makefile
	rm -rf $(REHEARSAL_VENV)
	$(PYTHON) -m venv $(REHEARSAL_VENV)
	$(REHEARSAL_VENV)/bin/python -m pip install -q $(TORCH_PINS) $(SETUPTOOLS_PIN) $(DEVICE_IMAGE_PACKAGES)
	touch $(REHEARSAL_STAMP)

$(PY312_STAMP): Makefile
	rm -rf $(PY312_VENV)
	$(PY312) -m venv $(PY312_VENV)
	$(PY312_VENV)/bin/python -m pip install -q numpy pillow pyyaml tqdm tabulate portalocker cloudpickle typing_extensions
	touch $(PY312_STAMP)

gpu-rehearsal: gpu-bundle $(REHEARSAL_STAMP) $(PY312_STAMP)
	rm -rf $(REHEARSAL_OUT) $(REHEARSAL_OUT)-site $(REHEARSAL_OUT)-site312
	bash benchmarks/offline.sh $(PY312_VENV)/bin/python benchmarks/gpu_bundle.py install --bundle gpu_bundle \
		--target $(REHEARSAL_OUT)-site312
	PYTHONPATH=$(REHEARSAL_OUT)-site312 $(PY312_VENV)/bin/python benchmarks/gpu_bundle.py imports \
		--target $(REHEARSAL_OUT)-site312
	bash benchmarks/offline.sh env PYTHON=$(REHEARSAL_VENV)/bin/python GPU_SITE=$(CURDIR)/$(REHEARSAL_OUT)-site \
		bash benchmarks/gpu_check.sh --smoke $(REHEARSAL_OUT)

clean:
	rm -rf $(VENV) $(REHEARSAL_VENV) $(PY312_VENV) gpu_bundle runs .pytest_cache
