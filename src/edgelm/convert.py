"""``edgelm model convert ALIAS --to onnx``: a cached GGUF model → an ONNX Runtime GenAI model.

The path (see docs in DESIGN.md, "Facts about this environment"):

1. the GGUF's tensors are dequantised one at a time into an fp16 checkpoint, with
   transformers' GGUF support for the names, configuration and tokenizer
   (:mod:`edgelm.convert_worker`);
2. onnxruntime-genai's model builder turns that into an ONNX model at the chosen precision
   (int4 by default) for the chosen execution provider, each weight quantised as it is
   emitted (:mod:`edgelm.convert_build`);
3. the result is placed atomically at ``<models_dir>/<alias>-onnx-<provider>-<precision>/``
   and registered in ``$EDGELM_HOME/models.toml`` as the variant
   ``<alias>:onnx-<provider>-<precision>``, which the service loads with the onnx engine.

Why a separate tool environment: the model builder of onnxruntime-genai 0.18 imports names
that exist only in transformers 5.x, while edgelm's own environment keeps transformers < 4.58
for optimum's ONNX web export. So the conversion tools (torch, transformers 5, the builder)
live in their own virtualenv, ``$EDGELM_HOME/tools/onnx-convert`` by default, created on the
first conversion with pinned requirements and reused afterwards. Installing them is the one
step that needs the package index, and it is announced before it starts; nothing here reaches
the network silently (the conversion steps run with the Hugging Face hub switched off).

Memory: the first version of this path held whole fp32 copies of the model (transformers'
dequantised model, the builder's fp32 graph, its serialised copy and the quantiser's): 11 bytes
per parameter, ~17 GB for Qwen2.5-1.5B. Streaming both steps keeps one fp16 copy of the model
plus slices, so the 1.5B converts within 6 GB. Each step runs in its own process, so nothing of
step 1 is held during step 2; their peak resident memory is measured (``wait4``), reported and
kept in the model's ``edgelm-convert.json``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from edgelm.catalog import Catalog, CatalogEntry
from edgelm.convert_progress import REPORTED_PEAK
from edgelm.errors import EdgelmError, InvalidRequest
from edgelm.settings import Settings

FORMAT = 1
"""Bump when the converted layout changes, so cached conversions are rebuilt."""
MARKER = "edgelm-convert.json"
LOG_NAME = "convert.log"
PRECISIONS = ("int4", "int8", "fp16", "fp32")
PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
FALLBACK_GENAI_VERSION = "0.18.0"
TOOLS_STAMP = "edgelm-tools.json"
# Measured here with the streaming steps (peaks of the two steps): Qwen2.5-1.5B 2.95 and
# 3.70 GB, Qwen2.5-0.5B 2.2 and 1.64 GB, SmolLM2 0.81 and 0.83 GB: about 1.7 bytes per
# parameter over ~1.4 GB of tools, tokenizer and embedding work. The whole-model path took 11
# bytes per parameter (6.5 and 17 GB).
PEAK_BYTES_PER_PARAM = 1.7
PEAK_BASE_BYTES = 1_400_000_000
WARN_ABOVE_BYTES = 4 * 2**30

ProgressFn = Callable[[str], None]
"""Receives one line of progress: a stage heading or the last line a tool printed."""


class ConvertError(EdgelmError):
    """A conversion step failed; the message names the step and where its log is."""

    status = 500
    type = "server_error"
    code = "convert_failed"


# -- naming -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A converted form of a catalog model: ``qwen2.5-0.5b`` → ``qwen2.5-0.5b:onnx-cpu-int4``."""

    base: str
    provider: str = "cpu"
    precision: str = "int4"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidRequest(
                f"unknown precision '{self.precision}'; choose one of {', '.join(PRECISIONS)}",
                param="precision",
            )
        if self.provider not in PROVIDERS:
            raise InvalidRequest(
                f"unknown execution provider '{self.provider}'; choose one of "
                f"{', '.join(PROVIDERS)}",
                param="provider",
            )
        if ":" in self.base:
            raise InvalidRequest(
                f"'{self.base}' is already a converted variant; convert its base model",
                param="model",
            )

    @property
    def tag(self) -> str:
        return f"onnx-{self.provider}-{self.precision}"

    @property
    def alias(self) -> str:
        """The catalog name of the converted model."""
        return f"{self.base}:{self.tag}"

    @property
    def dirname(self) -> str:
        """Its directory under the model cache (no ':' so it is a valid name everywhere)."""
        return f"{self.base}-{self.tag}"


