#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and helm
# from the pinned Go modules in hack/tools/ into a cache keyed by their versions, go.sum files, the
# programs written here and this script (its build flags decide what a binary prints and assumes),
# so a second run builds nothing. With `node`, also what a real node needs (hack/real-node.sh): the
# kubelet, gpu-device-plugin and pause. Prints the binary directory as its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
key=$(cat "$here"/versions.env "$here"/tools/*/go.mod "$here"/tools/*/go.sum "$here"/tools/kube/*/main.go \
  "$here/build-tools.sh" | sha256sum | cut -c1-16)
bin=${EDPILOT_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edpilot/bin}/$key
mkdir -p "$bin"
export GOFLAGS=-mod=mod CGO_ENABLED=0

build() { # build <module dir> <output name> <package> [ldflags]
  local dir=$1 name=$2 pkg=$3 ldflags=${4:-}
  if [ -x "$bin/$name" ]; then return 0; fi
  echo "building $name ($pkg)" >&2
  local start=$SECONDS
  (cd "$here/tools/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$name.tmp" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
  echo "built $name in $((SECONDS - start)) s" >&2
}

minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
kube_ld="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
build etcd etcd go.etcd.io/etcd/server/v3
build kwok kwok sigs.k8s.io/kwok/cmd/kwok
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build kube "$cmd" "k8s.io/kubernetes/cmd/$cmd" "$kube_ld"
done
if [ "${1:-}" = node ]; then
  build kube kubelet k8s.io/kubernetes/cmd/kubelet "$kube_ld"
  build kube gpu-device-plugin ./gpu-device-plugin
  build kube pause ./pause
fi
# Stamped as helm's own Makefile stamps a release (v3.22.0: version, tag metadata, tree state, and
# the Kubernetes version helm assumes without a cluster: one major above client-go's v0.N, so v1.N).
# Unstamped, helm assumes v1.20 and refuses to template a chart that needs a newer one. The module
# zip has no git history, so the commit stays empty.
helm_ld() {
  local client_go major minor
  client_go=$(cd "$here/tools/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)
  client_go=${client_go#v}
  major=$((${client_go%%.*} + 1))
  minor=${client_go#*.}; minor=${minor%%.*}
  local v=helm.sh/helm/v3/internal/version
  echo "-X $v.version=$HELM_VERSION -X $v.metadata= -X $v.gitTreeState=clean" \
    "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$major -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor" \
    "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$major -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
}
[ -x "$bin/helm" ] || build helm helm helm.sh/helm/v3/cmd/helm "$(helm_ld)"

# KWOK needs its node and pod lifecycle stages; they ship in its module source.
stages=$(cd "$here/tools/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage
if [ ! -s "$bin/kwok-stages.yaml" ]; then
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [ -f "$stages/$f" ] || { echo "missing KWOK stage $stages/$f" >&2; exit 1; }
    printf -- '---\n'; cat "$stages/$f"
  done > "$bin/kwok-stages.yaml.tmp"
  mv "$bin/kwok-stages.yaml.tmp" "$bin/kwok-stages.yaml"
fi
echo "$bin"
