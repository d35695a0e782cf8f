"""system info: always answers, whatever the machine lacks."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import platform
import sys
import time
import types
from pathlib import Path

import httpx

from edgelm import sysinfo


def test_system_info_shape() -> None:
    info = sysinfo.system_info()
    assert info["cpu"]["physical_cores"] >= 1 and info["cpu"]["logical_cores"] >= 1
    assert isinstance(info["cpu"]["simd"], list)
    assert info["ram_total_bytes"] > info["ram_available_bytes"] > 0
    assert info["engines"]["fake"] == "built in"
    assert set(info["engines"]) == {"fake", "llamacpp", "onnx", "remote"}
    assert isinstance(info["gpus"], list) and isinstance(info["onnx_providers"], list)


def test_missing_libraries_are_reported_not_raised(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("pynvml", "onnxruntime") else real(name, *a),
    )
    monkeypatch.setattr(sysinfo, "_version", lambda dist: None)
    assert sysinfo.gpus() == [] and sysinfo.onnx_providers() == []
    assert sysinfo.engines()["llamacpp"] == "not installed"


def test_system_info_types_and_speed() -> None:
    started = time.perf_counter()
    info = sysinfo.system_info()
    assert time.perf_counter() - started < 1.0
    assert isinstance(info["os"], str) and info["python"] == platform.python_version()
    cpu = info["cpu"]
    assert isinstance(cpu["model"], str) and cpu["model"]
    assert cpu["logical_cores"] >= cpu["physical_cores"]
    assert set(cpu["simd"]) <= set(sysinfo.SIMD_FLAGS)
    assert set(info["libraries"]) == set(sysinfo.LIBRARIES)
    assert all(v is None or isinstance(v, str) for v in info["libraries"].values())
    assert info["libraries"]["httpx"] == info["engines"]["remote"] == httpx.__version__
    assert isinstance(info["energy_sources"], list)
    llama = info["llama_cpp_system_info"]
    if info["engines"]["llamacpp"] == "not installed":
        assert llama is None
    else:
        assert isinstance(llama, str) and not llama.endswith("|")
    json.dumps(info)  # the CLI prints it as JSON


def test_missing_modules_are_unavailable(monkeypatch) -> None:
    real = importlib.util.find_spec
    hidden = ("llama_cpp", "cpuinfo", "pynvml", "onnxruntime")
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in hidden else real(name, *a),
    )
    monkeypatch.setattr(sysinfo, "_version", lambda dist: "1.0" if dist == "httpx" else None)
    info = sysinfo.system_info()
    assert info["llama_cpp_system_info"] is None and info["gpus"] == []
    assert info["engines"] == {
        "fake": "built in",
        "llamacpp": "not installed",
        "onnx": "not installed",
        "remote": "1.0",
    }
    assert info["libraries"]["onnxruntime"] is None and info["onnx_providers"] == []
    # without /proc/cpuinfo and without py-cpuinfo, the CPU is still described
    cpu = sysinfo.cpu_info(Path("/nonexistent/cpuinfo"))
    assert cpu["model"] and cpu["physical_cores"] >= 1


def test_proc_cpuinfo_x86_and_arm(tmp_path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma "
        "f16c avx512f avx512_vnni\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\n"
    )
    cpu = sysinfo.cpu_info(x86)
    assert cpu["model"] == "Test CPU 9000"
    assert cpu["simd"][:6] == ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f"]
    assert "avx512_vnni" in cpu["simd"]
    if cpu["architecture"] not in ("arm64", "aarch64"):
        assert "neon" not in cpu["simd"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm sve\nCPU part\t: 0xd0c\n")
    assert {"neon", "asimd", "sve"} <= set(sysinfo.cpu_info(arm)["simd"])


def test_py_cpuinfo_fallback_without_proc(monkeypatch) -> None:
    fake = types.SimpleNamespace(
        get_cpu_info=lambda: {"brand_raw": "Apple M9", "flags": ["neon", "fp16"]}
    )
    monkeypatch.setattr(sysinfo, "_cpuinfo_module", lambda: fake)
    cpu = sysinfo.cpu_info(Path("/nonexistent/cpuinfo"))
    assert cpu["model"] == "Apple M9" and "neon" in cpu["simd"]


def _fake_pynvml(monkeypatch, fail_init: bool = False) -> None:
    module = types.ModuleType("pynvml")
    module.__spec__ = importlib.machinery.ModuleSpec("pynvml", None)

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    module.nvmlInit = init
    module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetCount = lambda: 1
    module.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    module.nvmlDeviceGetName = lambda h: b"Fake GPU"
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=8 << 30, used=1 << 30)
    monkeypatch.setitem(sys.modules, "pynvml", module)


def test_gpus_through_nvml(monkeypatch) -> None:
    _fake_pynvml(monkeypatch)
    assert sysinfo.gpus() == [
        {
            "index": 0,
            "name": "Fake GPU",
            "memory_total_bytes": 8 << 30,
            "memory_used_bytes": 1 << 30,
        }
    ]
    assert "nvml" in sysinfo.system_info(probe_llama_cpp=False)["energy_sources"]
    _fake_pynvml(monkeypatch, fail_init=True)
    assert sysinfo.gpus() == []


def test_rapl_energy_source(monkeypatch, tmp_path) -> None:
    counter = tmp_path / "energy_uj"
    monkeypatch.setattr(sysinfo, "RAPL", counter)
    assert "rapl" not in sysinfo.energy_sources()
    counter.write_text("123456\n")
    assert "rapl" in sysinfo.energy_sources()
    assert "rapl" in sysinfo.system_info(probe_llama_cpp=False)["energy_sources"]
