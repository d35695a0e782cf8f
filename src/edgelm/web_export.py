"""Export a cached GGUF chat model to ONNX for in-browser inference (transformers.js).

The playground runs a small model inside the page with onnxruntime-web, and the service
serves the files from ``$EDGELM_HOME/browser-models/<alias>/`` (see
:mod:`edgelm.server.browser_models`). The browser cannot read GGUF, so this module turns the
model the user already downloaded into the layout transformers.js expects::

    <alias>/config.json, generation_config.json, tokenizer.json, tokenizer_config.json
    <alias>/onnx/model.onnx            (fp32, with past key/values: fast incremental decode)
    <alias>/edgelm-export.json         (what was built from what; the cache key)

Why these choices (see the design notes, "In-browser inference"):

- transformers dequantizes the GGUF (``gguf_file=``) so no second download is needed;
- fp32 weights: q8 visibly hurt SmolLM2-135M's answers;
- ``text-generation-with-past`` and opset 17: what transformers.js' decoder loop needs;
- the chat template is copied into ``tokenizer_config.json`` and eos is set to ``<|im_end|>``,
  because transformers.js reads only that file for the template and otherwise never stops.

The export takes a minute or two and needs torch, transformers, optimum-onnx, gguf and accelerate
at build time only (the ``web`` extra); they are checked before any work starts, so a missing
one is one clear line naming the extra. The result is cached, keyed by the source file's size
and mtime, so it runs once per model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelm.catalog import Catalog
from edgelm.errors import EdgelmError, InvalidRequest, MissingExtra
from edgelm.model_cache import ModelStore
from edgelm.settings import Settings, load_settings

log = logging.getLogger("edgelm.web_export")

EXPORT_FORMAT = 1
"""Bump when the exported layout changes, so stale caches are rebuilt."""
MARKER = "edgelm-export.json"
OPSET = 17
TASK = "text-generation-with-past"
ProgressFn = Callable[[str], None]
EXTRA = "web"
REQUIRED_MODULES: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("optimum.exporters.onnx", "optimum-onnx"),
    ("onnx", "onnx"),
    ("gguf", "gguf"),
    ("accelerate", "accelerate"),
)
"""(import name, distribution name) of everything the export needs (the ``web`` extra)."""


class ExportError(EdgelmError):
    """The conversion itself failed (the message names the step and the library's error)."""

    status = 500
    type = "server_error"
    code = "export_failed"


class MissingWebTools(MissingExtra):
    """Build-time tools of the ``web`` extra are missing; names them all and the extra."""

    def __init__(self, missing: list[str]):
        EdgelmError.__init__(
            self,
            f"the web export needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; "
            f"install with: pip install 'edgelm[{EXTRA}]'",
        )


def browser_models_dir(settings: Settings) -> Path:
    """Where exported browser models live; the service serves this directory read-only."""
    return settings.home / "browser-models"


def export_web_model(
    alias: str,
    settings: Settings | None = None,
    *,
    out_root: Path | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Export the cached GGUF of ``alias`` to ``<out_root>/<alias>`` and return that directory.

    Returns at once when an export of the same source file already exists (unless ``force``).
    The build happens in a temporary sibling directory that is renamed into place at the end,
    so an interrupted export never leaves a half-written model for the browser to load.
    """
    settings = settings or load_settings()
    say = progress or (lambda message: log.info("%s", message))
    catalog = Catalog.load(settings.home)
    entry = catalog.resolve(alias)
    if not entry.needs_file:
        raise InvalidRequest(
            f"model '{entry.alias}' runs on the {entry.engine} engine and has no weights to "
            "export; pick a downloaded GGUF model such as smollm2-135m",
            param="model",
        )
    store = ModelStore(settings)
    source = store.path_for(entry)
    if source.suffix.lower() != ".gguf":
        raise InvalidRequest(
            f"model '{entry.alias}' is not a GGUF file ({source.name}); only GGUF models export",
            param="model",
        )
    store.require(entry)
    root = out_root or browser_models_dir(settings)
    target = root / entry.alias
    key = _source_key(source)
    if not force and _is_current(target, key):
        say(f"{entry.alias}: already exported at {target}")
        return target

    check_dependencies()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{entry.alias}-", dir=root) as tmp:
        work = Path(tmp)
        hf_dir = work / "hf"
        out = work / "out"
        say(f"{entry.alias}: loading {source.name} with transformers (dequantizing to fp32)")
        _step("reading the GGUF", _gguf_to_hf, source, hf_dir)
        say(f"{entry.alias}: exporting ONNX ({TASK}, opset {OPSET}, fp32)")
        _step("the ONNX export", _hf_to_onnx, hf_dir, out / "onnx")
        say(f"{entry.alias}: arranging files for transformers.js")
        _arrange(hf_dir, out)
        meta = {**key, "format": EXPORT_FORMAT, "opset": OPSET, "task": TASK, "dtype": "fp32"}
        meta["seconds"] = round(time.perf_counter() - started, 1)
        (out / MARKER).write_text(json.dumps(meta, indent=2), "utf-8")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    say(f"{entry.alias}: exported to {target} in {time.perf_counter() - started:.0f} s")
    return target


def missing_dependencies() -> list[str]:
    """Distributions of the ``web`` extra that cannot be imported here (empty when all are)."""
    missing = []
    for module, dist in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing or broken
            found = False
        if not found:
            missing.append(dist)
    return missing


def check_dependencies() -> None:
    """Fail before minutes of work if a build-time tool is missing, naming the extra."""
    missing = missing_dependencies()
    if missing:
        raise MissingWebTools(missing)


def _step(what: str, fn: Callable[..., None], *args: Any) -> None:
    """Run one conversion step; a library failure becomes one clear :class:`ExportError`."""
    try:
        fn(*args)
    except EdgelmError:
        raise
    except ImportError as exc:
        raise MissingWebTools([exc.name or str(exc)]) from exc
    except Exception as exc:
        raise ExportError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def _source_key(source: Path) -> dict[str, Any]:
    """Size and mtime identify the source cheaply; hashing ~100 MB on every call would not."""
    stat = source.stat()
    return {"source": source.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_current(target: Path, key: dict[str, Any]) -> bool:
    try:
        meta = json.loads((target / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    same = all(meta.get(k) == v for k, v in key.items())
    return same and meta.get("format") == EXPORT_FORMAT and (target / "onnx/model.onnx").exists()


def _gguf_to_hf(source: Path, hf_dir: Path) -> None:
    """Load model and tokenizer from the GGUF itself, then save a plain HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(hf_dir))


def _hf_to_onnx(hf_dir: Path, onnx_dir: Path) -> None:
    from optimum.exporters.onnx import main_export

    main_export(
        str(hf_dir),
        output=str(onnx_dir),
        task=TASK,
        opset=OPSET,
        device="cpu",
        do_validation=False,  # validation runs the model twice more; the e2e test checks it
    )


def _arrange(hf_dir: Path, out: Path) -> None:
    """Lay out the files as transformers.js wants them and fix the tokenizer's metadata."""
    onnx_dir = out / "onnx"
    # optimum writes the config and tokenizer next to model.onnx; transformers.js reads them
    # from the model root and only the weights from onnx/.
    for item in list(onnx_dir.iterdir()):
        if not item.name.startswith("model.onnx"):
            item.rename(out / item.name)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).exists() and not (out / name).exists():
            shutil.copy2(hf_dir / name, out / name)
    _fix_tokenizer(hf_dir, out)


def _fix_tokenizer(hf_dir: Path, out: Path) -> None:
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text("utf-8"))
    template = config.get("chat_template")
    for candidate in (out / "chat_template.jinja", hf_dir / "chat_template.jinja"):
        if not template and candidate.exists():
            template = candidate.read_text("utf-8")
    if not template:
        raise ExportError("the GGUF has no chat template; the browser could not format chats")
    config["chat_template"] = template
    vocab = json.loads((out / "tokenizer.json").read_text("utf-8"))
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    eos = "<|im_end|>" if "<|im_end|>" in ids else config.get("eos_token")
    config["eos_token"] = eos
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
    if eos in ids:
        for name in ("config.json", "generation_config.json"):
            path = out / name
            data = json.loads(path.read_text("utf-8")) if path.exists() else {}
            data["eos_token_id"] = ids[eos]
            path.write_text(json.dumps(data, indent=2), "utf-8")
