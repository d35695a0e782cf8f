"""The context-scaling scenario: how time to first token, prefill speed and decode speed
change with the prompt's length (512, 2k, 4k, 8k tokens), for any target.

Short, repeated prompts hide prefill behind the prefix cache; the prompts RAG and agents send
are long and new each time. So every request here gets a prompt no earlier request shares
beyond the chat template: a unique opening line, then words drawn at random. Targets tokenize
differently (and an HTTP target's tokenizer is unknown here), so each target is calibrated
first: two probes (64 and 512 words, one output token) give its tokens per word and the
template's overhead, and the word count for each length follows from them. Reports use the
prompt token counts the target itself returned.

Each length is a scenario whose prompt ids read ``ctx<length>-<n>``: the length survives a
round trip through JSON, CSV and the run history without a field of its own. With
``concurrency`` > 1 the answers' lengths vary by ±50% around ``max_tokens`` (seeded), so
streams end at different times and a new prompt arrives while the others decode: the case
chunked prefill is for. ``gap ratio`` is, per request, the longest gap between two tokens
over the median gap; the report shows the worst request's.
"""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgelm.bench.results import BenchRun, Scenario
from edgelm.bench.runner import BenchConfig, ProgressFn, no_progress, run_scenario
from edgelm.bench.stats import percentile
from edgelm.bench.targets import Target
from edgelm.bench.workloads import Prompt
from edgelm.reporting import figure_data_uri, mpl_text, new_figure

DEFAULT_LENGTHS = (512, 2048, 4096, 8192)
PROBE_WORDS = (64, 512)
# Tokens per word assumed when a target reports no token counts (English prose, BPE).
FALLBACK_TOKENS_PER_WORD = 1.3
_ID = re.compile(r"^ctx(\d+)-")
_WORDS = ["river", "stone", "garden", "window", "market", "yellow", "quiet", "letter", "morning", "bridge", "station", "paper", "number", "silver", "winter", "orange", "forest", "table", "engine", "travel", "simple", "mountain", "planet", "coffee", "doctor", "island", "summer", "kitchen", "money", "button", "pencil", "basket", "bottle", "camera", "candle", "castle", "circle", "cloud", "copper", "desert", "dinner", "dragon", "energy", "family", "farmer", "field", "finger", "flower", "friend", "future", "glass", "guitar", "hammer", "harbor", "health", "history", "honey", "horse", "hotel", "hunter", "jacket", "jungle", "ladder", "lemon", "library", "light", "machine", "magnet", "meadow", "metal", "middle", "mirror", "moment", "motor", "music", "nature", "needle", "night", "ocean", "office", "palace", "parent", "pepper", "picture", "pillow", "pocket", "potato", "powder", "prince", "rabbit", "rocket", "saddle", "school", "season", "shadow", "signal", "sister", "soldier", "spider", "spring", "square", "street", "sugar", "sunset", "teacher", "theater", "ticket", "tiger", "tower", "train", "valley", "village", "violin", "wagon", "water", "wheel", "whistle", "wonder"]


@dataclass
class ContextConfig:
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    """Prompt lengths to measure, in the target's tokens."""
    rounds: int = 3
    """Requests per length (at least ``concurrency``)."""
    max_tokens: int = 64
    concurrency: int = 1
    seed: int = 0
    max_seconds: float = 600.0


def synthetic_text(words: int, tag: str, seed: int) -> str:
    """``words`` random words after an opening line made from ``tag`` and ``seed``: unique
    from its first token, and of the same length for every tag (the calibration's probes
    then count the same overhead as the measured prompts)."""
    rng = random.Random(f"{seed}:{tag}")
    body = " ".join(rng.choice(_WORDS) for _ in range(max(0, words)))
    return f"Note {rng.randrange(16**8):08x}. Read these words, then write a story.\n{body}"


@dataclass
class Calibration:
    """A target's prompt tokens as a function of words: ``overhead + per_word * words``."""

    per_word: float
    overhead: float

    def words_for(self, tokens: int) -> int:
        return max(1, round((tokens - self.overhead) / self.per_word))


def calibrate(target: Target, seed: int) -> Calibration:
    """Two probes with one output token each; they also warm the target up."""
    counts = []
    for words in PROBE_WORDS:
        prompt = Prompt(
            id=f"probe-{words}",
            messages=[{"role": "user", "content": synthetic_text(words, f"p{words}", seed)}],
        )
        result = target.request(prompt, {"max_tokens": 1, "temperature": 0.0})
        counts.append(result.prompt_tokens if result.ok else 0)
    low, high = counts
    if low <= 0 or high <= low:
        return Calibration(FALLBACK_TOKENS_PER_WORD, 0.0)
    per_word = (high - low) / (PROBE_WORDS[1] - PROBE_WORDS[0])
    return Calibration(per_word, low - per_word * PROBE_WORDS[0])


def context_prompts(
    length: int, calibration: Calibration, config: ContextConfig
) -> list[Prompt]:
    """The unique prompts of one length (ids ``ctx<length>-<n>``); the same for every target
    of a run (each is a different server, with a cache of its own)."""
    count = max(config.rounds, config.concurrency)
    rng = random.Random(f"{config.seed}:{length}:lengths")
    prompts = []
    for n in range(count):
        tag = f"{length}-{n}"
        max_tokens = None
        if config.concurrency > 1:  # streams out of step: prompts arrive while others decode
            max_tokens = max(2, round(config.max_tokens * rng.uniform(0.5, 1.5)))
        text = synthetic_text(calibration.words_for(length), tag, config.seed)
        prompts.append(
            Prompt(
                id=f"ctx{length}-{n}",
                messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens,
            )
        )
    return prompts


