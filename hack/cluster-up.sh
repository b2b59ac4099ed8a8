#!/usr/bin/env bash
# Starts a real Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC on),
# kube-controller-manager, kube-scheduler and KWOK, then creates NODES simulated GPU nodes
# with GPUS nvidia.com/gpu each. State lives in CLUSTER_DIR (default .cluster/); the admin
# kubeconfig is CLUSTER_DIR/kubeconfig. Returns when the API is ready and the nodes are Ready.
#
# Dynamic Resource Allocation needs nothing switched on: Kubernetes v1.36 serves resource.k8s.io/v1
# and runs the scheduler's DRA plugin and the resource-claim controller by default, so ResourceSlices
# published for the KWOK nodes are allocated by the real scheduler (tests/e2e/test_dra_e2e.py).
#
# Environment: NODES (2), GPUS (8), CLUSTER_DIR (.cluster), EXTENDER_URL (optional: wire
# a scheduler extender at this URL into kube-scheduler, ignorable, for nvidia.com/gpu) and
# EXTENDER_TLS_DIR (with an https URL: client.crt, client.key and ca.crt for its tlsConfig).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
dir=$(mkdir -p "${CLUSTER_DIR:-$repo/.cluster}" && cd "${CLUSTER_DIR:-$repo/.cluster}" && pwd)
nodes=${NODES:-2}
gpus=${GPUS:-8}
start=$SECONDS

if [ -f "$dir/kubeconfig" ] && [ -d "$dir/pids" ] && compgen -G "$dir/pids/*.pid" >/dev/null; then
  echo "a cluster is already running from $dir; run hack/cluster-down.sh first" >&2
  exit 1
fi
bin=$("$here/build-tools.sh" | tail -n1)
mkdir -p "$dir"/{pids,logs,pki,etcd}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
launch() { # launch <name> <command...>: background, by pid, logs in logs/<name>.log
  local name=$1; shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$dir/pids/$name.pid"
}
fail() {
  echo "cluster-up: $1" >&2
  [ -n "${2:-}" ] && { echo "--- last lines of $dir/logs/$2.log" >&2; tail -n 30 "$dir/logs/$2.log" >&2 || true; }
  "$here/cluster-down.sh" --keep-logs >/dev/null 2>&1 || true
  exit 1
}
alive() { kill -0 "$(cat "$dir/pids/$1.pid")" 2>/dev/null; }
wait_for() { # wait_for <what> <component> <seconds> <command...>
  local what=$1 comp=$2 limit=$3; shift 3
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    alive "$comp" || fail "$comp exited while waiting for $what" "$comp"
    [ $SECONDS -lt $deadline ] || fail "timed out after ${limit}s waiting for $what" "$comp"
    sleep 0.5
  done
}

etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port)
kcm_port=$(free_port); sched_port=$(free_port); kwok_port=$(free_port)
server="https://127.0.0.1:$api_port"

# Identities: the service-account signing key pair and an admin token in system:masters.
openssl genrsa -out "$dir/pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$dir/pki/sa.key" -pubout -out "$dir/pki/sa.pub" 2>/dev/null
admin_token=$(openssl rand -hex 24)
echo "$admin_token,edpilot-admin,edpilot-admin,\"system:masters\"" >"$dir/pki/tokens.csv"

# The API server's identity: a CA of this cluster signs its serving certificate for the loopback
# names clients dial, and the kubeconfig carries the CA, so every client verifies the server
# instead of skipping verification. Key usages are explicit: strict verifiers require them.
pki() { "$@" 2>>"$dir/logs/pki.log" || fail "openssl could not make the cluster's certificates" pki; }
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
pki openssl req -x509 "${ec[@]}" -days 365 -keyout "$dir/pki/ca.key" -out "$dir/pki/ca.crt" \
  -subj "/CN=edpilot-local-ca" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"
pki openssl req "${ec[@]}" -keyout "$dir/pki/apiserver.key" -out "$dir/pki/apiserver.csr" -subj "/CN=kube-apiserver"
pki openssl x509 -req -in "$dir/pki/apiserver.csr" -CA "$dir/pki/ca.crt" -CAkey "$dir/pki/ca.key" \
  -CAcreateserial -days 365 -out "$dir/pki/apiserver.crt" -extfile <(printf '%s\n' \
    "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc" \
    "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid")

