"""The shapes of measurements: one request, one scenario (model × concurrency), one run.

Everything is measured on the client side (what a user waits for) and kept raw, so statistics,
reports and diffs can be recomputed from a stored run at any time.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class RequestResult(BaseModel):
    """One request as the client saw it. Times are seconds; None when not measurable."""

    ok: bool = True
    error: str | None = None
    prompt_id: str = ""
    started_at: float = 0.0
    """Seconds since the scenario started (for throughput over time)."""
    prepare_s: float = 0.0
    send_s: float | None = None
    """Until the response headers arrived."""
    ttft_s: float | None = None
    itl_s: list[float] = Field(default_factory=list)
    """Gaps between consecutive streamed chunks after the first."""
    tpot_s: float | None = None
    """Time per output token after the first: (e2e - ttft) / (completion_tokens - 1)."""
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    text: str = ""
    server_timings: dict[str, Any] | None = None


class ResourceSample(BaseModel):
    """Peak and mean use of the serving process during a scenario."""

    peak_rss_bytes: int | None = None
    mean_cpu_percent: float | None = None
    peak_cpu_percent: float | None = None
    gpu_peak_memory_bytes: int | None = None
    gpu_mean_util_percent: float | None = None
    energy_joules: float | None = None
    energy_source: str | None = None


class ColdStart(BaseModel):
    load_s: float | None = None
    first_request: RequestResult | None = None


class Scenario(BaseModel):
    """One model (target) at one concurrency level."""

    target: str
    """Display name: alias, or alias@url for external endpoints."""
    kind: str
    """in-process | service | openai"""
    model: str
    concurrency: int = 1
    rate: float | None = None
    """Poisson arrival rate (requests/s), when set instead of closed-loop concurrency."""
    warmup: int = 0
    requests: list[RequestResult] = Field(default_factory=list)
    wall_s: float = 0.0
    resources: ResourceSample = Field(default_factory=ResourceSample)
    cold: ColdStart | None = None
    stats: dict[str, Any] = Field(default_factory=dict)
    """Filled by edgelm.bench.stats.summarise_scenario."""


class BenchRun(BaseModel):
    id: str = ""
    created_at: float = 0.0
    name: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    system: dict[str, Any] = Field(default_factory=dict)
    scenarios: list[Scenario] = Field(default_factory=list)
    micro: list[dict[str, Any]] = Field(default_factory=list)
    """llama-bench style rows: model, pp/tg sizes, tokens/s (see edgelm.bench.micro)."""
    status: str = "done"
    """running (being measured, scenarios stored as they finish), interrupted or done."""
