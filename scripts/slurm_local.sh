#!/usr/bin/env bash
# A real single-node SLURM on this machine, for tests/tools/test_slurm.py.
#   scripts/slurm_local.sh install   apt-get installs slurmctld, slurmd, slurm-client, munge (once)
#   scripts/slurm_local.sh start     install if needed, write /etc/slurm/slurm.conf, start munged + daemons
#   scripts/slurm_local.sh stop      cancel every job, wait for the queue to drain, shut the daemons down
#   scripts/slurm_local.sh status    sinfo + squeue
# Every command is idempotent. Why each setting: the comments below and docs/resilience.md ("SLURM").
# State, logs and pid files live in $VIM_DISC_SLURM_DIR (default /tmp/vim_disc_slurm).
set -euo pipefail

STATE=${VIM_DISC_SLURM_DIR:-/tmp/vim_disc_slurm}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
# advertise more CPUs than cores so a test can run a job and srun steps side by side
NODE_CPUS=${VIM_DISC_SLURM_CPUS:-8}

log() { echo "[slurm_local] $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then log "needs root (daemons run as root here)"; exit 1; fi
}

installed() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null
}

do_install() {
  installed && return 0
  need_root
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  local mem
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
  mkdir -p /etc/slurm "$STATE/state" "$STATE/spool"
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
# written by scripts/slurm_local.sh (vim-disc tests); single node, no cgroups, no accounting
ClusterName=vimdisc
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# short-lived credentials and a 2 s scheduler tick: a requeued job restarts in ~11 s, not ~150 s
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=60
KillWait=15
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$NODE CPUs=$NODE_CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if ! cmp -s "$tmp" "$CONF" 2>/dev/null; then
    mv "$tmp" "$CONF"
    log "wrote $CONF"
  else
    rm -f "$tmp"
  fi
}

alive() {  # alive PIDFILE
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

do_start() {
  do_install
  need_root
  write_conf
  if ! alive /run/munge/munged.pid; then
    install -d -o munge -g munge /run/munge
    runuser -u munge -- /usr/sbin/munged
  fi
  munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }
  alive "$STATE/slurmctld.pid" || slurmctld -i
  alive "$STATE/slurmd.pid" || slurmd
  for _ in $(seq 1 60); do
    if sinfo -h -n "$NODE" -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
      log "node $NODE is up"
      return 0
    fi
    sleep 0.5
  done
  log "node $NODE did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log"
  exit 1
}

do_stop() {
  installed || return 0
  if alive "$STATE/slurmctld.pid"; then
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 60); do  # `scontrol shutdown` alone would leave running job steps behind
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
    scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 1 40); do
      alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid" || break
      sleep 0.25
    done
  fi
  if alive /run/munge/munged.pid; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  fi
  log "stopped"
}

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) sinfo; squeue ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
