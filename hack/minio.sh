#!/usr/bin/env bash
# A throwaway MinIO server (a real S3-compatible object store) for the
# DataAsset and Pipeline tests: the binary tests/cluster/build.sh builds from
# the github.com/minio/minio Go module, on 127.0.0.1, data in <dir>/data.
#   hack/minio.sh start <dir> [port] [bucket...]  -> prints http://127.0.0.1:<port>
#   hack/minio.sh stop <dir>                      (kills it; keeps <dir>, so start can resume it)
#   hack/minio.sh remove <dir>                    (stop, then delete <dir>)
# Credentials: MINIO_ROOT_USER / MINIO_ROOT_PASSWORD (defaults below). Buckets
# named on start are created as top-level directories of the data directory,
# which MinIO serves as buckets. Without a port a free one is picked.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:?start|stop|remove}
dir=${2:?directory}
cache=${MLPLANE_BIN_CACHE:-$HOME/.cache/mlplane/bin}
bin=$cache/current/minio
export MINIO_ROOT_USER=${MINIO_ROOT_USER:-mlplane-test}
export MINIO_ROOT_PASSWORD=${MINIO_ROOT_PASSWORD:-mlplane-test-secret}
stop() {
  if [[ -f $dir/pid ]]; then
    local pid; pid=$(cat "$dir/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/pid"
  fi
}
case $cmd in
  start)
    [[ -x $bin ]] || "$here/tests/cluster/build.sh" >/dev/null
    port=${3:-}
    if [[ -z $port ]]; then
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    fi
    mkdir -p "$dir/data"
    for b in "${@:4}"; do mkdir -p "$dir/data/$b"; done
    # No console, no update checks, no telemetry: an S3 endpoint only.
    MINIO_BROWSER=off MINIO_UPDATE=off MINIO_CALLHOME_ENABLE=off \
      nohup "$bin" server --quiet --address "127.0.0.1:$port" "$dir/data" >"$dir/log" 2>&1 &
    echo $! >"$dir/pid"
    for _ in $(seq 150); do
      if curl -fs "http://127.0.0.1:$port/minio/health/live" >/dev/null 2>&1; then
        echo "http://127.0.0.1:$port"
        exit 0
      fi
      kill -0 "$(cat "$dir/pid")" 2>/dev/null || break
      sleep 0.1
    done
    echo "minio did not start:" >&2; tail -20 "$dir/log" >&2; stop; exit 1
    ;;
  stop) stop ;;
  remove) stop; rm -rf "$dir" ;;
  *) echo "usage: $0 start|stop|remove <dir> [port] [bucket...]" >&2; exit 2 ;;
esac
