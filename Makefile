# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create .venv and install the pinned toolchain first (see requirements/constraints.txt).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==24.3.1"
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[torch,dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lepton-edge compile samples/digits/digits.onnx -t cpu -o build/digits.lepton
	$(PY) samples/digits/demo.py build/digits.lepton
	@echo "--- int8: calibrate on 128 test images (inputs only, no labels), quantize, compile, run ---"
	$(PY) -c "import numpy as np; np.save('build/calib.npy', np.load('samples/digits/x_test.npy')[:128])"
	$(VENV)/bin/lepton-edge quantize samples/digits/digits.onnx -o build/digits_int8.onnx --calib build/calib.npy > build/quantize_report.txt
	$(VENV)/bin/lepton-edge compile build/digits_int8.onnx -t cpu -o build/digits_int8.lepton
	$(PY) samples/digits/demo.py build/digits_int8.lepton

test: $(STAMP)
	$(VENV)/bin/ruff check lepton_edge targets tests samples
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check lepton_edge targets tests samples

clean:
	rm -rf build .pytest_cache

# ONNX backend node tests through lepton-edge and onnxruntime -> conformance/RESULTS.md (+ .json).
# Full suite: ~1900 cases. Narrow it with e.g. CONFORMANCE_ARGS='--filter conv --jobs 4'.
.PHONY: conformance
conformance: $(STAMP)
	$(PY) conformance/run.py $(CONFORMANCE_ARGS)
