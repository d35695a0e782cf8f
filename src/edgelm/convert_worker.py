"""GGUF → Hugging Face checkpoint, run by ``edgelm model convert`` inside its tool environment.

This file is executed as a script by the tool environment's Python (``python -I
convert_worker.py ...``), never imported by edgelm: it needs torch and transformers 5.x, which
the main environment does not have (the web export there pins transformers < 4.58). So it
imports nothing from edgelm and only the standard library at module level.

It loads the GGUF with transformers, dequantised to fp32, saves a plain checkpoint, and makes
sure the chat template sits in ``tokenizer_config.json`` where every ONNX tool looks for it.
It runs as its own process so that its memory (the whole fp32 model) is returned to the
system before onnxruntime-genai's model builder starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def say(message: str) -> None:
    """One progress line for the parent (it shows the last line of each stage)."""
    print(f"[edgelm-convert] {message}", flush=True)


def load_dequantized(source: Path):  # type: ignore[no-untyped-def]
    """The model as plain fp32 torch weights, whichever transformers generation is installed.

    transformers 4.x dequantises a GGUF on load; 5.x keeps the GGUF blocks unless its
    ``GgufConfig(dequantize=True)`` asks otherwise, and still marks the model as quantised,
    which makes ``save_pretrained`` refuse. Both are handled here.
    """
    import torch
    import transformers

    kwargs: dict[str, object] = {"gguf_file": source.name}
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["dtype"] = torch.float32
        gguf_config = getattr(transformers, "GgufConfig", None)
        if gguf_config is not None:
            kwargs["quantization_config"] = gguf_config(gguf_file=source.name, dequantize=True)
    else:
        kwargs["torch_dtype"] = torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


def mark_tied_embeddings(model) -> bool:  # type: ignore[no-untyped-def]
    """Tie the embeddings again when the GGUF stored two quantised copies of one matrix.

    Qwen2.5 ties its input and output embeddings, but its GGUF keeps them as two tensors
    quantised differently (Q5_0 and Q8_0), so transformers loads an untied model and the
    model builder then keeps a second, fp32 embedding: 874 MB instead of ~400 MB for the int4
    0.5B model. Two copies of one matrix differ only by quantisation noise (a few percent);
    two different matrices differ by about their own size. The output copy is kept: it is
    the one llama.cpp quantises more finely.
    """
    import torch

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or getattr(model.config, "tie_word_embeddings", False):
        return False
    if embed.weight.shape != head.weight.shape:
        return False
    with torch.no_grad():
        distance = float((embed.weight - head.weight).norm() / head.weight.norm())
        if distance > 0.1:
            return False
        embed.weight.copy_(head.weight)
    model.config.tie_word_embeddings = True
    return True


def fix_tokenizer_config(out: Path) -> None:
    """Put the chat template into tokenizer_config.json (5.x writes it to a .jinja file)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text("utf-8"))
    jinja = out / "chat_template.jinja"
    if not config.get("chat_template") and jinja.is_file():
        config["chat_template"] = jinja.read_text("utf-8")
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")


def gguf_to_hf(source: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    say(f"reading the tokenizer from {source.name}")
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    say(f"dequantising {source.name} to fp32")
    model = load_dequantized(source)
    if mark_tied_embeddings(model):
        say("input and output embeddings are copies of one matrix: tied again")
    params = sum(p.numel() for p in model.parameters())
    say(f"saving the checkpoint ({params / 1e6:.0f}M parameters)")
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    fix_tokenizer_config(out)
    say(f"checkpoint ready in {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    gguf_to_hf(args.gguf.resolve(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
