#!/bin/bash
# Start a real single-node SLURM cluster on this machine (Debian slurm-wlm + munge, already installed).
#
# Installs nothing: .ci/run installs the packages (apt) before it asks for the SLURM tests with
# GRACEQ_TEST_SYSTEM=1; without the tools this script exits 2 and the caller skips. Idempotent: it keeps
# an existing munge key, rewrites slurm.conf only when it changed, and starts only the daemons that are
# not running. Each daemon it starts is named on stdout as "started NAME PIDFILE", so that the caller
# (tests/test_slurm.py's fixture) stops exactly those at the end. Needs root. Exit codes: 0 ready (the
# node is idle and takes jobs), 2 cannot run here (no root, tools missing: callers skip), 1 anything
# else (the message says what).
#
# What was seen to work on this kind of machine (gVisor, no cgroups): ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none, SlurmUser=root, SelectType=select/cons_tres, no accounting storage (read
# job state with squeue/scontrol, not sacct).
set -euo pipefail

say() { echo "slurm_setup: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "needs root to start SLURM"; exit 2
fi

missing=()
for tool in slurmctld slurmd munged munge unmunge sbatch squeue scontrol sinfo; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "not installed: ${missing[*]} (Debian packages slurm-wlm and munge; .ci/run installs them)"; exit 2
fi

HOST="$(hostname)"
if ! getent hosts "$HOST" >/dev/null; then
    say "hostname $HOST does not resolve; add it to /etc/hosts"; exit 1
fi

# -- munge -------------------------------------------------------------------------------------
KEY=/etc/munge/munge.key
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s "$KEY" ]; then
    say "creating a random munge key"
    dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
fi
chown munge:munge "$KEY" /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0400 "$KEY"
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged (as the munge user)"
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2.lock
    su -s /bin/sh munge -c "/usr/sbin/munged --force"
    echo "started munged /run/munge/munged.pid"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null || { say "munged does not answer"; exit 1; }
fi

# -- slurm.conf --------------------------------------------------------------------------------
CPUS="$(nproc)"
MEM_MB="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
CONF="$(cat <<EOF
# written by tests/slurm_setup.sh: a single-node test cluster
ClusterName=graceq
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=300
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)"
CHANGED=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$CONF" ]; then
    printf '%s\n' "$CONF" > /etc/slurm/slurm.conf
    CHANGED=1
fi

# -- daemons -----------------------------------------------------------------------------------
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$CHANGED" = 1 ]; then
    # a new configuration: restart whatever runs with the old one
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if running "$pidfile"; then kill "$(cat "$pidfile")"; sleep 1; fi
    done
fi
if ! running /run/slurmctld.pid || ! scontrol ping >/dev/null 2>&1; then
    say "starting slurmctld"
    running /run/slurmctld.pid && kill "$(cat /run/slurmctld.pid)" && sleep 1
    /usr/sbin/slurmctld
    echo "started slurmctld /run/slurmctld.pid"
    for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    scontrol ping >/dev/null 2>&1 || { tail -20 /var/log/slurm/slurmctld.log >&2; say "slurmctld does not answer"; exit 1; }
fi
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    /usr/sbin/slurmd
    echo "started slurmd /run/slurmd.pid"
fi

# -- wait for the node to take jobs ------------------------------------------------------------
for _ in $(seq 150); do
    STATE="$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1)"
    case "$STATE" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
case "$STATE" in
    idle|mixed|allocated|completing) say "ready: node $HOST is $STATE" ;;
    *) tail -20 /var/log/slurm/slurmd.log >&2; say "node $HOST is '$STATE', not ready"; exit 1 ;;
esac
