"""How well a model calls tools through edgelm: the shipped tool-use set, asked over HTTP.

Each prompt of ``data/tool_calls.jsonl`` is sent to ``/v1/chat/completions`` with the set's
four functions (weather, calculator, web search, currency), at temperature 0, once with
``tool_choice: "auto"`` and once with ``"required"`` (grammar-constrained on llama.cpp). A
request counts as correct when it

* calls the expected function with arguments that are a JSON object valid under its schema
  (the first call is judged; with ``auto`` a prompt that needs no tool must get no call), and
  separately, ``args_match`` records whether the arguments also carry the expected values
  (e.g. ``city`` mentions Tokyo);
* with ``required`` only prompts that need a tool are asked (the others cannot be right).

Run against a service (``edgelm service start``)::

    python -m edgelm.evals.tool_calls --base-url http://127.0.0.1:5273/v1 --model qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import httpx

from edgelm.tools import validate_call
from edgelm.types import FunctionTool

DATASET = "tool_calls.jsonl"


@dataclass
class ToolItem:
    id: str
    prompt: str
    expect: str | None
    args: dict[str, str]


@dataclass
class ToolResult:
    id: str
    mode: str
    expect: str | None
    called: str | None
    arguments: str | None
    correct: bool
    args_match: bool
    error: str | None


def load_set() -> tuple[list[dict[str, Any]], list[ToolItem]]:
    """The set's tools (OpenAI's shape) and its prompts."""
    text = resources.files("edgelm.evals").joinpath("data", DATASET).read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    tools = next(r["tools"] for r in rows if r.get("id") == "tools")
    items = [
        ToolItem(r["id"], r["prompt"], r.get("expect"), r.get("args") or {})
        for r in rows
        if r.get("id") != "tools"
    ]
    return tools, items


def score(
    item: ToolItem, mode: str, message: dict[str, Any], tools: list[FunctionTool]
) -> ToolResult:
    """Judge one answer (see the module's docstring)."""
    calls = message.get("tool_calls") or []
    if not calls:
        return ToolResult(
            item.id, mode, item.expect, None, None, item.expect is None, item.expect is None, None
        )
    first = calls[0]["function"]
    name, arguments = first.get("name"), first.get("arguments") or ""
    problem = validate_call(tools, name, arguments)
    correct = item.expect is not None and name == item.expect and problem is None
    args_match = False
    if correct:
        values = json.loads(arguments)
        args_match = all(
            want in str(values.get(key, "")).lower() for key, want in item.args.items()
        )
    return ToolResult(item.id, mode, item.expect, name, arguments, correct, args_match, problem)


def run(base_url: str, model: str, timeout_s: float = 600.0) -> list[ToolResult]:
    raw_tools, items = load_set()
    tools = [FunctionTool(**t["function"]) for t in raw_tools]
    results = []
    with httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s) as http:
        for mode in ("auto", "required"):
            for item in items:
                if mode == "required" and item.expect is None:
                    continue
                response = http.post(
                    "/chat/completions",
                    json={
                        "model": model,
                        "messages": [{"role": "user", "content": item.prompt}],
                        "tools": raw_tools,
                        "tool_choice": mode,
                        "temperature": 0,
                        "seed": 0,
                        "max_tokens": 200,
                    },
                )
                if response.status_code != 200:
                    raise RuntimeError(f"{item.id}: {response.status_code} {response.text}")
                message = response.json()["choices"][0]["message"]
                results.append(score(item, mode, message, tools))
    return results


def summary(results: list[ToolResult]) -> dict[str, Any]:
    """Shares of correct requests per mode, split into prompts needing a tool and not."""
    out: dict[str, Any] = {}
    for mode in ("auto", "required"):
        rows = [r for r in results if r.mode == mode]
        if not rows:
            continue
        need = [r for r in rows if r.expect is not None]
        none = [r for r in rows if r.expect is None]
        out[mode] = {
            "n": len(rows),
            "correct": round(sum(r.correct for r in rows) / len(rows), 3),
            "tool_prompts_correct": round(sum(r.correct for r in need) / max(1, len(need)), 3),
            "tool_prompts_args_match": round(
                sum(r.args_match for r in need) / max(1, len(need)), 3
            ),
            "no_tool_prompts_correct": (
                round(sum(r.correct for r in none) / len(none), 3) if none else None
            ),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="the service's /v1 URL")
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", action="store_true", help="print every request's result too")
    args = parser.parse_args(argv)
    results = run(args.base_url, args.model)
    if args.rows:
        for r in results:
            print(json.dumps(asdict(r)))
    print(json.dumps({"model": args.model, **summary(results)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
