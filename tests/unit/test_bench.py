"""Benchmarks end to end on the fake engine, whose scripted delays give known lower bounds
on TTFT and inter-token latency (only lower bounds: machines here are shared and noisy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgelm.bench.runner import BenchConfig, run_bench, run_scenario
from edgelm.bench.targets import HttpTarget, InProcessTarget, make_target
from edgelm.bench.workloads import builtin, load_prompts
from edgelm.catalog import Catalog, CatalogEntry
from edgelm.errors import InvalidRequest
from edgelm.server.app import create_app

TIMED = {"reply": "a b c d e f g h", "first_token_delay_s": 0.05, "token_delay_s": 0.01}


@pytest.fixture
def bench_catalog(isolated_home: Path) -> Catalog:
    catalog = Catalog([], user_file=isolated_home / "models.toml")
    catalog.add_user_entry(CatalogEntry(alias="timed", engine="fake", options=TIMED))
    catalog.add_user_entry(
        CatalogEntry(
            alias="flaky", engine="fake", options={"reply": "x y z", "fail_after_tokens": 1}
        )
    )
    return catalog


def test_builtin_and_file_workloads(tmp_path: Path) -> None:
    assert len(builtin("short")) >= 10 and len(builtin("long")) >= 3
    assert len(builtin("mixed")) == sum(len(builtin(s)) for s in ("short", "medium", "long"))
    assert [p.id for p in load_prompts("short", seed=1)] == [
        p.id for p in load_prompts("short", seed=1)
    ]
    assert [p.id for p in load_prompts("short", seed=1)] != [
        p.id for p in load_prompts("short", seed=2)
    ]
    f = tmp_path / "mine.jsonl"
    f.write_text(
        '{"prompt": "hi"}\n\n{"id": "q2", "messages": [{"role": "user", "content": "yo"}], "max_tokens": 5}\n'
    )
    prompts = sorted(load_prompts(str(f)), key=lambda p: p.id)
    assert [p.id for p in prompts] == ["mine-1", "q2"] and prompts[1].max_tokens == 5
    assert load_prompts(prompt="only this")[0].text == "only this"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(InvalidRequest, match="line 1"):
        load_prompts(str(bad))
    with pytest.raises(InvalidRequest, match="unknown prompt set"):
        load_prompts("huge")


def test_in_process_scenario_measures_scripted_delays(settings, bench_catalog) -> None:
    target = InProcessTarget("timed", settings, bench_catalog)
    cold = target.open()
    assert cold.load_s is not None
    scenario = run_scenario(target, load_prompts("short"), BenchConfig(requests=4), 1)
    assert len(scenario.requests) == 4 and all(r.ok for r in scenario.requests)
    for r in scenario.requests:
        assert r.ttft_s >= 0.05
        assert len(r.itl_s) == 7 and sum(r.itl_s) >= 7 * 0.01
        assert r.completion_tokens == 8 and r.prompt_tokens > 0
        assert r.tpot_s >= 0.01 * 0.9 and r.e2e_s >= r.ttft_s
    stats = scenario.stats
    assert stats["ok"] == 4 and stats["errors"] == 0
    assert stats["ttft"]["p50"] >= 0.05 and stats["throughput_tokens_per_s"] > 0
    assert scenario.resources.peak_rss_bytes > 0
    target.close()


def test_failures_are_data_points(settings, bench_catalog) -> None:
    target = InProcessTarget("flaky", settings, bench_catalog)
    target.open()
    scenario = run_scenario(target, load_prompts("short"), BenchConfig(requests=3), 1)
    assert scenario.stats["errors"] == 3 and scenario.stats["error_rate"] == 1.0
    assert "scripted failure" in scenario.requests[0].error


def test_concurrency_sweep_and_rate_through_the_service(settings, bench_catalog, serve_app) -> None:
    base = serve_app(create_app(settings, catalog=bench_catalog))
    target = HttpTarget(base, "timed", kind="service")
    config = BenchConfig(requests=6, warmup=1, concurrency=[1, 3])
    run = run_bench([target], load_prompts("short"), config)
    assert [s.concurrency for s in run.scenarios] == [1, 3]
    first, second = run.scenarios
    assert first.cold is not None and first.cold.load_s is not None
    assert first.cold.first_request.ok
    assert len(first.requests) == 6 and len(second.requests) == 6
    # three streams at once on a concurrent engine finish the same work in less wall time
    assert second.wall_s < first.wall_s
    for r in first.requests:
        assert r.ttft_s >= 0.05 and r.server_timings["predicted_n"] == 8
    assert first.resources.peak_rss_bytes  # the service's pid came from /openai/status
    rate_run = run_bench(
        [HttpTarget(base, "timed", kind="service")],
        load_prompts("short"),
        BenchConfig(requests=5, warmup=0, rate=50.0, cold=False),
    )
    (scenario,) = rate_run.scenarios
    assert scenario.rate == 50.0 and len(scenario.requests) == 5


def test_time_bound_stops_the_scenario(settings, bench_catalog) -> None:
    target = InProcessTarget("timed", settings, bench_catalog)
    target.open()
    scenario = run_scenario(
        target, load_prompts("short"), BenchConfig(requests=500, max_seconds=0.5), 1
    )
    assert 1 <= len(scenario.requests) < 500


def test_non_streaming_and_external_target(settings, bench_catalog, serve_app) -> None:
    base = serve_app(create_app(settings, catalog=bench_catalog))
    target = make_target(f"{base}/v1#timed", settings, stream=False)
    assert target.kind == "openai" and target.name == f"timed@{base}"
    result = target.request(load_prompts("short")[0], {"max_tokens": 16})
    assert result.ok and result.ttft_s is None and result.completion_tokens == 8
    with pytest.raises(InvalidRequest, match="#MODEL"):
        make_target(base, settings)


def test_make_target_kinds(settings) -> None:
    assert isinstance(make_target("local:smollm2-135m", settings), InProcessTarget)
    assert make_target("service:smollm2-135m", settings).kind == "service"
    # nothing listens on a test's service port (tests/conftest.py), even while a developer's
    # service runs on 5273: a bare alias runs in-process
    assert make_target("smollm2-135m", settings).kind == "in-process"
    with pytest.raises(InvalidRequest):
        make_target("gpu:x", settings)


def test_json_block_is_workshop_shaped(settings, bench_catalog) -> None:
    from edgelm.bench.report import print_json_block

    run = run_bench(
        [InProcessTarget("timed", settings, bench_catalog)],
        load_prompts("short"),
        BenchConfig(requests=2, warmup=0),
    )
    text = print_json_block(run)
    header, _, body = text.partition("\n")
    assert header == "[BENCHMARK RESULTS]"
    rows = json.loads(body)
    assert rows[0]["target"] == "local:timed"


def test_memory_bandwidth_probe_reads_the_whole_buffer() -> None:
    from edgelm.bench.micro import memory_bandwidth

    # Any machine reads 16 MB faster than 0.1 GB/s and slower than 10 TB/s.
    assert 0.1 < memory_bandwidth(threads=2, size_mb=16, reps=2) < 10_000


def test_ignore_eos_is_sent_only_when_asked() -> None:
    assert "ignore_eos" not in BenchConfig().params()
    assert BenchConfig(ignore_eos=True).params()["ignore_eos"] is True


def test_unique_set_never_repeats_a_prompt() -> None:
    prompts = load_prompts("unique")
    assert len({p.text for p in prompts}) == len(prompts) >= 128
    assert [p.id for p in load_prompts("unique", seed=3)] == [
        p.id for p in load_prompts("unique", seed=3)
    ]


class _Logged(InProcessTarget):
    """An in-process target that notes when it serves, to check who goes when."""

    def __init__(self, alias: str, settings, catalog, log: list[str]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(alias, settings, catalog)
        self.log = log

    def request(self, prompt, params):  # type: ignore[no-untyped-def]
        self.log.append(f"{self.model}:{prompt.id}")
        return super().request(prompt, params)


class _StubRaw:
    """Stands for a RawEngine: tg rates 10, 11, 12... as rounds go."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.name = "timed"  # as the targets name the model...
        self.entry = CatalogEntry(alias="timed-variant", engine="fake")  # ...which serves it
        self.engine_name = "fake"
        self.threads = 2
        self.weights_bytes = None

    def tg(self, n: int, seed: int = 0) -> float:
        self.log.append(f"raw:{seed}")
        return 10.0 + seed


