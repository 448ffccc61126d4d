#!/usr/bin/env bash
# MLflow tracking conformance: starts a fresh reference `mlflow server` (the
# pinned MLflow, SQLite backend, proxied artifacts) and a fresh mlplane
# tracking server on free loopback ports with temporary state, runs
# conformance.py against each with the same prefix, compares the normalised
# results with compare.py, stops both servers and exits with compare's status.
#
#   tests/tracking/run_conformance.sh              # reference vs mlplane
#   tests/tracking/run_conformance.sh --self-check # reference vs a second reference
#
# --self-check proves the normalisation: two independent reference servers
# must compare equal. Environment:
#   MLPLANE_BIN           mlplane binary (default: <repo>/target/debug/mlplane)
#   MLPLANE_CONFORMANCE_DATABASE_URL  mlplane's run history database (default: a fresh SQLite file)
#   CONFORMANCE_OUT_DIR   if set, keep both results and server logs there
#   CONFORMANCE_TIMEOUT   seconds to wait for a server to come up (default 120)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mode=mlplane
case "${1:-}" in
  --self-check) mode=self ;;
  "") ;;
  *) echo "usage: $0 [--self-check]" >&2; exit 2 ;;
esac

bin=${MLPLANE_BIN:-$root/target/debug/mlplane}
timeout=${CONFORMANCE_TIMEOUT:-120}
# Seconds after which conformance.py skips its remaining steps (so a hung
# server cannot stall the run). The reference mlflow server, with the other
# conformance test's servers on the same 2 cores, did 175 of 233 steps in
# 50 s in one CI run; 240 s leaves room for a loaded machine.
deadline=${CONFORMANCE_DEADLINE:-240}
python=$("$root/hack/python-env.sh")
venv_bin=$(dirname "$python")

# No telemetry, nothing from the caller's MLflow/mlplane environment.
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PYTHONDONTWRITEBYTECODE=1
unset MLFLOW_TRACKING_URI MLFLOW_EXPERIMENT_ID MLFLOW_EXPERIMENT_NAME MLFLOW_RUN_ID \
  MLFLOW_TRACKING_TOKEN MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD \
  MLPLANE_TRACKING_ADDR MLPLANE_TRACKING_DATABASE_URL MLPLANE_TRACKING_ARTIFACT_ROOT MLPLANE_TRACKING_AUTH

work=$(mktemp -d "${TMPDIR:-/tmp}/mlplane-conformance.XXXXXX")
pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do
    # each server runs in its own session: stop its whole process group
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n ${CONFORMANCE_OUT_DIR:-} ]]; then
    mkdir -p "$CONFORMANCE_OUT_DIR"
    cp -f "$work"/*.json "$work"/*.log "$CONFORMANCE_OUT_DIR"/ 2>/dev/null || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME CMD...: runs CMD in its own session, logging to $work/NAME.log
start() {
  local name=$1
  shift
  setsid "$@" >"$work/$name.log" 2>&1 </dev/null &
  pids+=("$!")
  eval "${name//-/_}_pid=$!"
}

# wait_up NAME PID URL [any]: polls URL until it answers 200 (with "any":
# until it answers at all - a missing Default experiment is for the
# comparison to report, not a reason to wait)
wait_up() {
  local name=$1 pid=$2 url=$3 any=${4:-} deadline=$((SECONDS + timeout)) code
  while :; do
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null || true)
    [[ $code == 200 || (-n $any && $code =~ ^[1-5][0-9][0-9]$) ]] && break
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run_conformance: $name exited before it was up; its log:" >&2
      tail -n 40 "$work/$name.log" >&2
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      echo "run_conformance: $name not up after ${timeout}s ($url); its log:" >&2
      tail -n 40 "$work/$name.log" >&2
      exit 1
    fi
    sleep 0.25
  done
}

start_reference() {
  local name=$1 port=$2
  mkdir -p "$work/$name"
  start "$name" "$venv_bin/mlflow" server \
    --backend-store-uri "sqlite:///$work/$name/mlflow.db" \
    --artifacts-destination "$work/$name/artifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$port" --workers 1
}

ref_port=$(free_port)
start_reference reference "$ref_port"
ref_url=http://127.0.0.1:$ref_port

if [[ $mode == self ]]; then
  other=reference-2
  other_port=$(free_port)
  start_reference "$other" "$other_port"
  other_url=http://127.0.0.1:$other_port
  wait_up "$other" "$reference_2_pid" "$other_url/health"
else
  other=mlplane
  if [[ ! -x $bin ]]; then
    echo "run_conformance: no mlplane binary at $bin (build it, or set MLPLANE_BIN)" >&2
    exit 1
  fi
  other_port=$(free_port)
  mkdir -p "$work/mlplane/artifacts"
  start mlplane "$bin" tracking --addr "127.0.0.1:$other_port" \
    --database-url "${MLPLANE_CONFORMANCE_DATABASE_URL:-sqlite://$work/mlplane/tracking.db}" --artifact-root "$work/mlplane/artifacts"
  other_url=http://127.0.0.1:$other_port
  wait_up mlplane "$mlplane_pid" "$other_url/api/2.0/mlflow/experiments/get?experiment_id=0" any
fi
wait_up reference "$reference_pid" "$ref_url/health"

prefix=conformance-$$
status=0
"$python" "$here/conformance.py" --uri "$ref_url" --out "$work/reference.json" --prefix "$prefix" --deadline "$deadline" \
  >"$work/conformance-reference.log" 2>&1 &
ref_job=$!
"$python" "$here/conformance.py" --uri "$other_url" --out "$work/$other.json" --prefix "$prefix" --deadline "$deadline" \
  >"$work/conformance-$other.log" 2>&1 &
other_job=$!
wait "$ref_job" || status=$?
wait "$other_job" || status=$?
for f in "$work/conformance-reference.log" "$work/conformance-$other.log"; do
  grep -v -e 'StarletteDeprecationWarning' -e 'from starlette' "$f" >&2 || true
done
if ((status != 0)); then
  echo "run_conformance: conformance.py failed (exit $status)" >&2
  exit "$status"
fi

"$python" "$here/compare.py" "$work/reference.json" "$work/$other.json"
