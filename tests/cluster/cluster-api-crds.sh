#!/usr/bin/env bash
# Prints a directory holding the MachineDeployment and Machine CRDs of the
# pinned Cluster API release (versions.env), as published in its Go module
# (sigs.k8s.io/cluster-api, config/crd/bases: core/config/crd/bases since
# v1.12). Copied into ${MLPLANE_CACHE:-~/.cache/mlplane}/crds/cluster-api-<v>/
# once; later runs reuse it. Only the tests of the clusterAPI provider use it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
out=${MLPLANE_CACHE:-$HOME/.cache/mlplane}/crds/cluster-api-$CLUSTER_API_VERSION
if [[ -f $out/.complete ]]; then echo "$out"; exit 0; fi
echo "cluster-api-crds.sh: fetching sigs.k8s.io/cluster-api@$CLUSTER_API_VERSION" >&2
# Outside any module, so no go.mod is read or written.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dir=$(cd "$work" && GOFLAGS= go mod download -json "sigs.k8s.io/cluster-api@$CLUSTER_API_VERSION" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[[ -n $dir && -d $dir ]] || { echo "cluster-api-crds.sh: go mod download gave no module directory" >&2; exit 1; }
bases=""
for b in "$dir/core/config/crd/bases" "$dir/config/crd/bases"; do
  if [[ -f $b/cluster.x-k8s.io_machinedeployments.yaml ]]; then bases=$b; break; fi
done
[[ -n $bases ]] || { echo "cluster-api-crds.sh: no CRDs under $dir" >&2; exit 1; }
tmp=$out.tmp.$$
rm -rf "$tmp" && mkdir -p "$tmp"
for kind in machinedeployments machines; do
  cp "$bases/cluster.x-k8s.io_$kind.yaml" "$tmp/"
done
touch "$tmp/.complete"
rm -rf "$out" && mkdir -p "$(dirname "$out")" && mv "$tmp" "$out"
echo "$out"
