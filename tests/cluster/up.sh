#!/usr/bin/env bash
# Starts the local control plane (idempotent): etcd, kube-apiserver (RBAC on),
# kube-controller-manager, kube-scheduler and the KWOK controller, run by
# kwokctl's binary runtime from the binaries build.sh made. Writes the admin
# kubeconfig to .cluster/kubeconfig and creates the default simulated nodes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
state=$root/.cluster
name=${MLPLANE_CLUSTER_NAME:-mlplane}
bin=$("$here/build.sh")
export PATH=$bin:$PATH
export KWOK_WORKDIR=$state/kwok
kubeconfig=$state/kubeconfig
mkdir -p "$state"

healthy() {
  [[ -f $kubeconfig ]] && kubectl --kubeconfig "$kubeconfig" --request-timeout=3s get --raw /readyz >/dev/null 2>&1
}

start=$SECONDS
if healthy; then
  echo "local cluster '$name' already running; kubeconfig: $kubeconfig"
  exit 0
fi
if kwokctl get clusters 2>/dev/null | grep -qx "$name"; then
  echo "starting existing local cluster '$name'"
  kwokctl start cluster --name "$name" --timeout 2m --wait 2m
else
  sed -e "s|@BIN@|$bin|g" -e "s|@HERE@|$here|g" "$here/kwok.yaml" > "$state/kwokctl.yaml"
  kwokctl create cluster --name "$name" --config "$state/kwokctl.yaml" \
    --kubeconfig "$kubeconfig" --timeout 3m --wait 2m
fi
kwokctl get kubeconfig --name "$name" > "$kubeconfig.tmp" && mv "$kubeconfig.tmp" "$kubeconfig"
chmod 600 "$kubeconfig"
until healthy; do
  if (( SECONDS - start > 120 )); then echo "kube-apiserver not ready after 120s" >&2; exit 1; fi
  sleep 1
done
kubectl --kubeconfig "$kubeconfig" apply --server-side -f "$here/nodes.yaml" >/dev/null
kubectl --kubeconfig "$kubeconfig" wait --for=condition=Ready node --all --timeout=60s >/dev/null
echo "local cluster '$name' ready in $((SECONDS - start))s; kubeconfig: $kubeconfig"
echo "  export KUBECONFIG=$kubeconfig PATH=$bin:\$PATH"