launch etcd "$bin/etcd" --data-dir "$dir/etcd" --name edpilot-test \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "edpilot-test=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --log-level warn
wait_for "etcd health" etcd 60 curl -sf "http://127.0.0.1:$etcd_port/health"

launch kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
  --authorization-mode Node,RBAC --token-auth-file "$dir/pki/tokens.csv" --allow-privileged=true \
  --service-cluster-ip-range 10.0.0.0/24 \
  --service-account-issuer "https://127.0.0.1:$api_port" --service-account-key-file "$dir/pki/sa.pub" \
  --service-account-signing-key-file "$dir/pki/sa.key" --api-audiences "https://127.0.0.1:$api_port" \
  --endpoint-reconciler-type none --profiling=false -v 1

cat >"$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: edpilot-local
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$dir/pki/ca.crt")
users:
- name: edpilot-admin
  user:
    token: $admin_token
contexts:
- name: edpilot-local
  context: {cluster: edpilot-local, user: edpilot-admin}
current-context: edpilot-local
KUBECONFIG
export KUBECONFIG="$dir/kubeconfig"
kubectl=("$bin/kubectl" --kubeconfig "$dir/kubeconfig")
wait_for "kube-apiserver /readyz" kube-apiserver 120 "${kubectl[@]}" get --raw /readyz

launch kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$dir/kubeconfig" \
  --authentication-kubeconfig "$dir/kubeconfig" --authorization-kubeconfig "$dir/kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
  --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
  --use-service-account-credentials=false --controllers '*,-nodeipam,-cloud-node-lifecycle' \
  --node-monitor-grace-period 40s -v 1

extenders=""
if [ -n "${EXTENDER_URL:-}" ]; then
  extenders="extenders:
- urlPrefix: ${EXTENDER_URL%/}
  filterVerb: filter
  prioritizeVerb: prioritize
  weight: 5
  nodeCacheCapable: true
  ignorable: true
  httpTimeout: 5s
  managedResources:
  - name: nvidia.com/gpu
    ignoredByScheduler: false"
  if [ -n "${EXTENDER_TLS_DIR:-}" ]; then
    extenders="$extenders
  tlsConfig:
    certFile: $EXTENDER_TLS_DIR/client.crt
    keyFile: $EXTENDER_TLS_DIR/client.key
    caFile: $EXTENDER_TLS_DIR/ca.crt"
  fi
fi
cat >"$dir/scheduler.yaml" <<SCHED
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: $dir/kubeconfig
leaderElection:
  leaderElect: false
$extenders
SCHED
launch kube-scheduler "$bin/kube-scheduler" --config "$dir/scheduler.yaml" \
  --authentication-kubeconfig "$dir/kubeconfig" --authorization-kubeconfig "$dir/kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$sched_port" -v 1

launch kwok "$bin/kwok" --kubeconfig "$dir/kubeconfig" --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake --node-ip 127.0.0.1 \
  --server-address "127.0.0.1:$kwok_port" --node-lease-duration-seconds 40 -c "$bin/kwok-stages.yaml"

# The default namespace's ServiceAccount appears once the controller-manager runs.
wait_for "the default ServiceAccount" kube-controller-manager 60 "${kubectl[@]}" get serviceaccount default

if [ "$nodes" -gt 0 ]; then
  "$here/gpu-nodes.sh" "$nodes" "$gpus" | "${kubectl[@]}" apply -f - >/dev/null
  wait_for "$nodes Ready KWOK nodes" kwok 60 bash -c \
    "[ \$(\"$bin/kubectl\" --kubeconfig \"$dir/kubeconfig\" get nodes -l type=kwok --no-headers 2>/dev/null | grep -cw Ready) -ge $nodes ]"
fi
echo "control plane ready in $((SECONDS - start)) s (kube $("$bin/kube-apiserver" --version | awk '{print $2}'), $nodes GPU nodes x $gpus GPUs)" >&2
echo "export KUBECONFIG=$dir/kubeconfig"
