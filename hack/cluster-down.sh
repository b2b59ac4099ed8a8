#!/usr/bin/env bash
# Stops every process cluster-up.sh started (by pid, and their process groups) and removes its
# state. --keep-logs leaves CLUSTER_DIR/logs for a post-mortem.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${CLUSTER_DIR:-$here/../.cluster}
[ -d "$dir" ] || exit 0
for pidfile in "$dir"/pids/*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
done
for _ in $(seq 50); do
  running=0
  for pidfile in "$dir"/pids/*.pid; do
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && running=1
  done
  [ $running = 0 ] && break
  sleep 0.2
done
for pidfile in "$dir"/pids/*.pid; do
  [ -f "$pidfile" ] || continue
  kill -KILL -- "-$(cat "$pidfile")" 2>/dev/null || kill -KILL "$(cat "$pidfile")" 2>/dev/null
  rm -f "$pidfile"
done
if [ "${1:-}" = --keep-logs ]; then
  find "$dir" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
else
  rm -rf "$dir"
fi
