#!/usr/bin/env bash
# Creates .venv and installs edgelm with everything the README's commands need.
# Idempotent and quick on a second run: the venv is reused, and pip is skipped entirely while
# pyproject.toml is unchanged (pip's wheel cache keeps the llama.cpp build, ~5 min, for reinstalls).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.edgelm-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import edgelm, llama_cpp" 2>/dev/null; then
  echo "[setup] installing edgelm[all] (the first run compiles llama.cpp: about 5 minutes)"
  .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
  .venv/bin/python -m pip install --disable-pip-version-check -q -e '.[all]'
  echo "$want" > "$stamp"
fi
