# All set-up happens here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch must be named in the same pip command as the rest, or pip resolves a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench vllm-env clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check "$(TORCH_PIN)" -e ".[compress,moe,eval,dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/layerif demo --out demo_out

test: install
	$(VENV)/bin/ruff check layerif_plugins tests benchmarks integration
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow and not integration"

lint: install
	$(VENV)/bin/ruff check layerif_plugins tests benchmarks integration

bench: install
	$(PY) benchmarks/engine.py

# vLLM needs CUDA torch 2.14.0 and compressed-tensors 0.17.0: its own environment, on a GPU machine.
vllm-env:
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install --quiet "vllm==0.33.0"

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
