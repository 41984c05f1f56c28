# The two commands a newcomer runs: `make demo` and `make test`. Each builds the virtual
# environment it needs first (torch pinned to 2.13.0: a bare `torch` would pull a CUDA build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvstore demo

# Everything: the main suite (core, cluster, transformers, Helm), then the vLLM connector's tests
# against each supported vLLM, each in its own environment (scripts/vllm-env.sh: vLLM's CPU
# build pins its own torch): 0.32 in .venv-vllm, 0.29 (what ray[llm] 2.60 pins) in .venv-vllm-0.29.0,
# and 0.33 (no CPU build: its plain wheel, the scheduler side only; engine tests skip) in .venv-vllm-0.33.0.
test: $(STAMP)
	HELM_BIN="$$(bash helm/install-tools.sh)" $(PY) -m pytest -q -p no:cacheprovider
	bash scripts/vllm-env.sh
	.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/vllm_engine -m vllm
	VLLM_VERSION=0.29.0 bash scripts/vllm-env.sh
	.venv-vllm-0.29.0/bin/python -m pytest -q -p no:cacheprovider tests/vllm_engine -m vllm
	VLLM_VERSION=0.33.0 bash scripts/vllm-env.sh
	VLLM_TARGET_DEVICE=cpu .venv-vllm-0.33.0/bin/python -m pytest -q -p no:cacheprovider tests/vllm_engine -m vllm

bench: $(STAMP)
	mkdir -p bench-results
	$(PY) -m bench.tiers --json bench-results/tiers.json

clean-venv:
	rm -rf $(VENV)
