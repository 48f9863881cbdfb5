#!/usr/bin/env bash
# local_slurm.sh - a throw-away single-node SLURM cluster on loopback, for CI and for
# trying the SLURM profile on a workstation. Debian/Ubuntu, run as root; no systemd,
# cgroups or slurmdbd. Everything it writes (config, keys, sockets, state, logs, pid
# files) lives under $LOCAL_SLURM_DIR, plus one symlink /etc/slurm/slurm.conf -> its
# config while the cluster runs (srun inside jobs finds the config only there: the
# Snakemake job step clears SLURM_* variables, SLURM_CONF included). An existing
# /etc/slurm/slurm.conf that is not this script's is never replaced: start refuses.
# /etc/munge and the system's munged (if any) are left alone: this cluster has its own
# munged socket.
#
#   local_slurm.sh install   apt-get install slurmctld slurmd slurm-client munge
#                            (a temporary policy-rc.d keeps the packages from starting daemons)
#   local_slurm.sh start     write config (one node, one fake GPU), start munged, slurmctld,
#                            slurmd from a wiped state, wait until the node takes jobs
#   local_slurm.sh stop      cancel jobs, stop the daemons this script started (pid files)
#   local_slurm.sh status    sinfo + squeue
#   local_slurm.sh env       print 'export SLURM_CONF=...' (clients must see this cluster's config)
#   local_slurm.sh run CMD.. install, start, run CMD with SLURM_CONF set, stop (also on failure)
#
# The node has the machine's cores, 85% of its memory and Gres=gpu:1 backed by /dev/null:
# jobs asking --gpus=1 run and see CUDA_VISIBLE_DEVICES=0 (there is no real GPU behind it).
set -euo pipefail

BASE=${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/wsiseg-local-slurm}
ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state MUNGE=$BASE/munge KEYS=$BASE/keys
export SLURM_CONF=$ETC/slurm.conf
SYSCONF=/etc/slurm/slurm.conf
export PATH=$PATH:/usr/sbin:/sbin
NODE=$(hostname -s)
PARTITION=${LOCAL_SLURM_PARTITION:-debug}

die() { echo "local_slurm: $*" >&2; exit 1; }

# whatever way the script ends (a failed step, die, a signal): a start that did not
# finish, or 'run', stops the daemons this script started
STARTING=0 STOP_ON_EXIT=0
on_exit() {
  if [ "$STARTING" = 1 ]; then echo "local_slurm: start failed, stopping what was started" >&2; fi
  if [ "$STARTING" = 1 ] || [ "$STOP_ON_EXIT" = 1 ]; then cmd_stop; fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

cmd_install() {
  [ "$(id -u)" = 0 ] || die "must run as root (apt-get, daemons)"
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    echo "local_slurm: slurm and munge already installed"; return 0
  fi
  command -v apt-get >/dev/null || die "apt-get not found: install slurmctld slurmd slurm-client munge by hand"
  apt-get update -q
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # keep maintainer scripts from starting daemons
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge || rc=$?
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  return $rc
}

write_config() {
  rm -rf "$STATE" "$LOG" "$ETC"       # fresh controller state every start: no stale jobs or DRAIN
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/d"
  # slurmd -C prints the detected topology; keep it, minus the name and memory
  local hw realmem
  hw=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //; s/ ?RealMemory=[0-9]+//')
  realmem=$(( $(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo) * 85 / 100 ))
  cat > "$ETC/slurm.conf" <<EOF
# written by scripts/local_slurm.sh: single node on loopback, no accounting database
ClusterName=wsiseg-ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE/munge.sock
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=${LOCAL_SLURM_CTLD_PORT:-6817}
SlurmdPort=${LOCAL_SLURM_D_PORT:-6818}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job that does not say how much memory it needs takes the whole node
DefMemPerCPU=256
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
# finished jobs stay visible to 'squeue --states=all' (the plugin's status source
# without slurmdbd) for an hour: far more than three status-check intervals
MinJobAge=3600
ReturnToService=2
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 $hw RealMemory=$realmem Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # a fake GPU: a GRES backed by /dev/null, no NVML autodetection
  cat > "$ETC/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
EOF
  mkdir -p /etc/slurm
  ln -sfn "$ETC/slurm.conf" "$SYSCONF"
}

ours_sysconf() { [ -L "$SYSCONF" ] && [ "$(readlink "$SYSCONF")" = "$ETC/slurm.conf" ]; }

pid_alive() {   # pid_alive <pidfile> <comm>
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ]
}

