#!/usr/bin/env bash
# One node, no SLURM: the same torchrun command the SLURM task runs, world = procs_per_node.
#   launchers/local.sh configs/X.yaml [key=value ...]        (HPC_RLHF_PROGRAM=smoke to test)
# Equivalent to: python -m hpc_rlhf.submit --config configs/X.yaml --local [key=value ...]
set -euo pipefail
config=${1:?usage: launchers/local.sh CONFIG.yaml [key=value ...]}
shift
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m hpc_rlhf.submit --config "$config" --local "$@"
