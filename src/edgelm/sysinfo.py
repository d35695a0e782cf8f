"""What this machine offers: CPU and SIMD features, memory, GPUs, engines, ONNX providers.

Versions come from package metadata, so no heavy library is imported just to be listed, and
every probe that can fail degrades to "absent" rather than an error: ``system info`` must work
on any machine, GPU or not, and a bench report records it next to every figure.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "neon",
    "asimd",
    "sve",
)
ENGINE_PACKAGES = {
    "llamacpp": "llama-cpp-python",
    "onnx": "onnxruntime-genai",
    "remote": "httpx",
}
# Libraries behind the engines (and the GPU probe), by distribution name.
LIBRARIES = (
    "llama-cpp-python",
    "onnxruntime-genai",
    "onnxruntime",
    "httpx",
    "nvidia-ml-py",
    "py-cpuinfo",
)
CPUINFO = Path("/proc/cpuinfo")
RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _proc_cpuinfo(path: Path) -> tuple[str | None, set[str]]:
    """Model name and feature flags from Linux's /proc/cpuinfo (x86 and Arm spellings)."""
    model: str | None = None
    flags: set[str] = set()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware", "cpu model") and value.strip() and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _cpuinfo_module() -> ModuleType | None:
    """py-cpuinfo, when installed. Optional: it takes ~1 s, so only used without /proc."""
    if not _installed("cpuinfo"):
        return None
    try:
        import cpuinfo

        return cpuinfo
    except Exception:  # a broken optional helper is as good as none
        return None


def cpu_info(cpuinfo_path: Path = CPUINFO) -> dict[str, Any]:
    model, flags = _proc_cpuinfo(cpuinfo_path)
    if model is None and not flags:  # macOS, Windows, or a container hiding /proc
        module = _cpuinfo_module()
        if module is not None:
            try:
                info = module.get_cpu_info()
                model = info.get("brand_raw") or None
                flags = set(info.get("flags") or [])
            except Exception:  # the CPU is then described by platform alone
                pass
    machine = platform.machine()
    # Arm calls NEON "asimd" on 64-bit Linux, and macOS on Apple silicon reports no flags.
    if "asimd" in flags or machine.lower() in ("arm64", "aarch64"):
        flags.add("neon")
    return {
        "model": model or platform.processor() or machine,
        "architecture": machine,
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "logical_cores": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        "simd": [flag for flag in SIMD_FLAGS if flag in flags],
    }


def gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs through NVML when the library and a driver are present; else none."""
    if not _installed("pynvml"):
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no device: no GPU to report
        return []
    out: list[dict[str, Any]] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_total_bytes": int(memory.total),
                    "memory_used_bytes": int(memory.used),
                }
            )
    except Exception:  # a device that cannot be queried is left out, not fatal
        pass
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out


def onnx_providers() -> list[str]:
    if not _installed("onnxruntime"):
        return []
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception:  # a broken install is reported as no providers
        return []


def onnx_genai_providers() -> list[str]:
    """Execution providers the onnx engine can use, best first: each GPU provider that both
    onnxruntime-genai and its ONNX Runtime report, then the CPU. The engine still tries a
    GPU provider when a model opens and falls back to the CPU if it fails."""
    if not _installed("onnxruntime_genai"):
        return []
    try:
        import onnxruntime_genai as og

        from edgelm.engines.onnx import provider_candidates, runtime_providers

        return provider_candidates(og, enable_gpu=True, available=runtime_providers())
    except Exception:  # a broken install is reported as no providers
        return []


def llama_cpp_system_info() -> str | None:
    """llama.cpp's own account of the CPU features it was built with and uses (~0.3 s)."""
    if not _installed("llama_cpp"):
        return None
    try:
        import llama_cpp

        raw = llama_cpp.llama_print_system_info()
    except Exception:  # the engine's own check reports a broken install with a fix
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return text.strip().rstrip("|").strip() or None


def engines() -> dict[str, str]:
    """Engine name → version of the library behind it, or 'not installed'."""
    out = {"fake": "built in"}
    for name, dist in ENGINE_PACKAGES.items():
        out[name] = _version(dist) or "not installed"
    return out


def libraries() -> dict[str, str | None]:
    """Distribution → installed version (None when absent)."""
    return {dist: _version(dist) for dist in LIBRARIES}


def energy_sources(gpu_list: list[dict[str, Any]] | None = None) -> list[str]:
    """Where a bench could read energy: Intel/AMD RAPL (often root-only) and NVML.

    ``gpu_list`` saves a second NVML probe when the caller already has it.
    """
    sources = []
    if _readable(RAPL):
        sources.append("rapl")
    if gpus() if gpu_list is None else gpu_list:
        sources.append("nvml")
    return sources


def system_info(probe_llama_cpp: bool = True) -> dict[str, Any]:
    """Everything above in one dict. ``probe_llama_cpp=False`` skips loading llama.cpp."""
    memory = psutil.virtual_memory()
    gpu_list = gpus()
    return {
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "ram_total_bytes": int(memory.total),
        "ram_available_bytes": int(memory.available),
        "gpus": gpu_list,
        "engines": engines(),
        "libraries": libraries(),
        "onnx_providers": onnx_providers(),
        "onnx_genai_providers": onnx_genai_providers(),
        "llama_cpp_system_info": llama_cpp_system_info() if probe_llama_cpp else None,
        "energy_sources": energy_sources(gpu_list),
    }


def _readable(path: Path) -> bool:
    try:
        path.read_text()
    except OSError:
        return False
    return True
