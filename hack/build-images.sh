#!/usr/bin/env bash
# Builds edpilot's images here, without a Docker engine or a registry: buildah builds
# docker/operator.Dockerfile and docker/agent.Dockerfile from a Debian bookworm base that mmdebstrap
# makes from the Debian archive (image registries may be unreachable; python:3.12 and nvidia/cuda
# cannot be pulled then). Tags: localhost/edpilot/edpilot:dev and localhost/edpilot/edpilot-agent:dev
# (IMAGE_TAG overrides dev).
#
# Everything is cached under ~/.cache/edpilot/images (EDPILOT_IMAGE_CACHE): the base's tarball,
# keyed by what decides its contents, and the container storage, whose layers buildah reuses
# (--layers): a second build with unchanged locks reinstalls no dependency.
#
# The storage is this project's own, not the machine's default: podman, buildah and the tests use it
# through CONTAINERS_STORAGE_CONF and CONTAINERS_CONF, two files in the directory printed last:
#   dir=$(hack/build-images.sh | tail -n1)
#   CONTAINERS_STORAGE_CONF=$dir/storage.conf CONTAINERS_CONF=$dir/containers.conf podman images
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${EDPILOT_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edpilot/images}
tag=${IMAGE_TAG:-dev}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
suite=bookworm
# python3-venv: the Dockerfiles make venvs (Debian's python3 refuses pip outside one).
packages=python3,python3-venv
start=$SECONDS

"$here/install-packages.sh" images
mkdir -p "$cache"

# Storage of our own: graph root under the cache, run root (locks, mount state) on the machine's
# tmpfs, one per cache. overlay is the kernel's; vfs would copy every layer in full.
conf=$cache/storage.conf
runroot=${XDG_RUNTIME_DIR:-/run}/edpilot-images-$(id -u)-$(printf '%s' "$cache" | sha256sum | cut -c1-8)
cat >"$conf.tmp" <<CONF
[storage]
driver = "overlay"
graphroot = "$cache/storage"
runroot = "$runroot"
CONF
mv "$conf.tmp" "$conf"
# runc, not crun: crun 1.8 (bookworm) refuses a hybrid cgroup layout whose cgroup2 mount holds any
# controller ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"), and
# machines with cgroup v1 controllers may still leave one (hugetlb) on cgroup2. cgroupfs: no
# systemd runs here to delegate cgroups to; events to a file for the same reason. Limits: podman
# would raise open files to 1048576 and keeps its own processes at 32768, which a root without
# CAP_SYS_RESOURCE (a sandbox's) may not exceed; containers get the machine's open-file limit and
# 4096 processes.
cat >"$cache/containers.conf.tmp" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
mv "$cache/containers.conf.tmp" "$cache/containers.conf"
export CONTAINERS_STORAGE_CONF=$conf CONTAINERS_CONF=$cache/containers.conf

# The base: its key is everything that decides its contents but the archive's own updates (run with
# EDPILOT_BASE_REFRESH=1, or delete the tarball, to take those).
key=$(printf '%s\n' "$suite" "$packages" "$mirror" "$security" "v1" | sha256sum | cut -c1-12)
base_tar=$cache/debian-$suite-$key.tar
base=localhost/edpilot/debian-python:$suite-$key
if [ ! -s "$base_tar" ] || [ "${EDPILOT_BASE_REFRESH:-}" = 1 ]; then
  echo "making the Debian $suite base with mmdebstrap ($packages)" >&2
  # Documentation, manual pages and translations are of no use in a container image.
  mmdebstrap --mode=root --format=tar --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --aptopt='Acquire::Retries "3"' \
    "$suite" "$base_tar.tmp" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security $suite-security main" >&2
  mv "$base_tar.tmp" "$base_tar"
  podman image rm -f "$base" >/dev/null 2>&1 || true
fi
if ! podman image exists "$base"; then
  podman import --quiet --change 'CMD ["/bin/bash"]' "$base_tar" "$base" >/dev/null
fi

# --network host: the build stage downloads the locked wheels from PyPI, and the machine may have
# no bridge networking for build containers. --pull=never: every base is already here.
# A machine behind a TLS-intercepting proxy tells pip its CA (PIP_CERT or pip's own configuration);
# the build stage gets the same file as a secret, which no layer keeps.
ca=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
secret=()
[ -n "$ca" ] && [ -s "$ca" ] && secret=(--secret "id=pip-ca,src=$ca")
build() { # build <dockerfile> <image>
  echo "building $2 from docker/$1" >&2
  buildah build --quiet --layers --network host --pull=never "${secret[@]}" \
    --build-arg "PYTHON_IMAGE=$base" --build-arg "AGENT_BASE_IMAGE=$base" \
    -f "$repo/docker/$1" -t "$2" "$repo" >/dev/null
}
build operator.Dockerfile "localhost/edpilot/edpilot:$tag"
build agent.Dockerfile "localhost/edpilot/edpilot-agent:$tag"
echo "images built in $((SECONDS - start)) s: localhost/edpilot/edpilot:$tag localhost/edpilot/edpilot-agent:$tag" >&2
echo "$cache"
