#!/usr/bin/env bash
# A single-node SLURM cluster on localhost (Debian's slurm-wlm + munge), for tests/test_slurm.py:
#   .ci/slurm_up.sh        install (if missing), configure for this machine, start munged, slurmctld, slurmd
# Exits 0 with "SLURM unavailable: ..." on stderr when the packages cannot be installed or the daemons do
# not come up (the test then skips with that message). Needs root.
set -uo pipefail
fail() { echo "SLURM unavailable: $*" >&2; exit 0; }
[ "$(id -u)" = 0 ] || fail "needs root to install and start the daemons"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/tmp/slurm_apt.log 2>&1 \
    || fail "apt-get install slurm-wlm munge failed (see /tmp/slurm_apt.log)"
fi
if sinfo -h >/dev/null 2>&1 && [ "$(sinfo -h -o %t | head -1)" = idle ]; then echo "SLURM already up"; exit 0; fi
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null
chmod 400 /etc/munge/munge.key
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=toolkit
SlurmctldHost=${HOST}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
NodeName=${HOST} CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
pgrep -x munged >/dev/null || munged --force || fail "munged did not start"
pgrep -x slurmctld >/dev/null || slurmctld || fail "slurmctld did not start (/var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start (/var/log/slurm/slurmd.log)"
for _ in $(seq 1 30); do
  state=$(sinfo -h -o %t 2>/dev/null | head -1)
  [ "$state" = idle ] || [ "$state" = mix ] && { echo "SLURM up: node ${HOST}, ${CPUS} CPUs, partition debug"; exit 0; }
  sleep 1
done
fail "the node did not become idle (sinfo: $(sinfo -h 2>&1 | head -1); /var/log/slurm/)"
