#!/usr/bin/env bash
# `make run`: runs the operator out of cluster against $KUBECONFIG, but
# authenticated only as the chart's ServiceAccount (a TokenRequest token), so
# it has exactly the RBAC the chart grants. Installs CRDs and chart first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ns=${MLPLANE_NAMESPACE:-mlplane-system}
release=${MLPLANE_RELEASE:-mlplane}
sa=${MLPLANE_SERVICE_ACCOUNT:-mlplane}
: "${KUBECONFIG:?KUBECONFIG must point at the cluster (make cluster writes .cluster/kubeconfig)}"

kubectl apply --server-side --force-conflicts -f "$root/crds/" >/dev/null
helm upgrade --install "$release" "$root/charts/mlplane" --namespace "$ns" --create-namespace --wait >/dev/null
token=$(kubectl create token "$sa" --namespace "$ns" --duration 24h)
server=$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.server}')
ca=$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
mkdir -p "$root/.cluster"
kc=$root/.cluster/operator-kubeconfig
umask 077
cat > "$kc" <<KC
apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster:
    server: $server
    certificate-authority-data: $ca
users:
- name: $sa
  user:
    token: $token
contexts:
- name: operator
  context: {cluster: cluster, user: $sa}
current-context: operator
KC
cargo build -q -p mlplane
echo "running the operator as system:serviceaccount:$ns:$sa (metrics on http://${MLPLANE_METRICS_ADDR:-127.0.0.1:8080}/metrics)" >&2
exec env KUBECONFIG="$kc" MLPLANE_METRICS_ADDR="${MLPLANE_METRICS_ADDR:-127.0.0.1:8080}" \
  "$root/target/debug/mlplane" run --namespace "$ns" "$@"
