# The two set-up commands of the README, and their parts. Each target creates .venv if needed.
PY := .venv/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false
# Tests: everything but `gpu` (those skip themselves without CUDA anyway).
PYTEST_ARGS ?= -m "not gpu"

.PHONY: venv quickstart test test-unit lint clean-cache

venv:
	@bash scripts/make_venv.sh

# GRPO end to end on the embedded SmolLM2-135M-Instruct, on this machine (no SLURM needed).
quickstart: venv
	$(PY) -m hpc_rlhf.submit --config configs/quickstart_grpo.yaml --local

# The whole test suite (real vLLM-cpu, DeepSpeed, gloo, and a throwaway local SLURM cluster).
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m unit

clean-cache:
	rm -rf $${HPC_RLHF_CACHE:-$$HOME/.cache/hpc_rlhf}
