#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the integration tests and for trying
# `wsi-pipe submit` without a real cluster. Runs as root, no systemd needed.
#
#   scripts/slurm_local.sh [start]   install (Debian packages) if missing, configure, start; idempotent
#   scripts/slurm_local.sh stop      stop slurmd, slurmctld and munged by their PID files
#   scripts/slurm_local.sh status    show daemons and `sinfo`
#
# Environment: SLURM_LOCAL_NO_INSTALL=1 never runs apt-get (exit 3 when Slurm is missing).
# Exit codes: 0 ok, 3 Slurm not installed and cannot be installed, 4 cluster did not come up.
set -Eeuo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
NODE=localhost

log() { echo "[slurm_local] $*" >&2; }
# say which command failed (set -e alone exits silently, and the tests show only stderr)
trap 'rc=$?; log "failed (exit $rc) at line $LINENO: $BASH_COMMAND"' ERR

pid_alive() {  # pid_alive PIDFILE -> 0 if the process in PIDFILE runs
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
      && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  if [[ "${SLURM_LOCAL_NO_INSTALL:-0}" == 1 ]] || ! command -v apt-get >/dev/null || [[ $(id -u) != 0 ]]; then
    log "Slurm is not installed and cannot be installed here (needs root + apt-get)"
    exit 3
  fi
  log "installing slurmctld slurmd slurm-client munge from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; } \
    || { log "apt-get install failed"; exit 3; }
}

render_conf() {
  # the node line as slurmd itself detects it (CPUs, sockets, cores, threads, RealMemory)
  local hw cpus mem
  hw=$(slurmd -C 2>/dev/null | head -n1 || true)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw"); cpus=${cpus:-$(nproc)}
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=${mem:-$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)}
  mem=$(( mem * 9 / 10 ))   # leave headroom: a node with less memory than configured is drained
  local topo
  topo=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw" || true)
  cat <<CONF
# written by wsi-pipe scripts/slurm_local.sh: a single-node cluster for tests
ClusterName=wsipipe
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( mem / cpus / 2 > 256 ? mem / cpus / 2 : 256 ))
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
ReturnToService=2
MinJobAge=600
KillWait=5
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus ${topo} RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
  if pid_alive "$MUNGE_PID"; then return 0; fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do pid_alive "$MUNGE_PID" && return 0; sleep 0.1; done
  log "munged did not start"; exit 4
}

node_ready() {  # the node answers and is idle/mixed/allocated (not down, drained or unknown)
  local st
  st=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1) || return 1
  [[ "$st" =~ ^(idle|mixed|allocated|completing)$ ]]
}

start() {
  install_if_missing
  mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
  local new
  new=$(render_conf)
  if [[ ! -f "$CONF" ]] || [[ "$(cat "$CONF")" != "$new" ]]; then
    if pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; then
      log "configuration changed: restarting the daemons"
      stop_slurm
    fi
    printf '%s\n' "$new" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
  fi
  start_munge
  pid_alive "$CTLD_PID" || slurmctld
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
  pid_alive "$SLURMD_PID" || slurmd -N "$NODE"
  local i
  for i in $(seq 150); do
    if node_ready; then log "cluster up: $(sinfo -h -o '%P %a %D %T' | head -n1)"; return 0; fi
    # a node left down/drained by an earlier unclean stop comes back on request
    if (( i % 20 == 10 )); then scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; fi
    sleep 0.2
  done
  log "the node did not become idle; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
  sinfo -N -l >&2 || true
  exit 4
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME
  local pf=$1 name=$2 pid
  pid_alive "$pf" || { rm -f "$pf"; return 0; }
  pid=$(cat "$pf")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$pf"; return 0; }; sleep 0.1; done
  log "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pf"
}

stop_slurm() {
  stop_pidfile "$SLURMD_PID" slurmd
  stop_pidfile "$CTLD_PID" slurmctld
}

stop() {
  stop_slurm
  stop_pidfile "$MUNGE_PID" munged
  log "stopped"
}

status() {
  local d
  for d in "$MUNGE_PID:munged" "$CTLD_PID:slurmctld" "$SLURMD_PID:slurmd"; do
    if pid_alive "${d%%:*}"; then echo "${d#*:}: running (pid $(cat "${d%%:*}"))"
    else echo "${d#*:}: stopped"; fi
  done
  command -v sinfo >/dev/null && sinfo 2>/dev/null || true
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  *) echo "usage: $0 [start|stop|restart|status]" >&2; exit 2 ;;
esac
