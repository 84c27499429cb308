#!/usr/bin/env bash
# Run a command while HOGS busy loops (default: one per two cores, at least one) compete for the
# CPU, to show that the suite's deadlines and synchronisation hold on a loaded machine.
#   scripts/with_cpu_hog.sh COMMAND [ARGS...]      (HOGS=N to choose the number)
set -uo pipefail
hogs=${HOGS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$hogs"); do
  bash -c 'while :; do :; done' &
  pids+=($!)
done
echo "[stress] $hogs busy loop(s) beside: $*"
start=$(date +%s)
"$@"
rc=$?
echo "[stress] exit $rc after $(( $(date +%s) - start )) s"
exit $rc
