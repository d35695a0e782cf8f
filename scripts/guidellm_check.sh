#!/usr/bin/env bash
# Cross-check `edgelm bench context` against guidellm (the vLLM project's benchmark) on one
# scenario and one target: unique synthetic prompts of PROMPT_TOKENS, answers of OUTPUT_TOKENS
# (ignore_eos), REQUESTS requests, STREAMS at once. Not run in CI: it needs guidellm in a venv
# of its own (it pins torch/transformers) and a running target.
#
#   scripts/guidellm_check.sh URL MODEL TOKENIZER_DIR [PROMPT_TOKENS] [OUTPUT_TOKENS] [REQUESTS] [STREAMS]
#
#   URL            the target's root, e.g. http://127.0.0.1:5273 (edgelm) or
#                  http://127.0.0.1:8080 (llama.cpp's llama-server)
#   MODEL          the model name the target serves (edgelm: a catalog alias)
#   TOKENIZER_DIR  a Hugging Face tokenizer directory for guidellm's synthetic prompts: the
#                  ONNX conversion directory of a model holds one
#                  (~/.edgelm/models/smollm2-135m-onnx-cpu-int4)
#
# Environment: GUIDELLM (default /work/tools/guidellm-venv/bin/guidellm), EDGELM (default
# `edgelm`), OUT (default a new temporary directory).
#
# Why figures differ between the two (same target, same scenario):
# * TTFT: guidellm times from just before it sends the request to the first streamed chunk
#   with content; edgelm bench the same, but edgelm's client pre-builds the body and the
#   connection (prepare/send are reported apart). Expect a few ms difference, not more.
# * ITL: guidellm's "inter_token_latency" is (e2e - TTFT) / (output tokens - 1), i.e. edgelm's
#   TPOT; edgelm's ITL is the gap between streamed chunks (one token per chunk on edgelm and
#   llama-server, so medians agree, but guidellm cannot show the longest gap).
# * Token counts: guidellm counts prompt tokens with TOKENIZER_DIR on its own text, edgelm with
#   the target's own counts (usage). guidellm's prompt is a raw sample of the given length;
#   the chat template adds ~10-30 tokens on the server. edgelm calibrates words per token on
#   the target, so its prompt lengths are the server's count; guidellm's are the tokenizer's.
# * Output tokens/s: guidellm divides all output tokens by the benchmark's duration including
#   its ramp-up; edgelm's "output tok/s" divides by the scenario's wall time, and its decode
#   tok/s is per request after the first token.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '7,16p' "$0"
  exit 2
fi
URL=${1%/}
URL=${URL%/v1}
MODEL=$2
TOKENIZER=$3
PROMPT_TOKENS=${4:-1024}
OUTPUT_TOKENS=${5:-16}
REQUESTS=${6:-5}
STREAMS=${7:-1}
GUIDELLM=${GUIDELLM:-/work/tools/guidellm-venv/bin/guidellm}
EDGELM=${EDGELM:-edgelm}
OUT=${OUT:-$(mktemp -d -t guidellm-check.XXXXXX)}
mkdir -p "$OUT"

if [[ ! -x $GUIDELLM ]]; then
  echo "guidellm not found at $GUIDELLM: python3 -m venv DIR && DIR/bin/pip install guidellm==0.8.1" >&2
  exit 2
fi
if [[ ! -f $TOKENIZER/tokenizer.json && ! -f $TOKENIZER/tokenizer_config.json ]]; then
  echo "$TOKENIZER holds no Hugging Face tokenizer (tokenizer.json)" >&2
  exit 2
fi

if [[ $STREAMS -gt 1 ]]; then
  PROFILE="kind=concurrent,streams=$STREAMS"
else
  PROFILE="kind=synchronous"
fi

echo "== guidellm: $PROMPT_TOKENS in / $OUTPUT_TOKENS out, $REQUESTS requests, $STREAMS stream(s) -> $OUT"
"$GUIDELLM" run \
  --backend "kind=openai_http,target=$URL,model=$MODEL,request_format=/v1/chat/completions" \
  --profile "$PROFILE" \
  --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
  --tokenizer "kind=huggingface_auto,model=$TOKENIZER" \
  --constraint "kind=max_requests,count=$REQUESTS" \
  --output "kind=json,path=$OUT/guidellm.json" \
  --disable-console-interactive >"$OUT/guidellm.log" 2>&1 || {
  tail -30 "$OUT/guidellm.log" >&2
  exit 1
}

echo "== edgelm bench context: same scenario"
# EDGELM may be a command with arguments (e.g. "python -m edgelm.cli.main"): split on purpose.
# shellcheck disable=SC2086
COLUMNS=${COLUMNS:-160} $EDGELM bench context -m "$URL/v1#$MODEL" --lengths "$PROMPT_TOKENS" \
  --max-tokens "$OUTPUT_TOKENS" -n "$REQUESTS" -c "$STREAMS" --out "$OUT/edgelm" \
  --name "guidellm-check" >"$OUT/edgelm.log" 2>&1 || {
  tail -30 "$OUT/edgelm.log" >&2
  exit 1
}

# Side by side. guidellm's JSON: benchmarks[0].metrics.<metric>.successful.{median,mean}.
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
g = json.loads((out / "guidellm.json").read_text())["benchmarks"][0]["metrics"]
rows = json.loads(
    (out / "edgelm.log").read_text().split("[CONTEXT SCALING]", 1)[1].split("\nrun ", 1)[0]
)
e = rows[0]


def gm(name, stat="median"):
    try:
        return g[name]["successful"][stat]
    except (KeyError, TypeError):
        return None


def fmt(v, scale=1.0, digits=1):
    return "-" if v is None else f"{v * scale:.{digits}f}"


lines = [
    ("prompt tokens (median)", gm("prompt_token_count"), e["prompt_tokens"], 1, 0),
    ("TTFT median, ms", gm("time_to_first_token_ms"), e["ttft_s"], 1000, 0),
    ("output tok/s (whole run)", gm("output_tokens_per_second", "mean"), e["output_tps"], 1, 1),
    ("ITL (guidellm) vs 1/decode tok/s, ms", gm("inter_token_latency_ms"),
     1 / e["decode_tps"] if e["decode_tps"] else None, 1000, 1),
]
print(f"{'metric':40} {'guidellm':>10} {'edgelm':>10}")
for label, gv, ev, scale, digits in lines:
    print(f"{label:40} {fmt(gv, 1, digits):>10} {fmt(ev, scale, digits):>10}")
print(f"edgelm: longest token gap / median gap = {fmt(e['gap_ratio_max'], 1, 2)}")
print(f"files: {out}")
EOF
