#!/usr/bin/env bash
# A real, throwaway SLURM cluster on this one host, for tests and CI.
#
#   scripts/slurm_cluster.sh start  [DIR]   # install packages if missing, start, wait for idle nodes
#   scripts/slurm_cluster.sh stop   [DIR]   # cancel jobs, stop the daemons by pid
#   scripts/slurm_cluster.sh status [DIR]   # daemons alive? sinfo
#   export SLURM_CONF=DIR/slurm.conf        # then sbatch / srun / squeue / scontrol work
#
# One munged, one slurmctld and TWO slurmd (node1, node2) on this host, each slurmd on its own
# port ("multiple slurmd" mode: slurmd -N <node>), in one partition `debug`: a job with
# --nodes=2 really gets two nodes and two slurmstepd. Everything (config, state, spool, logs,
# pids, munge key and socket) lives in DIR (default /tmp/hpc_rlhf_slurm); nothing is written to
# /etc. Runs as root (CI: a fresh Debian 12 without systemd). Several clusters may run at once
# in different DIRs: each picks free ports under a host-wide lock (/tmp/hpc_rlhf_slurm.ports.lock).
# Measured on a 2-core VM: install ~11 s (apt, once), start ~0.5 s, stop ~2 s.
#
# Environment knobs:
#   HPC_RLHF_SLURM_PORT     first TCP port to try (default 16817; 3 consecutive ports are used)
#   HPC_RLHF_SLURM_TIMEOUT  seconds to wait for both nodes to be idle (default 60)
#   HPC_RLHF_SLURM_CPUS     CPUs each node advertises (default 4; oversubscribes a small host)
set -euo pipefail

cmd=${1:-}
DIR=${2:-/tmp/hpc_rlhf_slurm}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
NODES=(node1 node2)
TIMEOUT=${HPC_RLHF_SLURM_TIMEOUT:-60}
CPUS=${HPC_RLHF_SLURM_CPUS:-4}
export SLURM_CONF=$CONF

log() { echo "[slurm_cluster] $*" >&2; }

ensure_packages() {
    local missing=0 tool
    for tool in munged mungekey slurmctld slurmd sbatch srun scontrol sinfo; do
        command -v "$tool" >/dev/null 2>&1 || missing=1
    done
    [[ $missing == 0 ]] && return 0
    if [[ $(id -u) != 0 ]]; then
        log "slurm-wlm/munge are missing and we are not root: apt-get install -y slurm-wlm munge"
        exit 1
    fi
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian's postinst tries to start system services; without systemd that is a harmless no-op.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >"$DIR/log/apt.log" 2>&1 \
        || { cat "$DIR/log/apt.log" >&2; exit 1; }
}

