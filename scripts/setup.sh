#!/usr/bin/env bash
# Create .venv with exactly the versions of requirements.lock (a minute from an empty pip cache; re-runs
# are instant). Everything goes in with --no-deps from the lock, so no new release of any package can
# change the environment. Refresh the lock with scripts/lock.sh.
#   MASQUANT_TORCH=keep  keep the torch already in .venv (your CUDA build; see README "GPU clusters")
#   PYTHON=python3.12    the interpreter for a new .venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
LOCK=requirements.lock
[ -x .venv/bin/python ] || "$PY" -m venv .venv
V=.venv/bin/python
stamp=.venv/.masquant-setup
want=$(cat pyproject.toml "$LOCK" scripts/setup.sh | sha256sum | cut -d' ' -f1)-${MASQUANT_TORCH:-lock}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -f "$stamp"
  reqs=$(mktemp)
  trap 'rm -f "$reqs"' EXIT
  if [ "${MASQUANT_TORCH:-lock}" = keep ]; then
    "$V" -c "import torch" 2>/dev/null || {
      echo "setup.sh: MASQUANT_TORCH=keep but .venv has no importable torch; install yours first, e.g." >&2
      echo "  .venv/bin/python -m pip install torch==<the locked version> --index-url <your CUDA wheel index>" >&2
      exit 1
    }
    grep -v -E '^torch==' "$LOCK" > "$reqs"
    touch .venv/.masquant-torch-external
  else
    cp "$LOCK" "$reqs"
    rm -f .venv/.masquant-torch-external
  fi
  "$V" -m pip install -q --no-deps "$(grep -E '^pip==' "$LOCK")"
  "$V" -m pip install -q --no-deps -r "$reqs"
  "$V" -m pip install -q --no-deps --no-build-isolation -e .
  "$V" -m masquant.environment
  echo "$want" > "$stamp"
fi