def _two_logged(settings, bench_catalog, log: list[str]) -> list[_Logged]:  # type: ignore[no-untyped-def]
    """Targets "timed" and "other", noting in ``log`` when each serves which prompt."""
    bench_catalog.add_user_entry(CatalogEntry(alias="other", engine="fake", options=TIMED))
    return [_Logged(alias, settings, bench_catalog, log) for alias in ("timed", "other")]


def test_interleaved_run_takes_turns_on_the_same_prompt(settings, bench_catalog) -> None:
    log: list[str] = []
    targets = _two_logged(settings, bench_catalog, log)
    config = BenchConfig(requests=3, warmup=1, interleave=True, max_tokens=8)
    prompts = load_prompts("unique")
    run = run_bench(targets, prompts, config, raw={"timed": _StubRaw(log)})  # type: ignore[dict-item]
    measured = log[-9:]  # after each target's cold request and warm-up
    ids = [p.id for p in prompts[1:4]]
    # the same prompt for everyone in a round; the round's first turn goes round the targets
    assert measured == [
        "raw:0", f"timed:{ids[0]}", f"other:{ids[0]}",
        "raw:1", f"other:{ids[1]}", f"timed:{ids[1]}",
        "raw:2", f"timed:{ids[2]}", f"other:{ids[2]}",
    ]  # fmt: skip
    first, second = run.scenarios
    assert [r.prompt_id for r in first.requests] == [r.prompt_id for r in second.requests] == ids
    assert first.cold is not None and first.cold.first_request.ok
    # each target's wall time is its own serving time, not the whole interleaved run
    assert (
        sum(r.e2e_s for r in first.requests)
        <= first.wall_s
        < 2 * sum(r.e2e_s for r in first.requests)
    )
    assert first.stats["throughput_tokens_per_s"] > 0
    (row,) = run.micro
    assert row["test"] == "tg8 interleaved" and row["reps"] == 3 and row["tokens_per_s"] == 11.0
    # named as the targets name it, so the service-vs-raw table pairs them ("alias:gguf" is
    # not the variant its bare alias may be served by)
    assert row["model"] == first.model == "timed"


