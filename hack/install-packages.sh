#!/usr/bin/env bash
# Installs the Debian packages a group of targets needs, once: install-packages.sh <group>...
#   images      buildah and podman (build and run the images), runc and crun (the runtimes the
#               image tests run them under), mmdebstrap (the local Debian base)
#   node        a real node: containerd, runc, the CNI plugins (bridge, host-local, loopback),
#               iptables, and buildah (builds the local pause image)
#   prometheus  Debian's Prometheus server
# Packages already installed are left alone, so a second run asks the network for nothing. Needs
# root (or sudo): these are system packages.
set -euo pipefail
declare -A groups=(
  [images]="buildah podman runc crun mmdebstrap"
  [node]="containerd runc containernetworking-plugins iptables buildah"
  [prometheus]="prometheus"
)
wanted=()
for group in "$@"; do
  [ -n "${groups[$group]:-}" ] || { echo "install-packages.sh: unknown group $group" >&2; exit 2; }
  for pkg in ${groups[$group]}; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || wanted+=("$pkg")
  done
done
[ ${#wanted[@]} -eq 0 ] && exit 0
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo -n)
echo "installing Debian packages: ${wanted[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Recommends stay out: prometheus would bring node-exporter, podman a rootless network stack.
if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${wanted[@]}" >&2; then
  "${sudo[@]}" apt-get update -q >&2
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${wanted[@]}" >&2
fi
