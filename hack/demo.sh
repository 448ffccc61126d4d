#!/usr/bin/env bash
# `make demo`: local cluster, CRDs and chart, the operator (out of cluster, as
# the chart's ServiceAccount, in the background), every example, then
# `kubectl get mlplane -A`. `make cluster-down` stops it all (and the demo's
# tracking server).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export KUBECONFIG=$root/.cluster/kubeconfig
export PATH=${MLPLANE_BIN_CACHE:-$HOME/.cache/mlplane/bin}/current:$PATH
tests/cluster/up.sh
# Gateway API CRDs, so the example ModelDeployment's traffic split is routed
# (the operator looks for them when it starts).
kubectl apply --server-side -f "$(tests/cluster/gateway-api.sh)" >/dev/null
# The run history store (DataAsset versions, the Pipeline step cache, run
# metrics): `mlplane tracking` on SQLite in .cluster/, without authentication
# and on 127.0.0.1 only (the chart runs it with authentication in-cluster).
if [[ -f .cluster/tracking.pid ]] && kill -0 "$(cat .cluster/tracking.pid)" 2>/dev/null; then
  echo "tracking server already running (pid $(cat .cluster/tracking.pid))"
else
  cargo build -q -p mlplane
  nohup target/debug/mlplane tracking --addr 127.0.0.1:5000 \
    --database-url "sqlite://$root/.cluster/demo-tracking.db?mode=rwc" \
    --artifact-root "$root/.cluster/demo-artifacts" > .cluster/tracking.log 2>&1 &
  echo $! > .cluster/tracking.pid
  echo "tracking server starting (pid $!, log .cluster/tracking.log, http://127.0.0.1:5000)"
fi
export MLPLANE_TRACKING_URL=http://127.0.0.1:5000
if [[ -f .cluster/operator.pid ]] && kill -0 "$(cat .cluster/operator.pid)" 2>/dev/null; then
  echo "operator already running (pid $(cat .cluster/operator.pid))"
else
  MLPLANE_METRICS_ADDR=127.0.0.1:8080 nohup hack/run-local.sh > .cluster/operator.log 2>&1 &
  pid=$!
  echo $pid > .cluster/operator.pid
  echo "operator starting (pid $pid, log .cluster/operator.log, metrics http://127.0.0.1:8080/metrics)"
  until curl -fs 127.0.0.1:8080/readyz >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the operator exited:" >&2; tail -20 .cluster/operator.log >&2; exit 1
    fi
    sleep 1
  done
fi
kubectl apply --server-side -f manifests/examples/workspace.yaml
kubectl wait --for=condition=Ready workspace --all --timeout=60s
kubectl apply --server-side -f manifests/examples/
echo
kubectl get mlplane -A
