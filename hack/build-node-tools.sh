#!/usr/bin/env bash
# Builds what a real local node needs beside the control plane: the kubelet from the pinned
# Kubernetes module, gpu-device-plugin (advertises simulated nvidia.com/gpu devices) and pause
# (the pod sandbox's process), all from hack/tools/kube, into a cache keyed like build-tools.sh's.
# Prints the binary directory as its last line. Only the opt-in real-node tests need these.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
key=$(cat "$here/versions.env" "$here"/tools/kube/go.mod "$here"/tools/kube/go.sum "$here"/tools/kube/*/main.go \
  "$here/build-node-tools.sh" | sha256sum | cut -c1-16)
bin=${EDPILOT_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edpilot/bin}/node-$key
mkdir -p "$bin"
export GOFLAGS=-mod=mod CGO_ENABLED=0

build() { # build <output name> <package> [ldflags]
  local name=$1 pkg=$2 ldflags=${3:-}
  if [ -x "$bin/$name" ]; then return 0; fi
  echo "building $name ($pkg)" >&2
  local start=$SECONDS
  (cd "$here/tools/kube" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$name.tmp" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
  echo "built $name in $((SECONDS - start)) s" >&2
}

minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
build kubelet k8s.io/kubernetes/cmd/kubelet \
  "-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
build gpu-device-plugin ./gpu-device-plugin
build pause ./pause
echo "$bin"