pid_dead() { [ -s "$1" ] && ! pid_alive "$1" "$2"; }   # started (pid file written) and gone

stop_pidfile() {   # stop_pidfile <pidfile> <comm>: only the process named in our own pid file
  local pf=$1 comm=$2 pid
  if pid_alive "$pf" "$comm"; then
    pid=$(cat "$pf")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    echo "local_slurm: stopped $comm ($pid)"
  fi
  rm -f "$pf"
}

cmd_stop() {
  if pid_alive "$RUN/slurmctld.pid" slurmctld; then
    scancel --full --user="$(id -un)" 2>/dev/null || true
    sleep 1
  fi
  stop_pidfile "$RUN/slurmd.pid" slurmd
  stop_pidfile "$RUN/slurmctld.pid" slurmctld
  stop_pidfile "$MUNGE/munged.pid" munged
  if ours_sysconf; then rm -f "$SYSCONF"; fi
}

start_munge() {
  mkdir -p "$MUNGE" "$KEYS"
  chmod 0755 "$MUNGE"; chmod 0700 "$KEYS"     # socket dir must be world-searchable
  [ -s "$KEYS/munge.key" ] || mungekey --create --keyfile="$KEYS/munge.key"
  chmod 0400 "$KEYS/munge.key"
  munged --socket="$MUNGE/munge.sock" --key-file="$KEYS/munge.key" --pid-file="$MUNGE/munged.pid" \
    --log-file="$LOG/munged.log" --seed-file="$KEYS/munged.seed"
  for _ in $(seq 50); do
    munge -S "$MUNGE/munge.sock" -n 2>/dev/null | unmunge -S "$MUNGE/munge.sock" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "munged did not answer (see $LOG/munged.log)"
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  command -v slurmctld >/dev/null || die "slurm is not installed: run '$0 install' first"
  if [ -e "$SYSCONF" ] && ! ours_sysconf; then
    die "$SYSCONF exists and is not this script's: this machine has a SLURM of its own; not touching it"
  fi
  cmd_stop >/dev/null                     # idempotent: a previous start of ours is stopped first
  STARTING=1
  write_config
  start_munge
  slurmctld -f "$SLURM_CONF"              # both daemonise and write their pid files in $RUN
  slurmd -f "$SLURM_CONF"
  local st="" deadline=$((SECONDS + 60))
  while [ $SECONDS -lt $deadline ]; do
    if pid_dead "$RUN/slurmctld.pid" slurmctld || pid_dead "$RUN/slurmd.pid" slurmd; then st="a daemon died"; break; fi
    st=$(timeout 5 sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true)
    case "$st" in idle|mix|alloc) break ;; esac
    sleep 0.5
  done
  case "$st" in
    idle|mix|alloc) ;;
    *) echo "local_slurm: cluster not ready ($st); the daemons' logs say:" >&2
       tail -n 20 "$LOG"/slurm*.log >&2; false ;;
  esac
  STARTING=0
  echo "local_slurm: ready, node $NODE is $st, partition '$PARTITION'; clients need: export SLURM_CONF=$SLURM_CONF"
}

cmd_status() { sinfo; squeue --states=all; }
cmd_env() { echo "export SLURM_CONF=$SLURM_CONF"; }

cmd_run() {
  [ $# -gt 0 ] || die "usage: $0 run COMMAND [ARGS...]"
  STOP_ON_EXIT=1
  cmd_install
  cmd_start
  "$@"
}

case "${1:-}" in
  install|start|stop|status|env) "cmd_$1" ;;
  run) shift; cmd_run "$@" ;;
  *) echo "usage: $0 {install|start|stop|status|env|run CMD...}" >&2; exit 2 ;;
esac