# -- running tools ----------------------------------------------------------------------------


@dataclass
class RunResult:
    returncode: int
    peak_rss_bytes: int | None = None
    tail: list[str] = field(default_factory=list)


Runner = Callable[[Sequence[str], Path, dict[str, str], ProgressFn], RunResult]
"""Runs one command, appending its output to a log file and passing lines to a callback."""


def run_logged(
    command: Sequence[str], log: Path, env: dict[str, str], on_line: ProgressFn
) -> RunResult:
    """Run ``command``, log its output, report its lines, and measure its peak memory.

    Tools draw progress bars with carriage returns; each ``\\r`` or ``\\n`` ends a line here,
    so the callback sees the bar move. The peak resident set size is the one edgelm's own steps
    report on their last line (their VmHWM); for other commands it comes from ``wait4``, which
    on Linux also counts the memory of this process when it started the command.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    own_peak: int | None = None
    with log.open("ab") as sink:
        sink.write(f"$ {' '.join(command)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdout is not None
        pending = b""
        while True:
            data = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not data:
                break
            sink.write(data)
            pending += data
            *lines, pending = re.split(rb"[\r\n]", pending)
            for raw in lines:
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    tail = [*tail[-29:], line]
                    on_line(line)
                    reported = REPORTED_PEAK.search(line)
                    if reported:
                        own_peak = max(own_peak or 0, int(float(reported.group(1)) * 1e9))
        peak: int | None = None
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            # ru_maxrss is in KiB on Linux, bytes on macOS.
            peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        else:  # pragma: no cover - Windows
            proc.wait()
        proc.stdout.close()
    return RunResult(proc.returncode, own_peak or peak, tail)


def tool_env_vars() -> dict[str, str]:
    """The environment for conversion steps: the hub switched off, output unbuffered."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        "PIP_NO_INPUT": "1",
    }


# -- the tool environment ---------------------------------------------------------------------


def genai_runtime_version() -> str:
    """The onnxruntime-genai this edgelm runs models with; the builder must match it."""
    try:
        return importlib.metadata.version("onnxruntime-genai")
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_GENAI_VERSION


def tool_requirements(genai_version: str | None = None) -> list[str]:
    """Pinned requirements of the conversion tools.

    torch is pinned exactly: its CPU wheel of this version is what the package index offers
    here, and an unpinned torch on Linux pulls gigabytes of CUDA libraries. transformers is
    pinned to the 5.x release the GGUF loading in :mod:`edgelm.convert_worker` was checked
    with (how 5.x dequantises GGUF changed between minor releases).
    """
    return [
        "torch==2.13.0",
        "transformers==5.23.0",
        "accelerate>=1.0",
        "gguf>=0.10",
        "onnx>=1.17",
        "onnx-ir>=0.1",
        f"onnxruntime-genai=={genai_version or genai_runtime_version()}",
    ]


