#!/usr/bin/env bash
# `make demo`: local cluster, CRDs and chart, the operator (out of cluster, as
# the chart's ServiceAccount, in the background), every example, then
# `kubectl get mlplane -A`. `make cluster-down` stops it all.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export KUBECONFIG=$root/.cluster/kubeconfig
export PATH=${MLPLANE_BIN_CACHE:-$HOME/.cache/mlplane/bin}/current:$PATH
tests/cluster/up.sh
if [[ -f .cluster/operator.pid ]] && kill -0 "$(cat .cluster/operator.pid)" 2>/dev/null; then
  echo "operator already running (pid $(cat .cluster/operator.pid))"
else
  nohup hack/run-local.sh --metrics-addr 127.0.0.1:8080 > .cluster/operator.log 2>&1 &
  echo $! > .cluster/operator.pid
  echo "operator started (pid $!, log .cluster/operator.log, metrics http://127.0.0.1:8080/metrics)"
  for _ in $(seq 1 120); do
    curl -fs 127.0.0.1:8080/readyz >/dev/null 2>&1 && break
    sleep 1
  done
fi
kubectl apply --server-side -f manifests/examples/workspace.yaml
kubectl wait --for=condition=Ready workspace --all --timeout=60s
kubectl apply --server-side -f manifests/examples/
echo
kubectl get mlplane -A
