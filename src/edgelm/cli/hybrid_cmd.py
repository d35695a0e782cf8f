"""``edgelm hybrid --prompt ... | ask | eval``: the SLM→LLM router from the terminal.

All talk to the running service (``edgelm service start``): ``edgelm hybrid --prompt ...`` (or
``edgelm hybrid ask``) streams one answer from ``model="hybrid..."`` and prints its route
record; ``eval`` records each question's draft, refinement and LLM answer once, then scores
every policy and threshold from those pieces (:mod:`edgelm.evals.hybrid`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgelm.cli.common import console, fail, print_table, settings_of, split_list
from edgelm.client import ChatResult, EdgelmClient
from edgelm.cost import Prices
from edgelm.evals import hybrid as ev
from edgelm.server.hybrid_model import name_for
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
    print_table(_record_table(result.extension or {}), out=out)


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
    pieces: list[Path] = typer.Option(
        [],
        "--pieces",
        help="Re-score the pieces of earlier results.json files (no models); repeat to pool "
        "several sets.",
    ),
    holdout: float | None = typer.Option(
        None,
        "--holdout",
        min=0.05,
        max=0.95,
        help="Report on a held-out share of each category (e.g. 0.5); the learned router is "
        "trained on the rest only, and k-fold figures over the whole set are added.",
    ),
    split_seed: int = typer.Option(0, "--seed", help="Seed of the held-out split and folds."),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds (--holdout)."),
    learned_extra: list[str] = typer.Option(
        [],
        "--learned-with",
        help="With --holdout --learned: also score 'learned=<t>,<SPEC>' for this spec.",
    ),
    with_refine: bool = typer.Option(
        True,
        "--refine/--no-refine",
        help="Record the LLM's refinement of each draft (--no-refine: the draft alone, "
        "routes draft/direct only, one LLM call fewer per question).",
    ),
    with_direct: bool = typer.Option(
        True,
        "--direct/--no-direct",
        help="Record the LLM's own answer (--no-direct: take it from --timings-from).",
    ),
    workers: int = typer.Option(
        1, "--workers", min=1, max=16, help="Questions asked at once (latency then invalid)."
    ),
    train_extra: list[Path] = typer.Option(
        [],
        "--train-extra",
        help="With --holdout --learned: pieces (results.json) that only train the learned "
        "router, never scored (e.g. general2 beside a held-out part of general).",
    ),
    timings_from: Path | None = typer.Option(
        None,
        "--timings-from",
        help="Take engine timings from this earlier results.json wherever its answers are the "
        "same text (quality recorded under load, latency from a quiet run).",
    ),
    out: Path | None = typer.Option(None, help="Directory for results.json and report.html."),
    learned: bool = typer.Option(
        False,
        "--learned",
        help="Also score the learned router (cross-validated on the stored eval runs of the "
        "pair; questions embedded by the service).",
    ),
    from_run: str | None = typer.Option(
        None,
        "--from-run",
        help="Score a stored eval run of both tiers instead of asking the models (routes "
        "draft/direct only: the learned router and '>direct' text policies).",
    ),
    learned_thresholds: str = typer.Option(
        ";".join(ev.LEARNED_THRESHOLDS), "--learned-thresholds", help="Probabilities to sweep."
    ),
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
    if from_run is not None:
        slm_alias, llm_alias = _pair(settings, slm, llm)
        recorded = ev.pieces_from_run(settings.home / "evals.db", from_run, slm_alias, llm_alias)
        if not recorded:
            fail(
                f"eval run {from_run} has no question answered by both {slm_alias} and {llm_alias}"
            )
        # No refinements or logprobs were recorded: keep what routes draft or direct only.
        configs = [c for c in configs if c.kind != "hybrid"] + [
            ev.Config(s, "hybrid", ev.parse_policy(s))
            for s in ("insufficient>direct", "length=100>direct", "length=200>direct")
        ]
    elif pieces:
        recorded = [p for path in pieces for p in ev.read_pieces(path)]
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
                refine=with_refine,
                direct=with_direct,
                workers=workers,
            )
    grafted = None
    if timings_from is not None:
        recorded, grafted = ev.graft_timings(recorded, ev.read_pieces(timings_from))
    if any(not p.refine.text and not p.refine.total_s for p in recorded):
        # Some questions have no recorded refinement: score only what routes draft/direct.
        configs = [c for c in configs if c.policy is None or not ev.refines(c.policy)]
    held = None
    if holdout is not None:
        embed_fn, embedder = _embed_fn(settings, "all-minilm-l6-v2") if learned else (None, None)
        from edgelm.evals import hybrid_split as hs

        try:
            held = hs.evaluate_held_out(
                recorded,
                configs,
                Prices.load(settings.home),
                metric,
                holdout=holdout,
                seed=split_seed,
                folds=folds,
                embed=embed_fn,
                learned_thresholds=[v for v in learned_thresholds.split(";") if v.strip()],
                learned_extra=learned_extra,
                extra_train=[p for path in train_extra for p in ev.read_pieces(path)],
            )
        finally:
            if embedder is not None:
                embedder.close()
        report = held.test
        report.pieces = list(recorded)  # the file keeps every question; "held_out" says which
    else:
        if learned:
            if not (slm_alias and llm_alias):  # re-scored pieces: the configured (or tier) pair
                slm_alias, llm_alias = _pair(settings, slm, llm)
            configs += _learned_configs(
                settings, recorded, slm_alias, llm_alias, learned_thresholds
            )
        report = ev.evaluate(recorded, configs, Prices.load(settings.home), metric)
    report.meta = {
        "dataset": f"eval run {from_run}"
        if from_run
        else (" + ".join(map(str, pieces)) if pieces else dataset),
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
    if grafted is not None:
        report.meta["timings_from"] = f"{timings_from} ({grafted} of {len(recorded)} questions)"
    if held is not None:
        report.meta["held_out"] = (
            f"{len(held.test_ids)} of {len(recorded)} questions (share {holdout:g} of each "
            f"category, seed {split_seed}); the table is the held-out part only"
        )
        if train_extra:
            report.meta["learned_also_trained_on"] = ", ".join(map(str, train_extra))
    directory = out or settings.home / "hybrid" / time.strftime("%Y%m%d-%H%M%S")
    ev.write_json(report, directory / "results.json", held.to_dict() if held else None)
    ev.write_html(report, directory / "report.html")
    print_table(ev.rich_table(report))
    if held is not None:
        _print_held_out(held)
    best = report.best()
    if best is not None:
        console().print(
            f"best: [bold]{best.name}[/] keeps {ev._pct(best.quality_share)} of LLM-only quality "
            f"at {ev._pct(best.latency_share)} of its mean latency "
            f"({'meets' if best.meets_target else 'misses'} the 95% / 60% target)"
        )
    routed = report.best_routed()
    if routed is not None:
        console().print(
            f"fastest keeping 95% of LLM quality with <= 50% escalated: [bold]{routed.name}[/] "
            f"({ev._pct(routed.quality_share)}, {ev._pct(routed.escalated)} escalated, "
            f"{ev._pct(routed.latency_share)} of the LLM's latency)"
        )
    console().print(f"files in {directory}")


def _print_held_out(held: Any) -> None:
    """The choice made on the train part, its held-out figures, and the k-fold summary."""
    out = console()
    picked, tested = held.chosen()
    if picked is None or tested is None:
        out.print(
            "no configuration keeps 95% of LLM quality with <= 50% escalated on the train part"
        )
    else:
        out.print(
            f"chosen on the train part: [bold]{picked.name}[/]; on the held-out part it keeps "
            f"{ev._pct(tested.quality_share)} of LLM-only quality with {ev._pct(tested.escalated)} "
            f"escalated, at {ev._pct(tested.latency_share)} of the LLM's mean latency "
            f"({'meets' if tested.meets_routing else 'misses'} 95% / <=50% / below the LLM)"
        )
    nested = held.nested
    if nested is not None:
        verdict = "meets" if nested.meets_routing else "misses"
        # One decimal: 94.8% printed as "95%" beside "misses" would read as a contradiction.
        share = "-" if nested.quality_share is None else f"{nested.quality_share:.1%}"
        out.print(
            f"the choice itself, {held.folds}-fold (each fold answered by the configuration "
            f"chosen on the others): {share} of LLM-only quality with "
            f"{ev._pct(nested.escalated)} escalated, at {ev._pct(nested.latency_share)} of the "
            f"LLM's mean latency ({verdict} 95% / <=50% / below the LLM); chosen: "
            + "; ".join(c or "nothing (LLM alone)" for c in nested.chosen)
        )
    table = Table(title=f"{held.folds}-fold cross-validation over all questions (seed {held.seed})")
    for column in ("config", "quality", "of LLM", "min-max of LLM", "escalated", "latency of LLM",
                   "folds meeting"):  # fmt: skip
        table.add_column(column, justify="left" if column == "config" else "right")
    keep = [s for s in held.cv if s.meets_routing or s.folds_meeting or s.name.endswith("-only")]
    for s in keep:
        table.add_row(
            s.name,
            f"{s.quality:.3f}",
            ev._pct(s.quality_share),
            f"{ev._pct(s.quality_share_min)}-{ev._pct(s.quality_share_max)}",
            ev._pct(s.escalated),
            ev._pct(s.latency_share),
            f"{s.folds_meeting}/{held.folds}",
        )
    table.caption = "rows: baselines and configurations meeting the target on at least one fold"
    print_table(table)
    if held.auc_cv is not None or held.auc_test is not None:

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        out.print(
            f"learned router AUC (P(LLM better) against the labels): held-out part "
            f"{fmt(held.auc_test)}, {held.folds}-fold over all {fmt(held.auc_cv)} (0.5 = a coin)"
        )
    out.print(f"held out: {', '.join(held.test_ids)}")


def _embed_fn(settings: Settings, model: str):
    from edgelm.rag.embed import ServiceEmbedder

    embedder = ServiceEmbedder(model, EdgelmClient.for_settings(settings))

    def embed(texts: list[str]) -> list[list[float]]:
        return embedder.embed(texts)

    return embed, embedder


def _pair(settings: Settings, slm: str | None, llm: str | None) -> tuple[str, str]:
    from edgelm.catalog import Catalog

    catalog = Catalog.load(settings.home)
    slm_name = slm or settings.router.slm
    llm_name = llm or settings.router.llm
    slm_entry = catalog.resolve(slm_name) if slm_name else catalog.for_tier("slm")
    llm_entry = catalog.resolve(llm_name) if llm_name else catalog.for_tier("llm")
    return slm_entry.alias, llm_entry.alias


def _learned_configs(
    settings: Settings, recorded: list[ev.Pieces], slm: str, llm: str, thresholds: str
) -> list[ev.Config]:
    from edgelm.hybrid import learned as lr

    examples, _runs = lr.examples_from_runs(settings.home / "evals.db", slm, llm)
    if not examples:
        fail(f"no stored eval run has both {slm} and {llm}: run 'edgelm eval run -m {slm},{llm}'")
    embed, embedder = _embed_fn(settings, lr.DEFAULT_EMBEDDER)
    try:
        values = [v.strip() for v in thresholds.split(";") if v.strip()]
        return ev.learned_configurations(recorded, examples, embed, values)
    finally:
        embedder.close()


@app.command("train")
def train(
    ctx: typer.Context,
    runs: str | None = typer.Option(
        None, "--runs", help="Eval run ids (comma-separated; default: every run with both)."
    ),
    slm: str | None = typer.Option(None, "--slm", help="Draft model (default: tier slm)."),
    llm: str | None = typer.Option(None, "--llm", help="Larger model (default: tier llm)."),
    embedder: str = typer.Option(
        "all-minilm-l6-v2", "--embedder", help="Model serving /v1/embeddings for the features."
    ),
    l2: float = typer.Option(3.0, "--l2", min=0.0, help="L2 penalty of the regression."),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds for the report."),
    out: Path | None = typer.Option(
        None, "--out", help="Router file (default: $EDGELM_HOME/router/learned.json)."
    ),
    from_pieces: list[Path] = typer.Option(
        [],
        "--pieces",
        help="Train on the recorded pieces of 'hybrid eval' runs (results.json; repeatable) "
        "instead of stored eval runs: label 1 where the LLM's answer scored higher than the "
        "SLM's draft.",
    ),
    metric: str = typer.Option("contains", help="Quality metric of the labels (--pieces)."),
) -> None:
    """Fit the learned router on stored eval runs in which both tiers answered; the policy
    term 'learned=<p>' then sends a question to the LLM before any draft when P >= p."""
    import shlex

    from edgelm.errors import EdgelmError
    from edgelm.hybrid import learned as lr

    settings = settings_of(ctx)
    try:
        slm_alias, llm_alias = _pair(settings, slm, llm)
        if from_pieces:
            from edgelm.evals.hybrid_split import examples_from_pieces

            recorded = [p for path in from_pieces for p in ev.read_pieces(path)]
            examples, used = examples_from_pieces(recorded, metric), []
        else:
            examples, used = lr.examples_from_runs(
                settings.home / "evals.db", slm_alias, llm_alias, split_list(runs)
            )
    except EdgelmError as exc:
        fail(exc.message)
    if not examples:
        fail(
            f"no stored eval run has answers of both {slm_alias} and {llm_alias}; run: "
            f"edgelm eval run -m {slm_alias},{llm_alias}"
        )
    embed, client = _embed_fn(settings, embedder)
    try:
        texts = list(dict.fromkeys(e.question for e in examples))
        table = dict(zip(texts, embed(texts), strict=True))
    except EdgelmError as exc:
        fail(exc.message)
    finally:
        client.close()
    vectors = [table[e.question] for e in examples]
    target = out or lr.home_path(settings.home)
    # The command that reproduces this file from the same eval database, every choice spelled out.
    command = ["edgelm", "hybrid", "train", "--slm", slm_alias]
    if from_pieces:
        command += [x for path in from_pieces for x in ("--pieces", str(path))]
        command += ["--metric", metric]
    else:
        command += ["--runs", ",".join(used)]
    command += ["--llm", llm_alias, "--embedder", embedder, "--l2", f"{l2:g}"]
    command += ["--folds", str(folds), "--out", str(target)]
    cv = lr.cross_validated(examples, vectors, folds=folds, l2=l2)
    summary = lr.routing_summary(
        examples, [cv[e.question] for e in examples], [0.2, 0.3, 0.4, 0.5, 0.6]
    )
    meta = {
        "slm": slm_alias,
        "llm": llm_alias,
        "runs": used,
        "pieces": [str(path) for path in from_pieces],
        "datasets": sorted({e.dataset for e in examples}),
        "command": shlex.join(command),
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cross_validation": {"folds": folds, "by_threshold": summary},
    }
    model = lr.train(examples, vectors, embedder=embedder, l2=l2, meta=meta)
    path = model.save(target)
    result = Table(
        title=f"learned router: {len(examples)} questions, {folds}-fold cross-validation"
    )
    for column in ("learned=", "to LLM", "quality", "of LLM-only"):
        result.add_column(column, justify="right")
    for row in summary:
        result.add_row(
            f"{row['threshold']:g}",
            f"{row['to_llm']:.0%}",
            f"{row['quality']:.3f}",
            f"{row['of_llm']:.0%}",
        )
    console().print(result)
    positives = sum(e.label for e in examples)
    source = f"{len(from_pieces)} pieces files" if from_pieces else f"{len(used)} runs"
    console().print(
        f"trained on {len(examples)} questions ({positives} where {llm_alias} did better) from "
        f"{source}; saved to {path}"
    )


def _thresholds(text: str | None) -> dict[str, list[str]]:
    """'confidence=-0.2;-0.5,length=300' → {'confidence': ['-0.2', '-0.5'], 'length': ['300']}."""
    grid: dict[str, list[str]] = {}
    for part in split_list(text):
        name, _, values = part.partition("=")
        if not values:
            fail(f"--thresholds wants name=v1;v2, got '{part}'")
        grid[name.strip()] = [v.strip() for v in values.split(";") if v.strip()]
    return grid
