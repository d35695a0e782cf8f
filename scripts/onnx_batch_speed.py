"""Decode speed of onnxruntime-genai's static batching on this CPU: aggregate tokens/s of one
generator with batch_size N against batch_size 1, interleaved over several repetitions (a busy
machine then slows every size alike). What the ONNX engine's batched groups rest on.

    python scripts/onnx_batch_speed.py ~/.edgelm/models/qwen2.5-0.5b-onnx-cpu-int4 \
        --sizes 1,4,8 --reps 5 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--sizes", default="1,4,8")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime_genai as og

    config = og.Config(args.model_dir)
    config.clear_providers()
    options = {
        "intra_op_num_threads": args.threads,
        "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": "0",
    }
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    prompt = np.random.default_rng(0).integers(100, 20000, size=args.prompt, dtype=np.int32)
    sizes = [int(s) for s in args.sizes.split(",")]

    def run(rows: int) -> float:
        length = args.prompt + args.tokens + 2
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=length, min_length=length, batch_size=rows, do_sample=False
        )
        generator = og.Generator(model, params)
        generator.append_tokens(np.tile(prompt, (rows, 1)))
        generator.generate_next_token()  # the prompt's logits: not a decode step
        start = time.perf_counter()
        for _ in range(args.tokens):
            generator.generate_next_token()
        return rows * args.tokens / (time.perf_counter() - start)

    results: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.reps):
        for n in sizes:
            results[n].append(run(n))
    base = statistics.median(results[sizes[0]])
    for n in sizes:
        median = statistics.median(results[n])
        print(
            f"batch {n}: {median:.1f} tok/s aggregate (median of {args.reps}), "
            f"{median / base:.2f}x batch {sizes[0]}; all: {[round(v, 1) for v in results[n]]}"
        )


if __name__ == "__main__":
    main()
