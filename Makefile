# The README's commands. `make test` and `make demo` set themselves up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without a GPU, the CPU build of torch; a torch already in the venv is kept.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

$(VENV)/.ready: pyproject.toml setup.py csrc/flow_attention_cpu.cpp
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# the C++ CPU kernels are built against the torch installed above
	DITFLOW_BUILD_EXT=1 $(PY) -m pip install -q -e ".[test,dev,diffusers,scale]" --no-build-isolation
	touch $@

setup: $(VENV)/.ready

demo: setup
	$(VENV)/bin/ditflow demo

# tests/conftest.py runs the Triton kernels in the interpreter where there is no CUDA GPU
test: lint
	DITFLOW_BUILD_EXT=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# CPU timings, the Triton interpreter's included: interpreted on any machine
bench: setup
	TRITON_INTERPRET=1 $(PY) -m pytest benchmarks --benchmark-enable

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
