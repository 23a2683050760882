#!/usr/bin/env bash
# Refresh requirements.lock: resolve the ranges of pyproject.toml (+ constraints.txt, + the --no-deps
# packages of requirements-nodeps.txt) in a clean venv, run the test suite there, and write the lock
# only if the tests pass. Run it after adding or bumping a dependency, then `bash scripts/setup.sh` and
# the tests from a fresh clone. Extra arguments go to pytest (e.g. `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
UV_VERSION=${UV_VERSION:-$(grep -E "^uv==" requirements.lock 2>/dev/null | cut -d= -f3 || true)}
UV_VERSION=${UV_VERSION:-0.13.8}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "lock.sh: building a clean venv in $work" >&2
"$PY" -m venv "$work/venv"
V=$work/venv/bin/python
"$V" -m pip install -q --upgrade pip setuptools wheel
"$V" -m pip install -q -c constraints.txt -e ".[test]"
"$V" -m pip install -q --no-deps -r requirements-nodeps.txt
"$V" -m pip install -q --no-deps "uv==$UV_VERSION"  # setup.sh installs the rest with it
{
  echo "# Every package of the masquant environment at the version its tests passed on."
  echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$V" --version) on $(uname -m); installed by scripts/setup.sh."
  echo "# torch is written without its local label (+cpu / +cuXXX): any build of that version matches."
  "$V" -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > "$work/requirements.lock"
if grep -v -E '^(#|[A-Za-z0-9][A-Za-z0-9._-]*==[^ ]+$)' "$work/requirements.lock"; then
  echo "lock.sh: pip freeze wrote lines that are not name==version (above); lock NOT written" >&2
  exit 1
fi
echo "lock.sh: running the tests against the candidate lock" >&2
if ! (export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
      MASQUANT_LOCK="$work/requirements.lock"; "$V" -m pytest -q "$@"); then
  echo "lock.sh: tests failed; requirements.lock NOT written" >&2
  exit 1
fi
if [ -f requirements.lock ]; then diff -u requirements.lock "$work/requirements.lock" | grep -E '^[-+][A-Za-z]' || true; fi
mv "$work/requirements.lock" requirements.lock
echo "lock.sh: requirements.lock written ($(grep -c '==' requirements.lock) packages)" >&2
