#!/usr/bin/env bash
# Installs edgelm, downloads the default model and the RAG embedder (verified) and serves it with the playground
# on http://127.0.0.1:5273 in the foreground. Ctrl+C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${EDGELM_MODEL:-qwen2.5-0.5b}
.venv/bin/edgelm model download "$MODEL"
# RAG's default embedder (dense and hybrid retrieval); without it ingest is lexical only.
.venv/bin/edgelm model download "${EDGELM_EMBED_MODEL:-all-minilm-l6-v2}"
exec .venv/bin/edgelm service start --foreground --model "$MODEL" "$@"
