#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the sweep's integration test and for trying
# `iddpm-train sweep --launcher slurm` without a cluster.
#
#   scripts/slurm_local.sh start DIR   install slurm-wlm + munge when missing (apt-get, as root),
#                                      write DIR/slurm.conf, start munged, slurmctld and slurmd,
#                                      wait until the node is idle; prints `export SLURM_CONF=...`
#   scripts/slurm_local.sh stop DIR    stop the daemons this script started in DIR, by their PIDs
#
# Everything lives under DIR (config, state, spool, logs, pid files, munge socket), so several
# clusters can run side by side and nothing under /etc is changed except by the package install.
# The cluster is configured for a machine without cgroups: proctrack/linuxproc, task/none,
# select/cons_tres, no accounting. Daemons and jobs run as root (the caller must be root).
# Exit status is non-zero with the reason on stderr when the cluster cannot be started.
# $PYTHON (default python3) picks two free TCP ports for the daemons.
set -euo pipefail

die() { echo "slurm_local: $*" >&2; exit 1; }

cmd=${1:-}
dir=${2:-}
[[ -n "$cmd" && -n "$dir" ]] || die "usage: $0 start|stop DIR"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

stop() {
    local f pid
    for f in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
        [[ -s "$f" ]] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
    if [[ -s "$dir/munge_dir" ]]; then
        rm -rf "$(cat "$dir/munge_dir")"
        rm -f "$dir/munge_dir"
    fi
}

if [[ "$cmd" == stop ]]; then
    stop
    exit 0
fi
[[ "$cmd" == start ]] || die "unknown command $cmd (start|stop)"
[[ $(id -u) -eq 0 ]] || die "must run as root (slurmd and munged are started as root / user munge)"

# ---- install when missing
need=()
for b in slurmctld slurmd sbatch sinfo; do command -v "$b" >/dev/null 2>&1 || { need+=(slurm-wlm); break; }; done
[[ -x /usr/sbin/munged ]] || command -v munged >/dev/null 2>&1 || need+=(munge)
if ((${#need[@]})); then
    echo "slurm_local: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq "${need[@]}" >&2 || die "apt-get install ${need[*]} failed"
fi
MUNGED=$(command -v munged || echo /usr/sbin/munged)
key=/etc/munge/munge.key
[[ -s "$key" ]] || die "$key is missing (the munge package creates it; run 'mungekey --create' as root)"

# ---- free TCP ports for the two daemons
ports=$("${PYTHON:-python3}" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
) || true
read -r ctld_port slurmd_port <<< "$ports" || true
[[ -n "${slurmd_port:-}" ]] || die "could not pick two free TCP ports with ${PYTHON:-python3}"
host=$(hostname -s)
cpus=$(nproc)
mkdir -p "$dir"/state "$dir"/spool "$dir"/log
# munged wants every folder above its socket searchable by all (pytest's folders are 0700), so
# its files live in a folder of their own under /tmp, named in DIR/munge_dir for `stop`.
mdir=$(mktemp -d /tmp/iddpm-munge-XXXXXX)
echo "$mdir" > "$dir/munge_dir"
chown munge:munge "$mdir"
chmod 0755 "$mdir"
cluster="iddpm$(printf '%s' "$dir" | cksum | cut -c1-6)"

cat > "$dir/slurm.conf" <<EOF
ClusterName=$cluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$mdir/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF="$dir/slurm.conf"
trap 'stop; die "start failed; logs in $dir/log"' ERR

# ---- munged (as user munge, with its own socket under DIR)
runuser -u munge -- "$MUNGED" --socket="$mdir/munge.socket" --pid-file="$mdir/munged.pid" \
    --log-file="$mdir/munged.log" --seed-file="$mdir/munged.seed" --key-file="$key" \
    || die "munged did not start (see $mdir/munged.log)"
for _ in $(seq 50); do [[ -s "$mdir/munged.pid" ]] && break; sleep 0.1; done
cp "$mdir/munged.pid" "$dir/munged.pid"

# ---- slurmctld, slurmd (daemonise; they write their pid files)
/usr/sbin/slurmctld -f "$SLURM_CONF" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
/usr/sbin/slurmd -f "$SLURM_CONF" || die "slurmd did not start (see $dir/log/slurmd.log)"

state=""
for _ in $(seq 120); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1 || true)
    [[ "$state" == idle ]] && break
    sleep 0.5
done
trap - ERR
if [[ "$state" != idle ]]; then
    tail -n 5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    stop
    die "node $host did not become idle within 60 s (state: '${state:-none}'); logs in $dir/log"
fi
echo "export SLURM_CONF=$SLURM_CONF"
