#!/usr/bin/env bash
# A plain torchrun line for clusters without SLURM (run it on every node).
#   NNODES=2 NPROC_PER_NODE=8 HEAD_ADDR=10.0.0.1 RDZV_PORT=29500 RDZV_ID=myjob \
#     launchers/torchrun.sh configs/X.yaml [key=value ...]
# NNODES x NPROC_PER_NODE must equal topology.nodes x topology.procs_per_node.
# MAX_RESTARTS (default 0; launch.max_restarts in the SLURM paths): how often torchrun restarts
# the ranks after a failure; they resume from the newest checkpoint.
# Set HPC_RLHF_RUN_DIR to one shared directory on every node (default: launch.run_dir).
set -euo pipefail
config=${1:?usage: launchers/torchrun.sh CONFIG.yaml [key=value ...]}
shift
cd "$(dirname "$0")/.."
if [[ ${NNODES:-1} != 1 && -z ${HEAD_ADDR:-} ]]; then
    echo "launchers/torchrun.sh: NNODES=$NNODES needs HEAD_ADDR=<address of the first node>" \
         "(the same on every node); 127.0.0.1 only works for one node" >&2
    exit 2
fi
# With restarts, torchrun must not share its rendezvous store with the ranks: a restarted round
# would read the last round's process-group keys (pytorch issue 135712).
if [[ ${MAX_RESTARTS:-0} != 0 ]]; then
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --nproc-per-node "${NPROC_PER_NODE:-1}" \
    --rdzv-backend c10d --rdzv-endpoint "${HEAD_ADDR:-127.0.0.1}:${RDZV_PORT:-29500}" \
    --rdzv-id "${RDZV_ID:-hpc_rlhf}" --max-restarts "${MAX_RESTARTS:-0}" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --shutdown-timeout 240 \
    -m hpc_rlhf.launch.main --config "$config" "$@"
