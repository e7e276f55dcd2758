#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for testing `ulysses submit` for real (CI runs
# it): Debian's slurmctld, slurmd, slurm-client (Slurm 22.05) and munge, installed when missing,
# configured for this host and started without systemd. About 15 s from nothing, 1 s when
# installed.
#   scripts/slurm.sh start    # install, configure, start munged, slurmctld, slurmd; wait until idle
#   scripts/slurm.sh stop     # stop the three daemons (by their pid files)
#   scripts/slurm.sh status   # sinfo and squeue
# It writes /etc/slurm/slurm.conf and cgroup.conf, and refuses to touch a slurm.conf that it did
# not write (a real cluster's). State, spool, logs and pid files go under $ULYSSES_SLURM_DIR
# (default /var/lib/ulysses-slurm). Needs root (or sudo).
set -euo pipefail
state=${ULYSSES_SLURM_DIR:-/var/lib/ulysses-slurm}
conf=/etc/slurm/slurm.conf
marker="# written by ulysses scripts/slurm.sh"

say() { echo "[slurm] $*"; }
die() { echo "[slurm] error: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local limit=$1; shift
  for _ in $(seq 1 $((limit * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  return 1
}

# Sends SIGTERM to the process in pid file $1 and waits for it to go.
stop_pid() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if [ -n "$pid" ] && as_root kill "$pid" 2>/dev/null; then
    wait_for 10 bash -c "! kill -0 $pid 2>/dev/null" || as_root kill -9 "$pid" 2>/dev/null || true
  fi
  as_root rm -f "$file"
}

install() {
  local missing=()
  for p in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

configure() {
  if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
    die "$conf exists and was not written by this script (a real cluster?); not touching it"
  fi
  as_root mkdir -p /etc/slurm "$state/ctld" "$state/d" "$state/log" /etc/munge /run/munge /var/log/munge /var/lib/munge
  as_root chown munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  as_root chown munge:munge /etc/munge/munge.key
  as_root chmod 400 /etc/munge/munge.key
  local host node
  host=$(hostname -s)
  # The node as slurmd sees it: a node declared with more CPUs or memory than it has is drained.
  node=$(slurmd -C | head -n 1)
  as_root tee "$conf" >/dev/null <<EOF
$marker
ClusterName=ulysses
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
MailProg=/bin/true
ReturnToService=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
# Finished jobs stay visible to scontrol for 10 minutes (the default is 5).
MinJobAge=600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  as_root tee /etc/slurm/cgroup.conf >/dev/null <<EOF
$marker
CgroupPlugin=cgroup/v1
EOF
}

start() {
  install
  configure
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    as_root runuser -u munge -- /usr/sbin/munged
    wait_for 10 bash -c 'munge -n | unmunge | grep -q "STATUS: *Success"' || die "munged did not start"
  fi
  if ! { [ -f "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; }; then
    as_root slurmctld -i
  fi
  if ! { [ -f "$state/slurmd.pid" ] && kill -0 "$(cat "$state/slurmd.pid")" 2>/dev/null; }; then
    as_root slurmd
  fi
  if ! wait_for 30 bash -c '[ "$(sinfo -h -o %t | head -n 1)" = idle ] || [ "$(sinfo -h -o %t | head -n 1)" = mix ] || [ "$(sinfo -h -o %t | head -n 1)" = alloc ]'; then
    sinfo -N -l >&2 || true
    tail -n 20 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
    die "the node did not become idle within 30 s"
  fi
  say "ready: $(sinfo -h -o '%P %D node(s) %c CPUs %m MiB %t')"
}

stop() {
  stop_pid "$state/slurmd.pid"
  stop_pid "$state/slurmctld.pid"
  stop_pid /run/munge/munged.pid
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo; squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
