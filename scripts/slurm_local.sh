#!/usr/bin/env bash
# Start (or stop) a real one-node SLURM cluster on this machine, as root (see specs/cluster.md).
# Used by .ci/run so that the SLURM tests run for real; tests skip where sbatch is absent.
#   scripts/slurm_local.sh start     install if needed, start munge + slurmctld + slurmd
#   scripts/slurm_local.sh stop
set -euo pipefail
cmd="${1:-start}"

if [ "$cmd" = stop ]; then
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  exit 0
fi

if [ "$(id -u)" != 0 ]; then echo "slurm_local: not root, skipping"; exit 0; fi
if ! command -v slurmctld >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge) \
    >/tmp/slurm_install.log 2>&1 || { echo "slurm_local: install failed (see /tmp/slurm_install.log)"; exit 0; }
fi
if sinfo -h >/dev/null 2>&1; then echo "slurm_local: already running"; exit 0; fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
H=$(hostname); CPUS=$(nproc); MEM=$(( $(free -m | awk '/Mem:/{print $2}') - 1024 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$H
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
NodeName=$H CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONF
/usr/sbin/slurmctld
/usr/sbin/slurmd
for _ in $(seq 1 30); do
  if sinfo -h -o %t 2>/dev/null | grep -qE "idle|mix|alloc"; then echo "slurm_local: up ($(sinfo -h -o '%P %D %t'))"; exit 0; fi
  sleep 1
done
echo "slurm_local: started but the node is not idle: $(sinfo 2>&1 | tail -2)"
