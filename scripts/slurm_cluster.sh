#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian's slurm-wlm and munge), for the tests and for
# trying `rectok submit` / `rectok sweep` without a cluster. Needs root (slurmd runs jobs as their user).
#
#   scripts/slurm_cluster.sh start [DIR]   # prints the SLURM_CONF to export; DIR defaults to /tmp/rectok-slurm
#   scripts/slurm_cluster.sh stop  [DIR]
#
# No systemd, no cgroups, no accounting database: processes are tracked by /proc, and squeue is the
# only record of a job (finished jobs leave it after MinJobAge seconds).
set -euo pipefail
action=${1:?usage: slurm_cluster.sh start|stop [DIR]}
dir=$(realpath -m "${2:-/tmp/rectok-slurm}")
conf="$dir/slurm.conf"

stop() {
    for name in slurmd slurmctld; do
        if [[ -f "$dir/$name.pid" ]]; then
            kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
    # Step daemons of jobs still ending outlive slurmd, waiting to report to it and deaf to SIGTERM;
    # this cluster's carry its SLURM_CONF.
    for pid in $(pgrep -x slurmstepd || true); do
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$conf"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
}

if [[ $action == stop ]]; then
    stop
    exit 0
fi
[[ $action == start ]] || { echo "usage: slurm_cluster.sh start|stop [DIR]" >&2; exit 2; }
for cmd in munged slurmctld slurmd sbatch; do
    command -v "$cmd" >/dev/null || PATH="$PATH:/usr/sbin" command -v "$cmd" >/dev/null || {
        echo "slurm_cluster.sh: $cmd not found; install Debian's slurm-wlm and munge (scripts/setup.sh does as root)" >&2
        exit 1
    }
done
[[ $(id -u) == 0 ]] || { echo "slurm_cluster.sh: slurmd must run as root" >&2; exit 1; }
export PATH="$PATH:/usr/sbin"
stop
mkdir -p "$dir/state" "$dir/spool"

# munge: one daemon per machine, shared by every cluster started here.
if ! munge -n </dev/null >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -f /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || create-munge-key -f; chown munge:munge /etc/munge/munge.key; }
    runuser -u munge -- munged --force
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Ports of their own, so that clusters started in several folders do not meet.
ctld_port=$(free_port)
slurmd_port=$(free_port)
# Virtual CPUs (at least 4, config_overrides): the tests run two 2-task variants side by side on 2 cores.
cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))
cat >"$conf" <<EOF
ClusterName=rectok
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
# Credentials expire quickly so a requeued job may start again at once (the default waits ~130 s).
AuthInfo=cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
MpiDefault=none
MinJobAge=600
# Requeued jobs are started by the backfill scheduler: look every second, not every 30.
SchedulerParameters=sched_interval=2,bf_interval=2
# A job that ignores SIGTERM (submitit's tasks do) is killed 5 s later, not 30: requeues are quick.
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$conf
slurmctld -c -f "$conf"
slurmd -N localhost -f "$conf"
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.5
done
echo "slurm_cluster.sh: the node did not become idle in 30 s; logs in $dir" >&2
sinfo >&2 || true
tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
