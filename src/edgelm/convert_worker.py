"""GGUF → Hugging Face checkpoint, run by ``edgelm model convert`` inside its tool environment.

This file is executed as a script by the tool environment's Python (``python -I
convert_worker.py ...``), never imported by edgelm: it needs torch and transformers 5.x, which
the main environment does not have (the web export there pins transformers < 4.58). So it
imports nothing from edgelm and only the standard library at module level.

It streams the GGUF's tensors, one at a time, dequantised, into an fp16 checkpoint (never the
whole fp32 model in memory: that was ~17 GB for Qwen2.5-1.5B with the later build), takes the
configuration and tokenizer from transformers' GGUF support, and makes sure the chat template
sits in ``tokenizer_config.json`` where every ONNX tool looks for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import runpy
import sys
import time
from pathlib import Path

# Progress lines in the format the parent reads (edgelm/convert_progress.py, loaded by
# its path: this script runs with -I, see that file).
say = runpy.run_path(str(Path(__file__).with_name("convert_progress.py")))["say"]


SHARD_BYTES = 256 * 2**20
"""Tensors are written in safetensors shards of about this size: the most held at once."""
TIED_DISTANCE = 0.1


def tensor_name_map(source: Path, config):  # type: ignore[no-untyped-def]
    """GGUF tensor name → Hugging Face parameter name, and transformers' per-tensor fix-ups.

    The map comes from an empty model built on the ``meta`` device (no memory for weights),
    through the same helpers transformers uses when it loads a whole GGUF; the processor
    undoes llama.cpp's rearrangements (e.g. the rotary permutation of llama's q/k rows).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    parsed = load_gguf_checkpoint(str(source), return_tensors=False)
    architecture = parsed["config"].get("model_type") or config.model_type
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config)
    mapping = get_gguf_hf_weights_map(empty, processor)
    return mapping, processor, parsed


ROWS_PER_CHUNK = 8192
"""Rows dequantised at a time: bounds the dequantiser's temporaries (a few fp32 copies of
what it is given) to a few tens of MB instead of several copies of the embedding."""


def dequantise(tensor):  # type: ignore[no-untyped-def]
    """One GGUF tensor as fp32, dequantised a slice of rows at a time into one array."""
    import numpy as np
    from gguf import dequantize

    data = tensor.data
    if data.ndim != 2 or data.shape[0] <= ROWS_PER_CHUNK:
        return np.asarray(dequantize(data, tensor.tensor_type), dtype=np.float32)
    first = dequantize(data[:1], tensor.tensor_type)
    out = np.empty((data.shape[0], first.shape[-1]), dtype=np.float32)
    for start in range(0, data.shape[0], ROWS_PER_CHUNK):
        stop = start + ROWS_PER_CHUNK
        out[start:stop] = dequantize(data[start:stop], tensor.tensor_type)
    return out


def same_matrix(first, second) -> bool:  # type: ignore[no-untyped-def]
    """Two GGUF tensors are copies of one matrix quantised differently, not two matrices.

    Qwen2.5 ties its input and output embeddings, but its GGUF keeps them as two tensors
    quantised differently (Q5_0 and Q8_0), so the model would load untied and the model
    builder would keep a second embedding: 874 MB instead of ~400 MB for the int4 0.5B
    model. Two copies differ only by quantisation noise (a few percent); two different
    matrices differ by about their own size. Compared a slice of rows at a time, so the two
    fp32 embeddings (1.9 GB for Qwen2.5-1.5B) are never in memory together.
    """
    import numpy as np
    from gguf import dequantize

    a, b = first.data, second.data
    if list(first.shape) != list(second.shape) or a.ndim != 2 or b.ndim != 2:
        return False
    if a.shape[0] != b.shape[0]:
        return False
    diff = norm = 0.0
    for start in range(0, a.shape[0], ROWS_PER_CHUNK):
        x = dequantize(a[start : start + ROWS_PER_CHUNK], first.tensor_type)
        y = dequantize(b[start : start + ROWS_PER_CHUNK], second.tensor_type)
        diff += float(np.square(x - y, dtype=np.float64).sum())
        norm += float(np.square(y, dtype=np.float64).sum())
    return (diff / max(norm, 1e-24)) ** 0.5 <= TIED_DISTANCE


