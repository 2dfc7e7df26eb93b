#!/usr/bin/env bash
# A real Slurm cluster on this machine (Debian's slurm-wlm and munge), for the tests and for trying
# `rectok submit` / `rectok sweep` without a cluster. Needs root (slurmd runs jobs as their user).
#
#   scripts/slurm_cluster.sh start [--nodes N] [DIR]  # prints the SLURM_CONF to export; DIR defaults to /tmp/rectok-slurm
#   scripts/slurm_cluster.sh stop [DIR]               # kills everything the cluster started
#   scripts/slurm_cluster.sh node-down DIR I          # nodes >= 2: kills every process of node I (a lost node)
#   scripts/slurm_cluster.sh node-up DIR I            # starts node I's slurmd again
#
# One node (the default) is slurmd on localhost. Two or more: each node is its own network namespace
# with its own hostname (nodeI) and /etc/hosts, joined by a veth pair to a bridge in the root namespace
# on the range reserved for network tests (198.18.0.0/15; nothing is routed, forwarding stays off, so no
# traffic leaves the bridge); slurmctld listens on the bridge; the cluster has a munged of its own.
# Debian's slurmd cannot run twice on one host otherwise.
#
# No systemd, no cgroups, no accounting database: processes are tracked by /proc, and squeue is the
# only record of a job (finished jobs leave it after MinJobAge seconds).
set -euo pipefail
export PATH="$PATH:/usr/sbin"
usage() { echo "usage: slurm_cluster.sh start [--nodes N] [DIR] | stop [DIR] | node-down DIR I | node-up DIR I" >&2; exit 2; }
action=${1:-}
shift || true
nodes=1
if [[ $action == start && ${1:-} == --nodes ]]; then
    nodes=${2:?--nodes needs a number}
    shift 2
fi
[[ $nodes =~ ^[1-9][0-9]?$ ]] || usage
dir=$(realpath -m "${1:-/tmp/rectok-slurm}")
conf="$dir/slurm.conf"
# Names of this cluster's namespaces and links: short (15-byte interface names), distinct per folder.
id=$(printf %s "$dir" | md5sum | cut -c1-6)
bridge="rtb$id"
netns() { echo "rtk$id-n$1"; }

kill_pidfile() {
    if [[ -f $1 ]]; then
        kill "$(cat "$1")" 2>/dev/null || true
        rm -f "$1"
    fi
}

node_down() {  # every process of node $1: slurmd, step daemons, the job's tasks
    local ns
    ns=$(netns "$1")
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    rm -f "$dir/node$1/slurmd.pid"
}

stop() {
    kill_pidfile "$dir/slurmctld.pid"
    kill_pidfile "$dir/slurmd.pid"
    # Step daemons of jobs still ending outlive slurmd, waiting to report to it and deaf to SIGTERM;
    # this cluster's carry its SLURM_CONF.
    for pid in $(pgrep -x slurmstepd || true); do
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$conf"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^rtk$id-n" || true); do
        node_down "${ns##*-n}"
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
    if [[ -L $dir/munge ]]; then  # the cluster's own munged and its files
        kill_pidfile "$dir/munge/munged.pid"
        rm -rf "$(readlink "$dir/munge")" "$dir/munge"
    fi
}

start_node() {  # slurmd of node $1 inside its namespace, with its own hostname and /etc/hosts
    mkdir -p "$dir/node$1/spool"
    nsenter --net="/run/netns/$(netns "$1")" unshare --uts --mount bash -c \
        "hostname node$1 && mount --bind '$dir/hosts' /etc/hosts && exec slurmd -N node$1 -f '$conf'"
}

wait_idle() {
    for _ in $(seq 120); do
        if [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) -ge $1 ]]; then
            return 0
        fi
        sleep 0.25
    done
    echo "slurm_cluster.sh: $1 node(s) did not become idle in 30 s; logs in $dir" >&2
    sinfo -N >&2 || true
    tail -5 "$dir"/slurmctld.log "$dir"/*slurmd.log "$dir"/node*/slurmd.log >&2 2>/dev/null || true
    exit 1
}

case $action in
    stop) stop; exit 0 ;;
    node-down | node-up)
        node=${2:?slurm_cluster.sh $action DIR I: which node}
        [[ -f $conf ]] && ip netns list | grep -q "^$(netns "$node")\b" || {
            echo "slurm_cluster.sh: no node $node in a multi-node cluster at $dir" >&2; exit 1; }
        export SLURM_CONF=$conf
        if [[ $action == node-down ]]; then node_down "$node"; else start_node "$node"; fi
        exit 0 ;;
    start) ;;
    *) usage ;;
esac

for cmd in munged slurmctld slurmd sbatch; do
    command -v "$cmd" >/dev/null || {
        echo "slurm_cluster.sh: $cmd not found; install Debian's slurm-wlm and munge (scripts/setup.sh does as root)" >&2
        exit 1
    }
