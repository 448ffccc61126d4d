#!/usr/bin/env bash
# Fetches the Gateway API CRDs (standard channel) from the published Go module
# sigs.k8s.io/gateway-api at the version pinned in versions.env (checksums
# verified by the Go module mirror and sum database), into a cache outside
# the repository: ${MLPLANE_CACHE:-~/.cache/mlplane}/gateway-api-<version>/.
# A second run reuses it. Prints the directory (CRD YAML files only; the
# module's ValidatingAdmissionPolicy is left out: tests share one cluster).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${MLPLANE_CACHE:-$HOME/.cache/mlplane}
out=$cache/gateway-api-$GATEWAY_API_VERSION
if [[ -f $out/.complete ]]; then
  echo "$out"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Outside any module, so no go.mod around us changes what is resolved.
dir=$(cd "$tmp" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [[ -z $dir || ! -d $dir/config/crd/standard ]]; then
  echo "gateway-api.sh: go mod download sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION gave no CRDs" >&2
  exit 1
fi
mkdir -p "$out"
for f in "$dir"/config/crd/standard/gateway.networking.k8s.io_*.yaml; do
  case $f in *_vap_*) continue ;; esac
  cp "$f" "$out/"
done
chmod -R u+w "$out"
touch "$out/.complete"
echo "gateway-api.sh: Gateway API $GATEWAY_API_VERSION CRDs in $out" >&2
echo "$out"
