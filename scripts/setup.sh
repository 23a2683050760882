#!/usr/bin/env bash
# Create .venv with exactly the versions of requirements.lock (under 30 s from an empty cache; re-runs
# are instant). Everything goes in with --no-deps from the lock, so no new release of any package can
# change the environment. Refresh the lock with scripts/lock.sh.
# torch is installed by pip (which finds a local CPU wheel where the machine's pip config provides one);
# the rest by uv (the locked version, itself installed by pip), about 3x faster than pip; with
# MASQUANT_INSTALLER=pip, or where uv cannot be installed, pip installs everything.
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
# up to date: same lock and set-up, and nothing changed by hand since (else reinstall from the lock)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$V" -m masquant.runs.environment >/dev/null 2>&1; then exit 0; fi
rm -f "$stamp"
pin() { grep -E "^$1==" "$LOCK"; }
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
grep -v -E '^(torch|pip)==' "$LOCK" > "$reqs"
if [ "${MASQUANT_TORCH:-lock}" = keep ]; then
  "$V" -c "import torch" 2>/dev/null || {
    echo "setup.sh: MASQUANT_TORCH=keep but .venv has no importable torch; install yours first, e.g." >&2
    echo "  .venv/bin/python -m pip install torch==<the locked version> --index-url <your CUDA wheel index>" >&2
    exit 1
  }
  touch .venv/.masquant-torch-external
else
  rm -f .venv/.masquant-torch-external
fi
"$V" -m pip install -q --no-deps "$(pin pip)"
[ "${MASQUANT_TORCH:-lock}" = keep ] || "$V" -m pip install -q --no-deps "$(pin torch)"
if [ "${MASQUANT_INSTALLER:-uv}" = uv ] && "$V" -m pip install -q --no-deps "$(pin uv)"; then
  UV_LINK_MODE=copy .venv/bin/uv pip install -q --python "$V" --no-deps -r "$reqs"
  UV_LINK_MODE=copy .venv/bin/uv pip install -q --python "$V" --no-deps --no-build-isolation -e .
else
  "$V" -m pip install -q --no-deps -r "$reqs"
  "$V" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$V" -m masquant.runs.environment
# espeak-ng (a Debian package) speaks the testbed-omni audio tasks; nothing else needs it. Where it cannot be
# installed, the set-up still succeeds (testbed-vl, real models and every method work without it) and the
# testbed-omni paths stop with an error that names it.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: installing espeak-ng (testbed-omni speech) with apt-get" >&2
    { apt-get install -y -q espeak-ng >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q espeak-ng >/dev/null 2>&1; }; } ||
      echo "setup.sh: WARNING: apt-get could not install espeak-ng; model=testbed_omni and its tests will fail until it is installed" >&2
  else
    echo "setup.sh: WARNING: espeak-ng is missing and cannot be installed here (needs root and apt-get)." >&2
    echo "  model=testbed_omni and its tests need it: sudo apt-get install espeak-ng  (nothing else does)" >&2
  fi
fi
echo "$want" > "$stamp"