done
[[ $(id -u) == 0 ]] || { echo "slurm_cluster.sh: slurmd must run as root" >&2; exit 1; }
stop
mkdir -p "$dir/state"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Ports of their own, so that clusters started in several folders do not meet.
ctld_port=$(free_port)
slurmd_port=$(free_port)
# Virtual CPUs (at least 4, config_overrides): the tests run two 2-task variants side by side on 2 cores.
cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))

if (( nodes == 1 )); then
    # munge: one daemon per machine, shared by every one-node cluster started here.
    if ! munge -n </dev/null >/dev/null 2>&1; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        [[ -f /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || create-munge-key -f; chown munge:munge /etc/munge/munge.key; }
        runuser -u munge -- munged --force
    fi
    ctld_host=localhost
    auth_socket=""
    node_lines="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=20000 State=UNKNOWN"
    node_list=localhost
    node_files="$dir"
    mkdir -p "$dir/spool"
else
    if ! ip netns add "rtk$id-probe" 2>/dev/null; then
        echo "slurm_cluster.sh: cannot make network namespaces here (ip netns add failed); a multi-node cluster needs them" >&2
        exit 1
    fi
    ip netns del "rtk$id-probe"
    # A /24 of 198.18.0.0/15 that no interface here uses yet: clusters side by side get their own.
    used=$(ip -o -4 addr show | awk '{print $4}')
    octet=""
    for k in $(seq 0 255); do
        candidate=$(( (16#${id:0:2} + k) % 256 ))
        if ! grep -q "^198\.18\.$candidate\." <<<"$used"; then octet=$candidate; break; fi
    done
    [[ -n $octet ]] || { echo "slurm_cluster.sh: no free /24 in 198.18.0.0/16" >&2; exit 1; }
    net="198.18.$octet"
    ip link add "$bridge" type bridge
    ip addr add "$net.1/24" dev "$bridge"
    ip link set "$bridge" up
    {
        echo "127.0.0.1 localhost"
        echo "$net.1 rectok-ctld"
        for i in $(seq "$nodes"); do echo "$net.$((10 + i)) node$i"; done
    } >"$dir/hosts"
    for i in $(seq "$nodes"); do
        ns=$(netns "$i")
        ip netns add "$ns"
        ip link add "rtv$id$i" type veth peer name "rtp$id$i"
        ip link set "rtp$id$i" netns "$ns"
        ip link set "rtv$id$i" master "$bridge" up
        ip -n "$ns" link set "rtp$id$i" name eth0
        ip -n "$ns" addr add "$net.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
    # A munged of the cluster's own (own key and socket), its files owned by munge as munged insists.
    mdir="/run/rectok-munge-$id"
    rm -rf "$mdir"
    mkdir -p "$mdir"
    head -c 1024 /dev/urandom >"$mdir/munge.key"
    chmod 400 "$mdir/munge.key"
    chown -R munge:munge "$mdir"
    chmod 755 "$mdir"
    runuser -u munge -- munged --socket="$mdir/munge.socket" --key-file="$mdir/munge.key" \
        --pid-file="$mdir/munged.pid" --log-file="$mdir/munged.log" --seed-file="$mdir/munged.seed"
    ln -sfn "$mdir" "$dir/munge"
    ctld_host="localhost($net.1)"
    auth_socket="socket=$mdir/munge.socket,"
    node_lines=$(for i in $(seq "$nodes"); do
        echo "NodeName=node$i NodeAddr=$net.$((10 + i)) CPUs=$cpus RealMemory=20000 State=UNKNOWN"; done)
    node_list="node[1-$nodes]"
    node_files="$dir/%n"  # Debian's slurmd expands %n (the node's name) in these paths
fi

cat >"$conf" <<EOF
ClusterName=rectok
SlurmctldHost=$ctld_host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Credentials expire quickly so a requeued job may start again at once (the default waits ~130 s).
AuthInfo=${auth_socket}cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$node_files/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$node_files/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$node_files/slurmd.log
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
# A node that stops answering (a lost node) is declared down after 10 s, not 300.
SlurmdTimeout=10
# Requeued jobs are started by the backfill scheduler: look every second, not every 30.
SchedulerParameters=sched_interval=1,bf_interval=1
# A job that ignores SIGTERM (submitit's tasks do) is killed 5 s later, not 30: requeues are quick.
KillWait=5
$node_lines
PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$conf
slurmctld -c -f "$conf"
if (( nodes == 1 )); then
    slurmd -N localhost -f "$conf"
else
    for i in $(seq "$nodes"); do start_node "$i"; done
fi
wait_idle "$nodes"
echo "SLURM_CONF=$conf"
