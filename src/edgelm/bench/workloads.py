"""Prompt sets for benchmarks: built-in short / medium / long / unique sets, or a user's
JSONL file.

The order is shuffled with a fixed seed, so two runs with the same options send the same
prompts in the same order and their figures can be compared.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgelm.errors import InvalidRequest

BUILTIN_SETS = ("short", "medium", "long", "mixed", "unique")

# The "unique" set: every question a different prompt, so that servers with a prompt cache
# (ours, llama.cpp's RAM cache) can reuse only what real chats share, the chat template and
# system prompt, and not whole repeated prompts as in a small fixed set. 16 x 12 = 192.
_SUBJECTS = (
    "a hash table",
    "photosynthesis",
    "the French Revolution",
    "a binary search",
    "inflation",
    "a black hole",
    "the immune system",
    "public-key cryptography",
    "plate tectonics",
    "a compiler",
    "the water cycle",
    "supply and demand",
    "a neural network",
    "the Roman Empire",
    "climate change",
    "a database index",
)
_QUESTIONS = (
    "Explain what {} is to a ten-year-old.",
    "Give three facts about {}.",
    "What is the most common misconception about {}?",
    "Describe {} in two sentences.",
    "Why does {} matter?",
    "Write a short quiz question about {}.",
    "Compare {} with something from everyday life.",
    "What is the history of {}?",
    "List two advantages and one drawback of {}.",
    "How would you teach {} in five minutes?",
    "What question about {} do experts still argue over?",
    "Summarise {} for a busy manager.",
)


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    max_tokens: int | None = None

    @property
    def text(self) -> str:
        return "\n".join(str(m.get("content", "")) for m in self.messages)


def _rows_from_jsonl(text: str, origin: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{origin}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not ({"prompt", "messages"} & set(row)):
            raise InvalidRequest(f"{origin}, line {number}: needs a 'prompt' or 'messages' field")
        rows.append(row)
    if not rows:
        raise InvalidRequest(f"{origin} holds no prompts")
    return rows


def _to_prompt(row: dict[str, Any], fallback_id: str) -> Prompt:
    messages = row.get("messages") or [{"role": "user", "content": str(row["prompt"])}]
    return Prompt(
        id=str(row.get("id", fallback_id)), messages=messages, max_tokens=row.get("max_tokens")
    )


def builtin(name: str) -> list[Prompt]:
    if name == "unique":
        questions = [q.format(s) for q in _QUESTIONS for s in _SUBJECTS]
        return [_to_prompt({"prompt": q}, f"unique-{i + 1:03d}") for i, q in enumerate(questions)]
    text = resources.files("edgelm").joinpath("data/bench_prompts.jsonl").read_text("utf-8")
    rows = _rows_from_jsonl(text, "built-in prompts")
    if name not in BUILTIN_SETS:
        raise InvalidRequest(
            f"unknown prompt set '{name}'; choose one of {', '.join(BUILTIN_SETS)} or a .jsonl file"
        )
    chosen = rows if name == "mixed" else [r for r in rows if r["set"] == name]
    return [_to_prompt(r, r["id"]) for r in chosen]


def load_prompts(spec: str | None = None, prompt: str | None = None, seed: int = 0) -> list[Prompt]:
    """A single ``prompt``; or ``spec`` naming a built-in set or a JSONL file; shuffled by seed."""
    if prompt:
        return [Prompt(id="prompt", messages=[{"role": "user", "content": prompt}])]
    spec = spec or "short"
    path = Path(spec).expanduser()
    if spec.endswith(".jsonl") or path.is_file():
        if not path.is_file():
            raise InvalidRequest(f"prompt file {path} does not exist")
        rows = _rows_from_jsonl(path.read_text("utf-8"), str(path))
        prompts = [_to_prompt(r, f"{path.stem}-{i + 1}") for i, r in enumerate(rows)]
    else:
        prompts = builtin(spec)
    random.Random(seed).shuffle(prompts)
    return prompts
