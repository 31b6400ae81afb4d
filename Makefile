# Two commands do all set-up on a fresh machine (see README):
#   make demo   venv + install + the mini pipeline on generated data
#   make test   venv + install + mypy on the typed interfaces + the test suite (fast and slow)
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

.PHONY: setup demo test test-fast clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
