#!/usr/bin/env bash
# Installs edgelm and runs the whole suite: lint, unit tests (fake engine), integration tests
# (the real SmolLM2-135M model through the HTTP service and the openai client).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Browser tests drive Debian's chromium through Playwright (its own browser download cannot work here).
if ! command -v chromium >/dev/null 2>&1; then
  echo "[test] installing chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi
export EDGELM_TEST_MODELS=${EDGELM_TEST_MODELS:-$HOME/.edgelm/models}
EDGELM_HOME=${EDGELM_TEST_HOME:-$HOME/.edgelm} .venv/bin/edgelm model download smollm2-135m
.venv/bin/ruff check src tests
.venv/bin/python -m pytest -q "$@"
