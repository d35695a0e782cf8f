"""Convert a BERT sentence-embedding checkpoint (safetensors) to GGUF, once, at download time.

llama.cpp serves BERT-family encoders from GGUF, but the checkpoints are published as
sentence-transformers folders (``model.safetensors``, ``config.json``, ``tokenizer.json``).
llama.cpp's own converter (``convert_hf_to_gguf.py``) needs torch and transformers just to read
a 90 MB file, so this module writes the same GGUF with numpy and the ``gguf`` package alone:
the tensor names come from gguf's BERT name map, the vocabulary gets llama.cpp's "phantom
space" spelling (a word-initial piece gains ``▁``, a ``##`` continuation loses its prefix),
and the metadata matches what the official converter writes for all-MiniLM-L6-v2 (checked
key by key and tensor by tensor against its output when this was written).

Only what a sentence embedder needs is kept: the pooler and MLM heads are dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgelm.errors import MissingExtra, ModelLoadError

POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}
"""llama.cpp's ``LLAMA_POOLING_TYPE_*`` values, by the name the catalog uses."""

_DROPPED = ("embeddings.position_ids", "pooler.", "cls.")
# gguf TokenType values (the enum lives in the gguf package; repeated to read without it).
_NORMAL, _CONTROL = 1, 3


def convert_bert_to_gguf(
    folder: Path,
    out: Path,
    *,
    weights: str = "model.safetensors",
    pooling: str = "mean",
    dtype: str = "f16",
    progress: Callable[[str, int, int | None], None] | None = None,
) -> Path:
    """Write ``out`` (atomically, through ``out.part``) from the checkpoint in ``folder``.

    ``dtype`` is the weight matrices' type (``f16`` halves the file with no measurable loss on
    cosine similarity; ``f32`` keeps the checkpoint's bits); norms, biases and the small
    embedding tables stay float32 as llama.cpp's converter keeps them.
    """
    try:
        import gguf
        from safetensors.numpy import load_file
    except ImportError:
        raise MissingExtra("gguf and safetensors", "llamacpp") from None
    if pooling not in POOLING:
        raise ModelLoadError(f"unknown pooling '{pooling}'; choose one of {', '.join(POOLING)}")
    report = progress or (lambda stage, done, total: None)
    config = json.loads((folder / "config.json").read_text("utf-8"))
    if config.get("model_type") != "bert":
        raise ModelLoadError(
            f"{folder / 'config.json'}: model_type {config.get('model_type')!r} is not 'bert'"
        )
    tokenizer = json.loads((folder / "tokenizer.json").read_text("utf-8"))
    tensors = load_file(str(folder / weights))
    blocks = int(config["num_hidden_layers"])

    part = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(part), "bert")
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(blocks)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType(POOLING[pooling]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else 0)
    _add_vocab(writer, gguf, tokenizer, config)

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, blocks)
    kept = [n for n in tensors if not n.startswith(_DROPPED)]
    total = sum(tensors[n].nbytes for n in kept)
    done = 0
    for name in kept:
        hf = name[5:] if name.startswith("bert.") else name
        target = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelLoadError(f"{weights}: no GGUF name for tensor '{name}'")
        data = np.ascontiguousarray(tensors[name], dtype=np.float32)
        # Matrices of the encoder blocks shrink to f16; token tables and 1-D tensors do not.
        if dtype == "f16" and data.ndim == 2 and target.startswith("blk."):
            data = data.astype(np.float16)
        writer.add_tensor(target, data)
        done += tensors[name].nbytes
        report("converting to GGUF", done, total)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    with part.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(part, out)
    return out


def _add_vocab(writer, gguf, tokenizer: dict, config: dict) -> None:
    """The WordPiece vocabulary as llama.cpp's BERT tokenizer reads it."""
    model = tokenizer.get("model", {})
    if model.get("type") != "WordPiece":
        raise ModelLoadError(f"tokenizer.json: model type {model.get('type')!r} is not WordPiece")
    vocab: dict[str, int] = model["vocab"]
    size = max(int(config.get("vocab_size", 0)), max(vocab.values()) + 1)
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", []) if t["special"]}
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [_NORMAL] * size
    for text, index in vocab.items():
        if text in special:
            tokens[index], types[index] = text, _CONTROL
        elif text.startswith("##"):
            tokens[index] = text[2:]
        else:
            tokens[index] = "\u2581" + text
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("jina-v2-en")  # what llama.cpp's converter names this tokenizer
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    def ident(name: str) -> int:
        if name not in vocab:
            raise ModelLoadError(f"tokenizer.json has no {name} token")
        return vocab[name]

    writer.add_bos_token_id(ident("[CLS]"))
    writer.add_eos_token_id(ident("[SEP]"))
    writer.add_unk_token_id(ident("[UNK]"))
    writer.add_sep_token_id(ident("[SEP]"))
    writer.add_pad_token_id(ident("[PAD]"))
    writer.add_mask_token_id(ident("[MASK]"))
    writer.add_add_bos_token(True)  # [CLS] text [SEP], as the tokenizer's template says
    writer.add_add_eos_token(True)
    writer.add_add_sep_token(False)
    lowercase = bool((tokenizer.get("normalizer") or {}).get("lowercase", True))
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", lowercase)