class ToolEnv:
    """A virtualenv holding the conversion tools, created once and reused.

    A stamp file records the requirements it was built with; when they change (a new edgelm,
    or a new onnxruntime-genai in the main environment), the next conversion updates it.
    """

    def __init__(self, root: Path, requirements: Sequence[str] | None = None):
        self.root = Path(root).expanduser()
        self.requirements = list(requirements or tool_requirements())

    @classmethod
    def for_settings(cls, settings: Settings) -> ToolEnv:
        root = settings.compute.onnx.convert_env or settings.home / "tools" / "onnx-convert"
        return cls(root)

    @property
    def python(self) -> Path:
        if sys.platform == "win32":  # pragma: no cover
            return self.root / "Scripts" / "python.exe"
        return self.root / "bin" / "python"

    def _stamp(self) -> dict[str, object]:
        return {"requirements": self.requirements, "python": sys.version.split()[0]}

    def is_ready(self) -> bool:
        try:
            stamp = json.loads((self.root / TOOLS_STAMP).read_text("utf-8"))
        except (OSError, ValueError):
            return False
        return self.python.exists() and stamp == self._stamp()

    def ensure(self, say: ProgressFn, runner: Runner = run_logged) -> Path:
        """Create or update the environment if needed; return its Python."""
        if self.is_ready():
            return self.python
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.root.with_name(self.root.name + ".lock")):
            if self.is_ready():  # another conversion built it while we waited
                return self.python
            log = self.root.with_name(self.root.name + "-install.log")
            log.unlink(missing_ok=True)
            env = tool_env_vars()
            if not self.python.exists():
                say(f"creating the conversion tool environment at {self.root}")
                result = runner([sys.executable, "-m", "venv", str(self.root)], log, env, say)
                if result.returncode != 0:
                    raise ConvertError(
                        f"could not create a virtualenv at {self.root} "
                        f"(exit {result.returncode}); see {log}"
                    )
            say(
                "installing the conversion tools from the package index, once: "
                + ", ".join(self.requirements)
                + f" (about 1.5 GB, into {self.root})"
            )
            command = [
                str(self.python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                *self.requirements,
            ]
            result = runner(command, log, env, say)
            if result.returncode != 0:
                tail = " | ".join(result.tail[-3:])
                raise ConvertError(
                    f"installing the conversion tools failed (exit {result.returncode}): {tail}. "
                    f"Full log: {log}"
                )
            (self.root / TOOLS_STAMP).write_text(json.dumps(self._stamp(), indent=2), "utf-8")
            say("conversion tools ready")
        return self.python


# -- memory -----------------------------------------------------------------------------------


def parameter_count(entry: CatalogEntry, source: Path) -> float:
    """Parameters from the catalog ("0.5B", "135M"), else guessed from a ~4.5-bit GGUF's size."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kKmMbBtT])\s*", entry.parameters or "")
    if match:
        scale = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
        return float(match.group(1)) * scale
    return source.stat().st_size * 8 / 4.5


def estimate_peak_bytes(entry: CatalogEntry, source: Path) -> int:
    return int(parameter_count(entry, source) * PEAK_BYTES_PER_PARAM + PEAK_BASE_BYTES)


def memory_warning(peak: int, available: int | None = None) -> str | None:
    """A warning to show before a conversion that needs a lot of memory, or None."""
    available = psutil.virtual_memory().available if available is None else available
    gb = 1e9
    if peak > available:
        return (
            f"this conversion needs about {peak / gb:.1f} GB of memory at its peak, and only "
            f"{available / gb:.1f} GB is available: it may be killed by the system. Close other "
            "programs or convert on a larger machine."
        )
    if peak >= WARN_ABOVE_BYTES:
        return (
            f"this conversion needs about {peak / gb:.1f} GB of memory at its peak "
            f"({available / gb:.1f} GB available)."
        )
    return None


# -- the conversion ---------------------------------------------------------------------------


@dataclass
class ConvertResult:
    alias: str
    path: Path
    cached: bool
    seconds: float = 0.0
    peak_rss_bytes: int | None = None
    size_bytes: int = 0
    stages: dict[str, dict[str, float | int | None]] = field(default_factory=dict)


def convert_to_onnx(
    alias: str,
    settings: Settings,
    *,
    precision: str = "int4",
    provider: str = "cpu",
    force: bool = False,
    progress: ProgressFn | None = None,
    runner: Runner = run_logged,
    tool_env: ToolEnv | None = None,
    verify: bool = True,
) -> ConvertResult:
    """Convert the cached GGUF of ``alias``; return where the ONNX model is and what it cost.

    Returns at once, re-registering the variant, when a conversion of the same source file
    with the same options exists (unless ``force``). The model is built in a hidden temporary
    directory beside its final place and renamed into place only when complete and loadable,
    so an interrupted conversion never leaves a half model for the service to load.
    """
    from edgelm.model_cache import ModelStore

    say = progress or (lambda _line: None)
    catalog = Catalog.load(settings.home)
    entry = catalog.resolve(alias)
    if entry.options.get("variant_of"):
        raise InvalidRequest(
            f"'{entry.alias}' is already a converted model; convert "
            f"'{entry.options['variant_of']}' instead",
            param="model",
        )
    variant = Variant(entry.alias, provider, precision)
    if not entry.needs_file:
        raise InvalidRequest(
            f"'{entry.alias}' runs on the {entry.engine} engine and has no weights to convert",
            param="model",
        )
    store = ModelStore(settings)
    source = store.require(entry)
    with source.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise InvalidRequest(
                f"'{entry.alias}' ({source.name}) is not a GGUF file; only GGUF models convert",
                param="model",
            )
    root = settings.models_dir
    target = root / variant.dirname
    key = _source_key(source, variant)
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{variant.dirname}.lock"):
        if not force and _is_current(target, key):
            say(f"{variant.alias}: already converted at {target}")
            meta = json.loads((target / MARKER).read_text("utf-8"))
            _register(catalog, entry, variant, target)
            return ConvertResult(
                alias=variant.alias,
                path=target,
                cached=True,
                seconds=float(meta.get("seconds", 0.0)),
                peak_rss_bytes=meta.get("peak_rss_bytes"),
                size_bytes=_dir_size(target),
                stages=meta.get("stages", {}),
            )
        for stale in root.glob(f".{variant.dirname}-*"):  # left by an interrupted conversion
            shutil.rmtree(stale, ignore_errors=True)
        warning = memory_warning(estimate_peak_bytes(entry, source))
        if warning:
            say(f"warning: {warning}")
        env = tool_env or ToolEnv.for_settings(settings)
        if not env.is_ready():
            say("step 0/3: the conversion tools are not installed yet")
        python = env.ensure(say, runner)
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{variant.dirname}-", dir=root))
        try:
            result = _build(
                python, source, work, variant, say, runner, verify=verify, started=started
            )
            out = work / "out"
            meta = {
                **key,
                "seconds": round(time.perf_counter() - started, 1),
                "peak_rss_bytes": result.peak_rss_bytes,
                "stages": result.stages,
                "tools": env.requirements,
            }
            (out / MARKER).write_text(json.dumps(meta, indent=2), "utf-8")
            if (work / LOG_NAME).is_file():
                shutil.move(str(work / LOG_NAME), out / LOG_NAME)
            if target.exists():
                target.rename(work / "previous")
            out.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _register(catalog, entry, variant, target)
    result.path = target
    result.size_bytes = _dir_size(target)
    result.seconds = round(time.perf_counter() - started, 1)
    say(f"{variant.alias}: converted in {result.seconds:.0f} s")
    return result


def _build(
    python: Path,
    source: Path,
    work: Path,
    variant: Variant,
    say: ProgressFn,
    runner: Runner,
    *,
    verify: bool,
    started: float,
) -> ConvertResult:
    """Run the steps in ``work``; the finished model is left in ``work/out``."""
    log = work / LOG_NAME
    env = tool_env_vars()
    hf_dir, out = work / "hf", work / "out"
    worker = Path(__file__).with_name("convert_worker.py")
    builder = Path(__file__).with_name("convert_build.py")
    steps = [
        (
            "dequantise",
            f"step 1/3: {source.name} → fp16 checkpoint, one tensor at a time",
            [str(python), "-I", str(worker), "--gguf", str(source), "--out", str(hf_dir)],
        ),
        (
            "build",
            f"step 2/3: ONNX {variant.precision} for {variant.provider} "
            "(onnxruntime-genai model builder)",
            [
                str(python),
                "-I",
                str(builder),
                "-i",
                str(hf_dir),
                "-o",
                str(out),
                "-p",
                variant.precision,
                "-e",
                variant.provider,
                "-c",
                str(work / "cache"),
            ],
        ),
    ]
    stages: dict[str, dict[str, float | int | None]] = {}
    peak = 0
    for name, heading, command in steps:
        say(heading)
        t0 = time.perf_counter()
        run = runner(command, log, env, say)
        seconds = round(time.perf_counter() - t0, 1)
        stages[name] = {"seconds": seconds, "peak_rss_bytes": run.peak_rss_bytes}
        peak = max(peak, run.peak_rss_bytes or 0)
        if run.returncode != 0:
            tail = " | ".join(run.tail[-3:]) or f"exit code {run.returncode}"
            raise ConvertError(f"{heading.split(': ', 1)[1]} failed: {tail}. Full log: {log}")
        if name == "dequantise":
            say(f"checkpoint ready ({seconds:.0f} s, peak {_gb(run.peak_rss_bytes)})")
    if not (out / "genai_config.json").is_file():
        raise ConvertError(f"the model builder wrote no genai_config.json; see {log}")
    _copy_chat_template(hf_dir, out)
    shutil.rmtree(hf_dir, ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    if verify:
        say("step 3/3: checking that onnxruntime-genai loads the model")
        t0 = time.perf_counter()
        _verify_loads(out, variant)
        stages["verify"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": None}
    return ConvertResult(
        alias=variant.alias,
        path=out,
        cached=False,
        seconds=round(time.perf_counter() - started, 1),
        peak_rss_bytes=peak or None,
        stages=stages,
    )


def _copy_chat_template(hf_dir: Path, out: Path) -> None:
    """Make sure the ONNX model's tokenizer_config.json carries the chat template."""
    path = out / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return
    if config.get("chat_template"):
        return
    for candidate in (hf_dir / "tokenizer_config.json", out / "chat_template.jinja"):
        template = None
        if candidate.suffix == ".jinja" and candidate.is_file():
            template = candidate.read_text("utf-8")
        elif candidate.is_file():
            try:
                template = json.loads(candidate.read_text("utf-8")).get("chat_template")
            except ValueError:
                template = None
        if template:
            config["chat_template"] = template
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
            return


def _verify_loads(out: Path, variant: Variant) -> None:
    """Open the model with the runtime that will serve it: catches a builder/runtime mismatch
    before the result is placed. Skipped where the runtime is absent or cannot run it here."""
    if variant.provider != "cpu":
        return
    try:
        import onnxruntime_genai as og
    except ImportError:
        return
    try:
        config = og.Config(str(out))
        config.clear_providers()
        model = og.Model(config)
        og.Tokenizer(model)
    except Exception as exc:
        raise ConvertError(
            f"the converted model does not load in onnxruntime-genai "
            f"{genai_runtime_version()}: {exc}"
        ) from None


def _register(catalog: Catalog, entry: CatalogEntry, variant: Variant, target: Path) -> None:
    """Add (or refresh) the variant in the user's models.toml."""
    catalog.add_user_entry(
        CatalogEntry(
            alias=variant.alias,
            name=f"{entry.name or entry.alias} (ONNX {variant.precision}, {variant.provider})",
            chat_template="tokenizer",
            tier=entry.tier,
            description=(
                f"{entry.alias} converted to ONNX Runtime GenAI ({variant.precision}, "
                f"{variant.provider} provider) by edgelm model convert."
            ),
            parameters=entry.parameters,
            quantization=f"{variant.precision} (ONNX)",
            context_length=entry.context_length,
            size_bytes=_dir_size(target),
            license=entry.license,
            engine="onnx",
            path=target / "genai_config.json",
            filename="genai_config.json",
            options={
                "variant_of": entry.alias,
                "precision": variant.precision,
                "provider": variant.provider,
            },
        )
    )


def _source_key(source: Path, variant: Variant) -> dict[str, object]:
    """What a conversion was made from: size and mtime identify the GGUF cheaply."""
    stat = source.stat()
    return {
        "source": source.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "precision": variant.precision,
        "provider": variant.provider,
        "format": FORMAT,
    }


def _is_current(target: Path, key: dict[str, object]) -> bool:
    try:
        meta = json.loads((target / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return (
        all(meta.get(k) == v for k, v in key.items()) and (target / "genai_config.json").is_file()
    )


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _gb(value: int | None) -> str:
    return "?" if not value else f"{value / 1e9:.1f} GB"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an OS file lock (released by the OS if the process dies, so it never goes stale).

    Two conversions of the same model, or two first conversions building the tool
    environment, would otherwise write into the same place. ``flock`` locks belong to the
    open file, so two threads of one process are kept apart as well.
    """
    with path.open("a+b") as handle:
        if sys.platform == "win32":  # pragma: no cover
            import msvcrt

            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    time.sleep(0.5)
            yield
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
