"""Fuzz a real ``edgelm service`` process at volume; exit 1 on any undocumented 5xx.

    PYTHONPATH=src python scripts/fuzz.py --cases 10000 --real-cases 600

Starts the service twice, each in its own temporary EDGELM_HOME on a free port: first on the
fake engine (``--cases`` exchanges), then with the real SmolLM2-135M next to the fakes
(``--real-cases``; skipped when the GGUF is not found under ``--models``). Both go through
the harness in ``tests/fuzzing.py`` (schemathesis per operation, schemathesis' stateful
workflows, our own state machine over load/chat/unload/RAG/embeddings/responses) and print a
summary: cases, by status class, each distinct failure with a curl command reproducing it.
The service's own log is kept in the home (printed path) when something fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fuzzing import FAKE_MODELS, FuzzReport, fuzz_service, write_fuzz_home  # noqa: E402
from tests.service_process import spawn_service, stop_service  # noqa: E402


def _tiny_gguf(models: Path) -> Path | None:
    from edgelm.catalog import Catalog

    entry = Catalog.load(Path(tempfile.mkdtemp())).resolve("smollm2-135m")
    path = models / entry.alias / Path(entry.filename).name
    return path if path.is_file() else None


def _progress(started: float, target: int):  # type: ignore[no-untyped-def]
    def show(report: FuzzReport) -> None:
        print(
            f"  … {report.cases}/{target} cases in {time.monotonic() - started:.0f} s, "
            f"{len(report.failures)} failures",
            flush=True,
        )

    return show


def run(label: str, target: int, real_model: Path | None, keep: bool, max_seconds: float) -> bool:
    home = Path(tempfile.mkdtemp(prefix=f"edgelm-fuzz-{label}-"))
    env = write_fuzz_home(home, real_model)
    models = list(FAKE_MODELS)
    chat_model = "fake-a"
    exclude = None
    if real_model is not None:
        models = ["smollm2-135m", "fake-a", "fake-broken"]
        chat_model = "smollm2-135m"
    print(f"== {label}: {target} cases against a service in {home}", flush=True)
    proc, base = spawn_service(home, env=env, timeout_s=120)
    started = time.monotonic()
    try:
        report = fuzz_service(
            base,
            target,
            models,
            chat_model,
            exclude=exclude,
            progress=_progress(started, target),
            max_seconds=max_seconds,
        )
        alive = proc.poll() is None
    finally:
        stop_service(proc)
    print(report.summary())
    print(f"  {time.monotonic() - started:.0f} s; service {'still up' if alive else 'DIED'}")
    good = report.ok and alive and report.cases >= target
    if report.cases < target:
        print(f"  only {report.cases} of {target} cases ran within {max_seconds:.0f} s")
    if good and not keep:
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"  service log: {home / 'service.out'}")
    return good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="Cases on the fake engine.")
    parser.add_argument("--real-cases", type=int, default=600, help="Cases with SmolLM2-135M.")
    parser.add_argument(
        "--models",
        type=Path,
        default=Path("~/.edgelm/models").expanduser(),
        help="Directory holding smollm2-135m/ (read only: it is linked, never written).",
    )
    parser.add_argument("--max-minutes", type=float, default=60.0, help="Time bound per service.")
    parser.add_argument("--keep", action="store_true", help="Keep the homes even on success.")
    args = parser.parse_args()
    good = True
    if args.cases > 0:
        good &= run("fake", args.cases, None, args.keep, args.max_minutes * 60)
    if args.real_cases > 0:
        gguf = _tiny_gguf(args.models)
        if gguf is None:
            print(f"== real: skipped, no SmolLM2-135M GGUF under {args.models}")
        else:
            good &= run("real", args.real_cases, gguf, args.keep, args.max_minutes * 60)
    print("fuzz: PASS" if good else "fuzz: FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
