#!/usr/bin/env bash
# Adds one real node to the local control plane that cluster-up.sh started (CLUSTER_DIR): containerd
# with runc and a CNI bridge, a kubelet built from the pinned Kubernetes (build-tools.sh node), and
# gpu-device-plugin advertising GPUS simulated nvidia.com/gpu devices whose IDs are the UUIDs
# edpilot's simulated backend gives that node. Registry images cannot be pulled here: the pod
# sandbox image is built locally (pause, with buildah), and IMAGES (docker-archive files, space
# separated) are imported into containerd. Needs root. Usage: real-node.sh <node-name>
# Pods reach the API server as in-cluster clients do (the `kubernetes` Service). Prints the kubelet's
# pod-resources socket as its last line; cluster-down.sh stops it all.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
dir=$(cd "${CLUSTER_DIR:-$repo/.cluster}" && pwd)
node=${1:?usage: real-node.sh <node-name>}
gpus=${GPUS:-8}
state=$dir/node-$node
[ "$(id -u)" = 0 ] || { echo "real-node.sh: a kubelet and containerd need root" >&2; exit 1; }
[ -f "$dir/kubeconfig" ] || { echo "real-node.sh: no control plane in $dir (run cluster-up.sh)" >&2; exit 1; }
"$here/install-packages.sh" node
bin=$("$here/build-tools.sh" node | tail -n1)
kubectl=("$bin/kubectl" --kubeconfig "$dir/kubeconfig")
mkdir -p "$state"/{containerd,cni,kubelet} "$dir"/{pids,logs}

launch() { # as cluster-up.sh: background, by pid, logs in logs/<name>.log
  local name=$1; shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$dir/pids/$name.pid"
}
wait_for() { # wait_for <what> <seconds> <command...>
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "real-node.sh: timed out waiting for $what" >&2; exit 1; }
    sleep 0.5
  done
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# containerd, its CRI plugin on runc with cgroupfs (the kubelet's driver here). AppArmor is off: this
# kernel has none, and runc fails to start a sandbox that asks for a profile. OOM scores are
# restricted to the caller's: the sandbox's -998 is refused in an unprivileged VM.
sock=$state/containerd/containerd.sock
cat >"$state/containerd/config.toml" <<TOML
version = 2
root = "$state/containerd/root"
state = "$state/containerd/state"
[grpc]
  address = "$sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/edpilot/pause:local"
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$state/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
TOML
cat >"$state/cni/10-edpilot.conflist" <<'JSON'
{"cniVersion": "1.0.0", "name": "edpilot-local", "plugins": [
  {"type": "bridge", "bridge": "edpilot0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
JSON
# No kube-proxy runs here. The one Service pods need is `kubernetes` (in-cluster configuration), and
# its endpoint is the API server's loopback address: one DNAT rule from the pods' bridge does what
# kube-proxy's rule for it would. A loopback destination from a non-loopback interface needs
# route_localnet on that interface, so the bridge is made here (the CNI plugin takes it as is).
# cluster-down.sh removes the chain and the bridge.
server=$("${kubectl[@]}" config view --minify -o jsonpath='{.clusters[0].cluster.server}')
service=$("${kubectl[@]}" get service kubernetes -n default -o jsonpath='{.spec.clusterIP}:{.spec.ports[0].port}')
chain=EDPILOT-API
ip link show edpilot0 >/dev/null 2>&1 || ip link add edpilot0 type bridge
ip link set edpilot0 up
sysctl -qw net.ipv4.conf.edpilot0.route_localnet=1
iptables -t nat -N "$chain" 2>/dev/null || iptables -t nat -F "$chain"
iptables -t nat -A "$chain" -p tcp -d "${service%:*}" --dport "${service##*:}" -j DNAT --to-destination "${server#https://}"
iptables -t nat -C PREROUTING -i edpilot0 -j "$chain" 2>/dev/null || iptables -t nat -A PREROUTING -i edpilot0 -j "$chain"

launch "containerd-$node" containerd --config "$state/containerd/config.toml"
wait_for "containerd" 60 ctr --address "$sock" version

# The sandbox image: pause, built here (registries are out of reach).
archive=$state/pause.tar
export CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF:-$state/storage.conf}
[ -f "$CONTAINERS_STORAGE_CONF" ] || printf '[storage]\ndriver = "vfs"\ngraphroot = "%s"\nrunroot = "%s"\n' \
  "$state/buildah" "$state/buildah-run" >"$CONTAINERS_STORAGE_CONF"
ctr_id=$(buildah from scratch)
buildah copy "$ctr_id" "$bin/pause" /pause >/dev/null
buildah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr_id"
buildah commit -q "$ctr_id" localhost/edpilot/pause:local >/dev/null
buildah rm "$ctr_id" >/dev/null
rm -f "$archive"
buildah push -q localhost/edpilot/pause:local "docker-archive:$archive:localhost/edpilot/pause:local"
for image in "$archive" ${IMAGES:-}; do
  ctr --address "$sock" -n k8s.io images import "$image" >&2
done

# The kubelet: the admin kubeconfig (this control plane has no client-certificate authority for a
# node identity), cgroup v1 allowed (this machine's controllers are v1; v1.36 refuses it by
# default), swap allowed, its own ports, the node's first non-loopback address (the kubelet
# refuses a loopback node IP).
ip=$(hostname -I | awk '{print $1}')
cat >"$state/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$sock
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
address: 127.0.0.1
port: $(free_port)
healthzPort: $(free_port)
readOnlyPort: 0
enforceNodeAllocatable: []
localStorageCapacityIsolation: false
evictionHard: {}
imageGCHighThresholdPercent: 100
resolvConf: ""
YAML
# The kubelet's device-plugin directory is fixed (/var/lib/kubelet/device-plugins), whatever its
# root: a socket a previous kubelet left there must not be taken for this one's.
plugins=/var/lib/kubelet/device-plugins
rm -f "$plugins/kubelet.sock"
launch "kubelet-$node" "$bin/kubelet" --config "$state/kubelet/config.yaml" --kubeconfig "$dir/kubeconfig" \
  --root-dir "$state/kubelet" --hostname-override "$node" --node-ip "$ip" -v 1 \
  --node-labels nvidia.com/gpu.present=true
wait_for "the kubelet's device-plugin socket" 120 test -S "$plugins/kubelet.sock"
launch "gpu-device-plugin-$node" "$bin/gpu-device-plugin" --plugin-dir "$plugins" --node-name "$node" --gpus "$gpus"
wait_for "node $node to be Ready" 120 "${kubectl[@]}" wait --for=condition=Ready --timeout=2s "node/$node"
wait_for "$gpus nvidia.com/gpu on $node" 60 \
  bash -c "[ \"\$(${kubectl[*]} get node $node -o jsonpath='{.status.allocatable.nvidia\\.com/gpu}')\" = $gpus ]"
echo "$state/kubelet/pod-resources/kubelet.sock"
