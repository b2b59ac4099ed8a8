#!/usr/bin/env bash
# Stops every process cluster-up.sh started (by pid, and their process groups) and removes its
# state. --keep-logs leaves CLUSTER_DIR/logs for a post-mortem.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${CLUSTER_DIR:-$here/../.cluster}
[ -d "$dir" ] || exit 0
# A real node (real-node.sh) runs its pods' containers under containerd's shims, outside the
# process groups below: kill the containers first, the shims after containerd.
for sock in "$dir"/node-*/containerd/containerd.sock; do
  [ -S "$sock" ] || continue
  for task in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$task" 2>/dev/null
  done
done
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
if compgen -G "$dir/node-*" >/dev/null; then
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $dir/node-" 2>/dev/null
  # Sandboxes' network namespaces, shm and root filesystems stay mounted: unmount, deepest first.
  awk -v d="$dir/node-" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  ip link delete edpilot0 2>/dev/null
  iptables -t nat -D PREROUTING -i edpilot0 -j EDPILOT-API 2>/dev/null
  iptables -t nat -F EDPILOT-API 2>/dev/null && iptables -t nat -X EDPILOT-API
fi
if [ "${1:-}" = --keep-logs ]; then
  find "$dir" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
else
  rm -rf "$dir"
fi
