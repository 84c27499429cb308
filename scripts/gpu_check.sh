#!/usr/bin/env bash
# The one-command GPU check: the `gpu` tests on one CUDA GPU, with REQUIRE_GPU=1 (a skipped gpu
# test fails, except those of the optional flash-attn / ring-flash-attn / vLLM), then a table.
#
#   scripts/gpu_check.sh --prepare   here, with the package index: build the wheels the GPU
#                                     machine may lack (DeepSpeed, pydantic, hjson, ...) into
#                                     .gpu_wheels/ (a few MB, git-ignored)
#   scripts/gpu_check.sh             on the GPU machine, from the repository root: needs python3
#                                     with CUDA torch, transformers, peft, pytest; no network
#
# Without a GPU it says so in one line and exits 0. Meant to finish in under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels
# Packages hpc_rlhf's GPU tests need beyond torch/transformers/peft/pytest, at the versions of
# requirements-gpu.lock: pure Python wheels, and pydantic-core for CPython 3.10-3.12 x86-64.
PURE=(deepspeed hjson annotated-types typing-inspection pydantic submitit)
NATIVE=(pydantic-core)
pinned() { for n in "$@"; do grep -i -m1 "^${n//-/[-_]}==" requirements-gpu.lock; done; }

if [[ "${1:-}" == "--prepare" ]]; then
  py=${PYTHON:-.venv/bin/python}
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # DeepSpeed is a source distribution: build it here as a pure-Python wheel (ops JIT-build on
  # the GPU machine when first used).
  mapfile -t pure < <(pinned "${PURE[@]}")
  mapfile -t native < <(pinned "${NATIVE[@]}")
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps -w "$WHEELS" "${pure[0]}" || exit 1
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "${pure[@]:1}" || exit 1
  for ver in 3.12 3.11 3.10; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$ver" \
      --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "${native[@]}" || exit 1
  done
  du -sh "$WHEELS"; ls "$WHEELS"
  exit 0
fi

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[gpu_check] no CUDA GPU here (torch.cuda.is_available() is False): nothing to check"
  exit 0
fi
start=$(date +%s)
site=$(mktemp -d)
table=$(mktemp)
if [[ -d "$WHEELS" ]]; then
  # Install only what this machine lacks (its own torch, numpy, transformers stay).
  need=()
  tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  for whl in "$WHEELS"/*.whl; do
    base=$(basename "$whl")
    [[ "$base" == *-py3-none-any.whl || "$base" == *-"$tag"-* ]] || continue
    name=$(echo "$base" | cut -d- -f1 | tr '_' '-')
    "$PY" -m pip show -q "$name" >/dev/null 2>&1 || need+=("$whl")
  done
  if (( ${#need[@]} )); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${need[@]}" \
      2>&1 | grep -v "^ERROR: pip's dependency resolver" || true
  fi
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" HPC_RLHF_GPU_TABLE=$table REQUIRE_GPU=1
export HPC_RLHF_CACHE=$(mktemp -d) TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" - <<'PY'
import torch, transformers
print(f"[gpu_check] {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, transformers {transformers.__version__}")
PY
"$PY" -m pytest -m gpu -p no:cacheprovider -o addopts="" -rA -q --timeout 420 tests/gpu \
  tests/unit/test_ring_attn_gpu.py
rc=$?
echo
echo "== gpu check ($(( $(date +%s) - start )) s, pytest exit $rc)"
"$PY" - "$table" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
w = max([len(r["check"]) for r in rows] + [5])
print(f"{'check':<{w}}  result  detail")
for r in rows:
    print(f"{r['check']:<{w}}  {r['result']:<6}  {r['detail']}")
PY
exit $rc
