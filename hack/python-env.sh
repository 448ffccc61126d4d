#!/usr/bin/env bash
# Creates .venv with the pinned MLflow (client and reference server) used by
# the tracking conformance tests and benchmarks. Idempotent; prints the venv's
# python path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${MLPLANE_VENV:-$root/.venv}
req=$root/tests/tracking/requirements.txt
stamp=$venv/.installed-$(sha256sum "$req" | cut -c1-16)
# Tests run in parallel: one creates the venv while the others wait.
exec 9>"$venv.lock"
flock 9
if [[ ! -f $stamp ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