def run_context_scaling(
    targets: Sequence[Target],
    config: ContextConfig,
    progress: ProgressFn = no_progress,
    system: dict[str, Any] | None = None,
    name: str = "",
) -> BenchRun:
    """Every target through each prompt length (shortest first), ``config.rounds`` unique
    prompts each; answers run to their max_tokens (``ignore_eos``) at temperature 0."""
    bench = BenchConfig(
        requests=config.rounds,
        warmup=0,
        concurrency=[config.concurrency],
        max_tokens=config.max_tokens,
        seed=config.seed,
        max_seconds=config.max_seconds,
        cold=False,
        ignore_eos=True,
    )
    run = BenchRun(
        name=name,
        config={
            "scenario": "context",
            "lengths": list(config.lengths),
            "rounds": config.rounds,
            "max_tokens": config.max_tokens,
            "concurrency": config.concurrency,
            "seed": config.seed,
            "ignore_eos": True,
            "targets": [t.name for t in targets],
            "calibration": {},
        },
        system=system or {},
    )
    for target in targets:
        try:
            cold = target.open()
            calibration = calibrate(target, config.seed)
            run.config["calibration"][target.name] = vars(calibration)
            for length in sorted(config.lengths):
                prompts = context_prompts(length, calibration, config)
                scenario = run_scenario(target, prompts, bench, config.concurrency, None, progress)
                if not run.scenarios or run.scenarios[-1].target != target.name:
                    scenario.cold = cold
                run.scenarios.append(scenario)
        finally:
            target.close()
    return run


# ---------------------------------------------------------------------- report


def scenario_length(s: Scenario) -> int | None:
    """The nominal prompt length of a context-scaling scenario (None for other scenarios)."""
    for request in s.requests:
        match = _ID.match(request.prompt_id)
        if match:
            return int(match.group(1))
    return None


def gap_ratio(itl: Sequence[float]) -> float | None:
    """Longest gap between two tokens over the median gap (None with under 3 gaps)."""
    if len(itl) < 3:
        return None
    median = statistics.median(itl)
    return max(itl) / median if median > 0 else None


CONTEXT_COLUMNS = (
    "target",
    "length",
    "prompt tokens",
    "ok/total",
    "TTFT p50 s",
    "prefill tok/s",
    "decode tok/s",
    "output tok/s",
    "gap ratio max",
)


def context_rows(run: BenchRun) -> list[dict[str, Any]]:
    """One row per context-scaling scenario: medians of the measured requests."""
    rows = []
    for s in run.scenarios:
        length = scenario_length(s)
        if length is None:
            continue
        ok = [r for r in s.requests if r.ok]
        ratios = [g for g in (gap_ratio(r.itl_s) for r in ok) if g is not None]
        output = sum(r.completion_tokens for r in ok)
        rows.append(
            {
                "target": s.target,
                "concurrency": s.concurrency,
                "length": length,
                "prompt_tokens": percentile([r.prompt_tokens for r in ok], 50),
                "ok": len(ok),
                "total": len(s.requests),
                "ttft_s": percentile([r.ttft_s for r in ok], 50),
                "prefill_tps": percentile([r.prompt_tokens_per_s for r in ok], 50),
                "decode_tps": percentile([r.decode_tokens_per_s for r in ok], 50),
                "output_tps": output / s.wall_s if s.wall_s > 0 else None,
                "gap_ratio_max": max(ratios) if ratios else None,
                "errors": sorted({r.error for r in s.requests if not r.ok and r.error}),
            }
        )
    return rows


def context_table_cells(row: dict[str, Any]) -> list[str]:
    def fmt(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return [
        row["target"] + (f" ×{row['concurrency']}" if row["concurrency"] > 1 else ""),
        str(row["length"]),
        fmt(row["prompt_tokens"], 0),
        f"{row['ok']}/{row['total']}",
        fmt(row["ttft_s"], 3),
        fmt(row["prefill_tps"], 1),
        fmt(row["decode_tps"], 1),
        fmt(row["output_tps"], 1),
        fmt(row["gap_ratio_max"], 2),
    ]


def plot_context_scaling(run: BenchRun) -> str | None:
    """TTFT, prefill and decode speed against prompt length, a line per target."""
    series: dict[str, list[dict[str, Any]]] = {}
    for row in context_rows(run):
        series.setdefault(row["target"], []).append(row)
    if not series:
        return None
    figure = new_figure(12, 3.6)
    panels = (("ttft_s", "TTFT p50 (s)"), ("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"))
    for index, (key, label) in enumerate(panels, 1):
        axes = figure.add_subplot(1, len(panels), index)
        for target, rows in series.items():
            points = sorted((r["length"], r[key]) for r in rows if r[key] is not None)
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=mpl_text(target))
        axes.set_xscale("log", base=2)
        axes.set_xlabel("prompt tokens")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        if index == 1:
            axes.legend(fontsize=8)
    figure.suptitle("Context scaling (unique prompts)")
    return figure_data_uri(figure)
