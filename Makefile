# All set-up happens here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch must be named in the same pip command as the rest, or pip resolves a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench vllm-env vllm-test clean

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

# Speed/memory/quality tables (bench_out/); QUICK=1 for a smoke run of each.
BENCH_FLAGS := $(if $(QUICK),--quick,)
bench: install
	$(PY) benchmarks/engine.py $(BENCH_FLAGS)
	$(PY) benchmarks/engine_scale.py $(BENCH_FLAGS)
	$(PY) benchmarks/quality_pruning.py $(BENCH_FLAGS)
	$(PY) benchmarks/quality_moe.py $(BENCH_FLAGS)
	$(PY) benchmarks/quality_depth.py $(BENCH_FLAGS)

# vLLM needs CUDA torch 2.14.0 and compressed-tensors 0.17.0 (llmcompressor pins 0.19.0): its own
# environment, on a GPU machine. vllm 0.33.0 asks for a certifi newer than some registries have:
# the fallback installs its requirements minus certifi, then the wheel with --no-deps.
VLLM_VENV ?= .venv-vllm
vllm-env:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check "vllm==0.33.0" "lm-eval==0.4.13" "datasets>=3" || ( \
	  $(VLLM_VENV)/bin/pip download --no-deps -d $(VLLM_VENV)/wheels "vllm==0.33.0" && \
	  unzip -p $(VLLM_VENV)/wheels/vllm-0.33.0-*.whl 'vllm-0.33.0.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' \
	    | grep -v '^certifi' | grep -v 'extra ==' > $(VLLM_VENV)/requirements.txt && \
	  $(VLLM_VENV)/bin/pip install -r $(VLLM_VENV)/requirements.txt certifi && \
	  $(VLLM_VENV)/bin/pip install --no-deps $(VLLM_VENV)/wheels/vllm-0.33.0-*.whl && \
	  $(VLLM_VENV)/bin/pip install "lm-eval==0.4.13" "datasets>=3" )
	$(VLLM_VENV)/bin/python -I -c "import vllm, torch; assert torch.cuda.is_available(), 'vLLM needs a CUDA GPU'; print('vllm', vllm.__version__)"

# the tests that need vLLM and a GPU (they skip with the reason elsewhere)
vllm-test: install
	$(PY) -m pytest -m "vllm or gpu" -rs

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo_out bench_out .pytest_cache
