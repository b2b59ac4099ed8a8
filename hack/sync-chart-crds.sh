#!/usr/bin/env bash
# Copies the CRDs (crds/*.yaml, the source of truth) into the Helm chart's crds/ folder, byte for
# byte. Helm installs charts/edpilot/crds/ before the templates and never upgrades or deletes them,
# so after changing a CRD run this script and apply the CRDs yourself on existing clusters:
#   kubectl apply --server-side -f crds/
# tests/chart/test_chart.py fails when the two copies differ.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=$repo/charts/edpilot/crds
mkdir -p "$dest"
for f in "$repo"/crds/*.yaml; do
  cp "$f" "$dest/$(basename "$f")"
done
# Chart-only CRDs (kopf's peering kinds) stay; a CRD removed from crds/ is removed here too.
for f in "$dest"/*.yaml; do
  name=$(basename "$f")
  [ "$name" = kopf-peerings.yaml ] || [ -f "$repo/crds/$name" ] || rm "$f"
done
echo "synced $(ls "$repo"/crds/*.yaml | wc -l) CRDs into $dest" >&2