pid_alive() {  # pid_alive FILE: the pid in FILE names a live process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

port_in_use() {  # something accepts connections on 127.0.0.1:PORT
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

pick_ports() {  # sets CTLD_PORT and NODE_PORTS: 3 consecutive free ports from the base
    local base=${HPC_RLHF_SLURM_PORT:-16817} try p busy
    for try in $(seq 0 19); do
        busy=0
        for p in $((base + 10 * try)) $((base + 10 * try + 1)) $((base + 10 * try + 2)); do
            port_in_use "$p" && busy=1
        done
        if [[ $busy == 0 ]]; then
            CTLD_PORT=$((base + 10 * try))
            NODE_PORTS=($((CTLD_PORT + 1)) $((CTLD_PORT + 2)))
            return 0
        fi
    done
    log "no 3 free consecutive ports from $base on; set HPC_RLHF_SLURM_PORT"
    exit 1
}

write_conf() {
    local host
    host=$(hostname -s)
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a throwaway 2-node cluster on $host.
ClusterName=hpcrlhf
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
# munge on our own socket; short credential lifetime: a requeued job may start again after
# cred_expire seconds (default 120), so requeue tests take seconds instead of minutes.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers, CI): track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Nodes advertise more CPUs than the host has; accept the declared numbers.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# Schedule every second (defaults: main loop 60 s, backfill 30 s): a requeued job restarts as
# soon as its begin time (now + cred_expire) passes.
SchedulerParameters=sched_interval=1,bf_interval=1
# Reject at submit time a job that can never run (e.g. --nodes=3) instead of pending forever.
EnforcePartLimits=ALL
ReturnToService=2
# No mail on this throwaway cluster (the default /bin/mail is usually absent).
MailProg=/bin/true
# Jobs may be requeued (scontrol requeue, --requeue, preemption).
JobRequeue=1
# Fast tests: short RPC timeout, SIGTERM->SIGKILL after 2 s, quick node health.
MessageTimeout=5
KillWait=2
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
# Completed jobs stay visible to "scontrol show job" for MinJobAge seconds (no sacct here).
MinJobAge=600
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[0]} CPUs=$CPUS State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[1]} CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

print_logs() {
    local f
    for f in "$DIR"/log/*.log; do
        [[ -f $f ]] || continue
        echo "===== $f (last 40 lines) =====" >&2
        tail -n 40 "$f" >&2
    done
}

nodes_idle() {  # both nodes report state idle
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    [[ $(grep -cE '^node[12] idle$' <<<"$states") == 2 ]]
}

wait_idle() {
    local start=$SECONDS
    until nodes_idle; do
        if ((SECONDS - start > TIMEOUT)); then
            log "nodes not idle after ${TIMEOUT}s; sinfo says:"
            sinfo -N -o '%N %t %E' >&2 || true
            print_logs
            return 1
        fi
        sleep 0.5
    done
    log "cluster up in $DIR: node1 node2 idle ($((SECONDS - start))s waiting)"
}

start_munge() {
    pid_alive "$DIR/run/munged.pid" && return 0
    if [[ ! -s $DIR/munge/munge.key ]]; then
        mungekey --create --keyfile="$DIR/munge/munge.key" --bits=1024 --force
    fi
    chmod 600 "$DIR/munge/munge.key"
    # --force: run as root and accept a key directory under /tmp.
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --num-threads=4
}

start() {
    mkdir -p "$DIR"/{munge,state,spool,log,run}
    # munge refuses (and clients cannot reach) a socket whose parent directories are not
    # world-executable.
    chmod 755 "$DIR" "$DIR/munge"
    ensure_packages
    if pid_alive "$DIR/run/slurmctld.pid"; then
        log "already running (slurmctld pid $(cat "$DIR/run/slurmctld.pid"))"
        wait_idle || exit 1
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    stop_daemons
    rm -rf "$DIR"/{state,spool,run}/* "$DIR"/log/*.log
    local n
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
    start_munge || { print_logs; exit 1; }
    # Two clusters starting at once (two pytest sessions) must not pick the same ports: hold a
    # host-wide lock from picking them until the daemons listen on them.
    exec 9>/tmp/hpc_rlhf_slurm.ports.lock
    flock -w 60 9 || { log "could not lock /tmp/hpc_rlhf_slurm.ports.lock"; exit 1; }
    pick_ports
    write_conf
    echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
    slurmctld -f "$CONF" 9>&- || { log "slurmctld failed to start"; print_logs; exit 1; }
    for n in "${NODES[@]}"; do
        slurmd -f "$CONF" -N "$n" 9>&- || { log "slurmd $n failed to start"; print_logs; exit 1; }
    done
    wait_idle || exit 1
    exec 9>&-
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {  # SIGTERM every daemon by its pid file, wait up to 10 s, then SIGKILL
    local f pid name pids=() i alive
    for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
        [[ -s $f ]] || continue
        pid=$(cat "$f")
        name=$(basename "$f" .pid)
        # A stale pid file may name a reused pid: only signal the daemon it was written for.
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "${name%%-*}" ]]; then
            kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        fi
        rm -f "$f"
    done
    for i in $(seq 1 50); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

stop() {
    if pid_alive "$DIR/run/slurmctld.pid"; then
        # Cancel jobs first so their slurmstepd and tasks do not outlive the daemons.
        local ids i
        ids=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $ids ]]; then
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            for i in $(seq 1 40); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_daemons
    log "stopped ($DIR)"
}

status() {
    local f rc=0
    for f in munged slurmctld slurmd-node1 slurmd-node2; do
        if pid_alive "$DIR/run/$f.pid"; then
            echo "$f: running (pid $(cat "$DIR/run/$f.pid"))"
        else
            echo "$f: stopped"; rc=1
        fi
    done
    [[ $rc == 0 ]] && sinfo -N -o '%N %P %t %c' || true
    return $rc
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [DIR]   (DIR default /tmp/hpc_rlhf_slurm)" >&2; exit 2 ;;
esac
