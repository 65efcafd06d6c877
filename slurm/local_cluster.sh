#!/usr/bin/env bash
# A real two-node SLURM on this one machine, for trying slurm/train.sbatch and for the tests.
#
#   sudo slurm/local_cluster.sh start /tmp/slurm   # munged, slurmctld, slurmd n1 and n2; waits for idle
#   export SLURM_CONF=/tmp/slurm/slurm.conf        # then sbatch, squeue, scontrol as usual
#   sudo slurm/local_cluster.sh stop /tmp/slurm    # stops every daemon it started, by pid
#
# Needs root and Debian's `slurmctld slurmd slurm-client munge` (SLURM 22.05, built with
# MULTIPLE_SLURMD, which allows several slurmd on one host). No systemd, no cgroups, no accounting:
# proctrack/linuxproc and task/none. Everything (config, munge key and socket, state, spool, logs,
# pids) lives under the given folder; nothing in /etc is touched.
# Ports: SLURMCTLD_PORT (default 16817) and SLURMD_PORTS (two ports, default "17001 17002").
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(realpath -m "$2")
ctld_port=${SLURMCTLD_PORT:-16817}
read -r -a slurmd_ports <<<"${SLURMD_PORTS:-17001 17002}"
nodes=(n1 n2)

write_config() {
    local host cpus i
    host=$(hostname -s)
    cpus=$(nproc)
    cat >"$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire seconds after it stopped (default 120).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
# Look at pending jobs every second (default 60), so a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/pid/slurmctld.pid
SlurmdPidFile=$dir/pid/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
CONF
    for i in "${!nodes[@]}"; do
        echo "NodeName=${nodes[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${slurmd_ports[$i]} CPUs=$cpus State=UNKNOWN" >>"$dir/slurm.conf"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
}

start_munge() {
    install -d -m 0755 "$dir"
    install -d -o munge -g munge -m 0755 "$dir/munge"
    runuser -u munge -- mungekey --create --keyfile="$dir/munge/munge.key" 2>/dev/null \
        || [[ -f $dir/munge/munge.key ]]
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
}

wait_idle() {
    local i
    for i in $(seq 1 60); do
        if [[ $(sinfo -h -N -o '%t' 2>/dev/null | grep -c '^idle') -eq ${#nodes[@]} ]]; then
            return 0
        fi
        sleep 0.5
    done
    echo "error: nodes did not become idle in 30 s; see $dir/log" >&2
    sinfo -N >&2 || true
    return 1
}

start() {
    [[ $EUID -eq 0 ]] || { echo "error: start needs root (slurmd and munged run as root/munge)" >&2; exit 2; }
    for daemon in munged slurmctld slurmd sinfo; do
        command -v "$daemon" >/dev/null || [[ -x /usr/sbin/$daemon ]] || {
            echo "error: $daemon not found; apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
            exit 2
        }
    done
    export PATH=$PATH:/usr/sbin
    install -d -m 0755 "$dir"/{state,spool,pid,log}
    write_config
    export SLURM_CONF=$dir/slurm.conf
    start_munge
    slurmctld -f "$SLURM_CONF"
    for node in "${nodes[@]}"; do
        slurmd -f "$SLURM_CONF" -N "$node"
    done
    wait_idle
}

stop_pid() {
    local file=$1 pid i
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    local node
    for node in "${nodes[@]}"; do
        stop_pid "$dir/pid/slurmd-$node.pid"
    done
    stop_pid "$dir/pid/slurmctld.pid"
    stop_pid "$dir/munge/munged.pid"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
