# The two set-up commands of the README, and their parts. Each target creates .venv if needed.
PY := .venv/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false
# Tests: everything but `gpu` (those skip themselves without CUDA anyway).
PYTEST_ARGS ?= -m "not gpu"

.PHONY: venv venv-gpu quickstart test test-unit test-stress gpu-check gpu-check-prepare lint clean-cache

venv:
	@bash scripts/make_venv.sh

# On a GPU cluster's login node: vLLM (CUDA) + DeepSpeed, pinned by constraints-gpu.txt.
venv-gpu:
	@bash scripts/make_venv.sh --gpu

# GRPO end to end on the embedded SmolLM2-135M-Instruct, on this machine (no SLURM needed).
quickstart: venv
	$(PY) -m hpc_rlhf.submit --config configs/quickstart_grpo.yaml --local

# The whole test suite (real vLLM-cpu, DeepSpeed, gloo, and a throwaway local SLURM cluster).
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m unit

# The multi-process tests (distributed, e2e, faults, SLURM) with a busy loop per two cores beside
# them and every time bound scaled by HPC_RLHF_TEST_SLOWDOWN (default 3 here).
# The multi-process tests two at a time (two modules compete for the CPU at every moment), every
# time bound scaled by HPC_RLHF_TEST_SLOWDOWN. STRESS_WORKERS=N for another count; a busy loop
# instead: scripts/with_cpu_hog.sh .venv/bin/python -m pytest -m "not gpu and not unit".
test-stress: venv
	HPC_RLHF_TEST_SLOWDOWN=$${HPC_RLHF_TEST_SLOWDOWN:-3} $(PY) -m pytest -m "not gpu and not unit" \
	  -n $${STRESS_WORKERS:-2} --dist loadgroup -p no:cacheprovider $(STRESS_ARGS)

# The one-command check on a machine with one CUDA GPU (scripts/gpu_check.sh); the wheels it may
# need (DeepSpeed, pydantic, ...) are prepared here first by gpu-check-prepare.
gpu-check:
	bash scripts/gpu_check.sh

gpu-check-prepare: venv
	PYTHON=$(PY) bash scripts/gpu_check.sh --prepare

clean-cache:
	rm -rf $${HPC_RLHF_CACHE:-$$HOME/.cache/hpc_rlhf}