def test_ttft_over_in_process_pairs_the_same_prompts() -> None:
    from edgelm.bench.results import RequestResult, Scenario
    from edgelm.bench.stats import ttft_over

    def scenario(kind: str, ttfts: dict[str, float]) -> Scenario:
        requests = [RequestResult(prompt_id=p, ttft_s=t) for p, t in ttfts.items()]
        return Scenario(
            target=kind,
            kind=kind,
            model="m",
            requests=requests,
            stats={"ttft": {"p50": sorted(ttfts.values())[len(ttfts) // 2]}},
        )

    reference = scenario("in-process", {"a": 0.100, "b": 0.300, "c": 0.200})
    service = scenario("service", {"a": 0.250, "b": 0.301, "c": 0.202})
    # pairs: +150, +1, +2 ms, median +2 ms; the medians alone would say 0.250 - 0.200
    assert ttft_over(service, reference) == pytest.approx(0.002)
    shuffled = scenario("service", {"b": 0.301, "a": 0.250, "c": 0.202})
    assert ttft_over(shuffled, reference) == pytest.approx(0.050)
    assert ttft_over(service, None) is None


def test_ttft_over_in_turns_cancels_who_went_first() -> None:
    """Going second costs +5 ms, whoever it is; the service is truly 2 ms slower. Three
    rounds with the service first and five with it second: a plain median says +7 ms."""
    from edgelm.bench.results import RequestResult, Scenario
    from edgelm.bench.stats import ttft_over

    service_first = [True, False, True, False, True, False, False, False]
    reference, service = [], []
    for i, first in enumerate(service_first):
        base = 0.100 + i * 0.010  # each prompt its own length
        mine = RequestResult(prompt_id=f"p{i}", ttft_s=base + 0.002, started_at=10 * i)
        theirs = RequestResult(prompt_id=f"p{i}", ttft_s=base, started_at=10 * i)
        second = theirs if first else mine
        second.ttft_s += 0.005
        second.started_at += 1
        service.append(mine)
        reference.append(theirs)

    def scenario(kind: str, requests: list[RequestResult]) -> Scenario:
        return Scenario(target=kind, kind=kind, model="m", requests=requests)

    ours, theirs = scenario("service", service), scenario("in-process", reference)
    assert ttft_over(ours, theirs) == pytest.approx(0.007)
    assert ttft_over(ours, theirs, turns=True) == pytest.approx(0.002)


def test_interleaved_turns_give_each_prompt_every_order(settings, bench_catalog) -> None:
    """With fewer prompts than rounds, a prompt comes round again with the other target first."""
    log: list[str] = []
    targets = _two_logged(settings, bench_catalog, log)
    prompts = load_prompts("unique")[:2]
    run_bench(targets, prompts, BenchConfig(requests=4, warmup=1, interleave=True), raw={})
    measured = log[-8:]
    firsts = {(measured[k].split(":")[1], measured[k].split(":")[0]) for k in range(0, 8, 2)}
    assert firsts == {(p.id, model) for p in prompts for model in ("timed", "other")}