def release_pages(reader) -> None:  # type: ignore[no-untyped-def]
    """Drop the GGUF's pages read so far from this process (they are clean file pages, read
    again if needed): otherwise the whole file ends up counted in the resident set."""
    import mmap

    handle = getattr(getattr(reader, "data", None), "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            handle.madvise(mmap.MADV_DONTNEED)


class ShardWriter:
    """Writes fp16 tensors into numbered safetensors shards and the index transformers reads."""

    def __init__(self, out: Path):
        self.out = out
        self.pending: dict[str, object] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, array) -> None:  # type: ignore[no-untyped-def]
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        self.total += array.nbytes
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.numpy import save_file

        if not self.pending:
            return
        filename = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out / filename), metadata={"format": "pt"})
        self.files.append((filename, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        weight_map = {name: filename for filename, names in self.files for name in names}
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def stream_weights(source: Path, out: Path, config) -> int:  # type: ignore[no-untyped-def]
    """Dequantise the GGUF one tensor at a time into fp16 shards; return the parameter count.

    The GGUF is memory-mapped and each tensor is dequantised, fixed up, cast to fp16 and
    queued for the current shard, so the most held at once is one shard plus one fp32 tensor
    (the embedding, ~0.9 GB for Qwen2.5-1.5B) instead of the whole fp32 model (~6 GB for the
    1.5B). fp16 keeps every dequantised value exactly enough for the int4 quantiser that
    follows (GGUF's own block scales are fp16) and halves what the model builder loads.
    """
    import numpy as np
    from gguf import GGUFReader

    mapping, processor, parsed = tensor_name_map(source, config)
    reader = GGUFReader(str(source))
    by_name = {tensor.name: tensor for tensor in reader.tensors}

    def load(name: str):  # type: ignore[no-untyped-def]
        weights = dequantise(by_name[name])
        result = processor.process(
            weights=weights, name=name, tensor_key_mapping=mapping, parsed_parameters=parsed
        )
        return result.name, np.asarray(result.weights, dtype=np.float32)

    skip: set[str] = set()
    if "output.weight" in by_name and "token_embd.weight" in by_name:
        head, embed = by_name["output.weight"], by_name["token_embd.weight"]
        if not getattr(config, "tie_word_embeddings", False) and same_matrix(embed, head):
            # The output copy is kept: it is the one llama.cpp quantises more finely.
            say("input and output embeddings are copies of one matrix: tied again")
            config.tie_word_embeddings = True
            by_name["token_embd.weight"] = by_name["output.weight"]
            skip.add("output.weight")
    if getattr(config, "tie_word_embeddings", False):
        skip.add("output.weight")
    say("tensor names mapped; writing shards")
    writer = ShardWriter(out)
    params = 0
    for name in list(by_name):
        if name in skip:
            continue
        hf_name, weights = load(name)
        target = mapping.get(hf_name)
        if target is None:
            continue
        half = weights.astype(np.float16)
        if not np.isfinite(half).all():
            raise ValueError(f"{name} does not fit in fp16 (values up to {np.abs(weights).max()})")
        params += half.size
        writer.add(target, np.ascontiguousarray(half))
        del weights
        release_pages(reader)
    writer.close()
    return params


def fix_tokenizer_config(out: Path) -> None:
    """Put the chat template into tokenizer_config.json (5.x writes it to a .jinja file)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text("utf-8"))
    jinja = out / "chat_template.jinja"
    if not config.get("chat_template") and jinja.is_file():
        config["chat_template"] = jinja.read_text("utf-8")
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")


def gguf_to_hf(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    say(f"reading the tokenizer and configuration from {source.name}")
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    say("tokenizer and configuration read")
    say(f"dequantising {source.name} to fp16, one tensor at a time")
    params = stream_weights(source, out, config)
    config.dtype = torch.float16
    # What save_pretrained would record; the model builder picks its builder by it.
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    fix_tokenizer_config(out)
    say(f"checkpoint ready ({params / 1e6:.0f}M parameters) in {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    gguf_to_hf(args.gguf.resolve(), args.out)
    say("finished")  # the last line carries the step's peak (see convert.run_logged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
