#!/usr/bin/env bash
# Stops the local control plane and removes its state (.cluster/).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
state=$root/.cluster
name=${MLPLANE_CLUSTER_NAME:-mlplane}
bin=${MLPLANE_BIN_CACHE:-$HOME/.cache/mlplane/bin}/current
export KWOK_WORKDIR=$state/kwok
if [[ -x $bin/kwokctl ]] && [[ -d $KWOK_WORKDIR ]]; then
  PATH=$bin:$PATH kwokctl delete cluster --name "$name" >/dev/null 2>&1 || true
fi
# Whatever kwokctl could not stop (e.g. after a crash) goes by its pid files.
if [[ -d $KWOK_WORKDIR ]]; then
  find "$KWOK_WORKDIR" -name '*.pid' -print0 2>/dev/null | while IFS= read -r -d '' f; do
    kill "$(cat "$f")" 2>/dev/null || true
  done
fi
# MinIO servers of the object-store tests keep their data under .cluster/;
# the ones started by shared test fixtures (statics, never dropped) outlive
# their test process and go here.
pkill -f "minio server .*$state/minio-" 2>/dev/null || true
rm -rf "$state"
echo "local cluster '$name' stopped and its state removed"
