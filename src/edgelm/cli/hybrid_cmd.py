"""``edgelm hybrid --prompt ... | ask | eval``: the SLM→LLM router from the terminal.

All talk to the running service (``edgelm service start``): ``edgelm hybrid --prompt ...`` (or
``edgelm hybrid ask``) streams one answer from ``model="hybrid..."`` and prints its route
record; ``eval`` records each question's draft, refinement and LLM answer once, then scores
every policy and threshold from those pieces (:mod:`edgelm.router.evaluate`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgelm.cli.common import console, fail, settings_of, split_list
from edgelm.client import ChatResult, EdgelmClient
from edgelm.cost import Prices
from edgelm.router import evaluate as ev
from edgelm.router_service import name_for
from edgelm.settings import Settings

app = typer.Typer(help="Hybrid router: the SLM drafts, the LLM refines when a policy says so.")


def _client(settings: Settings) -> EdgelmClient:
    return EdgelmClient.for_settings(settings)


def _ask(
    settings: Settings,
    prompt: str,
    policy: str | None,
    slm: str | None,
    llm: str | None,
    max_tokens: int | None,
    temperature: float | None,
    as_json: bool,
) -> None:
    """Stream one hybrid answer to the terminal, then how it was produced."""
    model = name_for(slm, llm, policy)
    out = console()
    result: ChatResult | None = None
    with _client(settings) as client:
        events = client.stream_chat(model, prompt, max_tokens=max_tokens, temperature=temperature)
        for event in events:
            if event.result is not None:
                result = event.result
            elif not as_json:
                out.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
    if result is None:  # pragma: no cover - stream_chat always ends with the result
        fail("the service sent no answer")
    if as_json:
        payload = {"model": model, "text": result.text, "edgelm": result.extension or {}}
        out.print(json.dumps(payload, indent=2), markup=False, highlight=False)
        return
    out.print()
    out.print(_record_table(result.extension or {}))


_PROMPT = typer.Option(None, "--prompt", "-p", help="The question.")
_POLICY = typer.Option(
    None, "--policy", help="Policy spec, e.g. 'insufficient,confidence=-0.5' (default: settings)."
)
_SLM = typer.Option(None, "--slm", help="Draft model (default: router.slm / tier slm).")
_LLM = typer.Option(None, "--llm", help="Refine model (default: router.llm / tier llm).")
_MAX_TOKENS = typer.Option(None, "--max-tokens", min=1)
_TEMPERATURE = typer.Option(None, "--temperature", min=0.0, max=2.0)
_JSON = typer.Option(False, "--json", help="Print the answer and its route record as JSON.")


@app.callback(invoke_without_command=True)
def hybrid(
    ctx: typer.Context,
    prompt: str | None = _PROMPT,
    policy: str | None = _POLICY,
    slm: str | None = _SLM,
    llm: str | None = _LLM,
    max_tokens: int | None = _MAX_TOKENS,
    temperature: float | None = _TEMPERATURE,
    as_json: bool = _JSON,
) -> None:
    """Hybrid router: the SLM drafts, the LLM refines when a policy says so.

    `edgelm hybrid --prompt "..."` asks one question (the same as `edgelm hybrid ask`).
    """
    if ctx.invoked_subcommand is not None:
        return
    if prompt is None:
        console().print(ctx.get_help())
        raise typer.Exit(0)
    _ask(settings_of(ctx), prompt, policy, slm, llm, max_tokens, temperature, as_json)


@app.command("ask")
def ask(
    ctx: typer.Context,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question."),
    policy: str | None = _POLICY,
    slm: str | None = _SLM,
    llm: str | None = _LLM,
    max_tokens: int | None = _MAX_TOKENS,
    temperature: float | None = _TEMPERATURE,
    as_json: bool = _JSON,
) -> None:
    """Ask one question through the hybrid model; print the answer and how it was produced."""
    _ask(settings_of(ctx), prompt, policy, slm, llm, max_tokens, temperature, as_json)


def _ms(value: object) -> str:
    return "-" if value is None else f"{float(value) / 1000:.2f} s"  # type: ignore[arg-type]


def _record_table(ext: dict[str, Any]) -> Table:
    table = Table(title=f"route: {ext.get('route')} — {ext.get('reason', '')}", show_header=True)
    for column in ("step", "model", "TTFT", "total", "prompt tok", "completion tok"):
        table.add_column(column)
    second_key = "refine" if ext.get("route") == "refine" else "direct"
    for step, key in (("draft", "draft"), (second_key, second_key)):
        leg = ext.get(key)
        if leg:
            table.add_row(
                step,
                str(leg.get("model")),
                _ms(leg.get("ttft_ms")),
                _ms(leg.get("total_ms")),
                str(leg.get("prompt_tokens")),
                str(leg.get("completion_tokens")),
            )
    cost = ext.get("cost") or {}
    clouds = ", ".join(
        f"{k} {v * 1000:.4f}" for k, v in (cost.get("cloud_equivalent") or {}).items()
    )
    table.caption = (
        f"answer TTFT {_ms(ext.get('ttft_ms'))}, total {_ms(ext.get('total_ms'))}; "
        f"cost per 1k such answers: local {cost.get('currency', '')} "
        f"{(cost.get('local') or 0) * 1000:.4f}; cloud-equivalent {clouds}"
    )
    return table


@app.command("eval")
def eval_(
    ctx: typer.Context,
    dataset: str = typer.Option("general", "--dataset", "-d", help="Shipped set name or .jsonl."),
    policies: str = typer.Option(
        ",".join(ev.DEFAULT_POLICIES), "--policies", help="Policy names to sweep."
    ),
    thresholds: str | None = typer.Option(
        None,
        "--thresholds",
        help="Per-policy thresholds, e.g. 'confidence=-0.2;-0.5,length=300;600' "
        "(default: a built-in sweep).",
    ),
    spec: list[str] = typer.Option([], "--spec", help="Extra policy specs to score as they are."),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="First N questions."),
    slm: str | None = typer.Option(None, "--slm"),
    llm: str | None = typer.Option(None, "--llm"),
    metric: str = typer.Option("contains", help="Quality metric: contains, f1 or exact."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    system: str = typer.Option(
        ev.DEFAULT_SYSTEM, help="System prompt for every model ('' for none)."
    ),
    pieces: Path | None = typer.Option(
        None, "--pieces", help="Re-score the pieces of an earlier results.json (no models)."
    ),
    out: Path | None = typer.Option(None, help="Directory for results.json and report.html."),
) -> None:
    """SLM-only, LLM-only and hybrid under each policy/threshold: quality, latency, cost."""
    settings = settings_of(ctx)
    config = settings.router
    grid = _thresholds(thresholds)
    try:
        configs = ev.configurations(split_list(policies), grid, spec, config.direct_patterns)
        ev.metric_fn(metric)
    except ValueError as exc:
        fail(str(exc))
    started = time.time()
    slm_alias, llm_alias = slm or config.slm or "", llm or config.llm or ""
    if pieces is not None:
        recorded = ev.read_pieces(pieces)
    else:
        from edgelm.evals.datasets import load_dataset

        items = load_dataset(dataset)[:limit] if limit else load_dataset(dataset)
        with _client(settings) as client, console().status("asking…") as status:
            if not (slm_alias and llm_alias):
                # The running service's pair: its catalog and settings are the ones that count.
                card = next((m for m in client.models() if m.get("id") == "hybrid"), {})
                slm_alias = slm_alias or card.get("slm") or ""
                llm_alias = llm_alias or card.get("llm") or ""
            if not (slm_alias and llm_alias):
                fail("the service offers no default hybrid pair; give --slm and --llm")

            def progress(done: int, total: int, _label: str) -> None:
                status.update(f"{done}/{total} questions ({slm_alias} draft+refine, {llm_alias})")

            recorded = ev.collect(
                client,
                items,
                slm_alias,
                llm_alias,
                max_tokens=max_tokens,
                system=system or None,
                progress=progress,
            )
    report = ev.evaluate(recorded, configs, Prices.load(settings.home), metric)
    report.meta = {
        "dataset": str(pieces or dataset),
        "questions": len(recorded),
        "slm": slm_alias,
        "llm": llm_alias,
        "max_tokens": max_tokens,
        "system": system,
        "endpoint": settings.endpoint,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "method": "models run once per question (draft with logprobs, LLM refine of the draft, "
        "LLM direct); every policy computed offline from those pieces",
    }
    directory = out or settings.home / "hybrid" / time.strftime("%Y%m%d-%H%M%S")
    ev.write_json(report, directory / "results.json")
    ev.write_html(report, directory / "report.html")
    console().print(ev.rich_table(report))
    best = report.best()
    if best is not None:
        console().print(
            f"best: [bold]{best.name}[/] keeps {ev._pct(best.quality_share)} of LLM-only quality "
            f"at {ev._pct(best.latency_share)} of its mean latency "
            f"({'meets' if best.meets_target else 'misses'} the 95% / 60% target)"
        )
    console().print(f"files in {directory}")


def _thresholds(text: str | None) -> dict[str, list[str]]:
    """'confidence=-0.2;-0.5,length=300' → {'confidence': ['-0.2', '-0.5'], 'length': ['300']}."""
    grid: dict[str, list[str]] = {}
    for part in split_list(text):
        name, _, values = part.partition("=")
        if not values:
            fail(f"--thresholds wants name=v1;v2, got '{part}'")
        grid[name.strip()] = [v.strip() for v in values.split(";") if v.strip()]
    return grid
