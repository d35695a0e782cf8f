"""Terminal chat: a conversation kept on the client side, streamed from the service.

The session holds the history and the last result; :func:`run_repl` only reads lines and
prints, so the conversation logic is testable without a terminal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from edgelm.client import ChatResult, EdgelmClient


@dataclass
class ChatSession:
    client: EdgelmClient
    model: str
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    last: ChatResult | None = None

    def reset(self) -> None:
        self.history.clear()
        self.last = None

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def ask(self, text: str) -> Iterator[str]:
        """Send one user turn; yield the answer's text as it streams, then record it."""
        self.history.append({"role": "user", "content": text})
        try:
            for event in self.client.stream_chat(self.model, self.messages(), **self.params):
                if event.result is not None:
                    self.last = event.result
                elif event.text:
                    yield event.text
        except BaseException:
            self.history.pop()  # a failed turn is not part of the conversation
            raise
        answer = self.last.text if self.last else ""
        self.history.append({"role": "assistant", "content": answer})


def describe(result: ChatResult) -> str:
    """One line of figures after each answer."""
    ttft = f"{result.ttft_s * 1000:.0f} ms" if result.ttft_s is not None else "-"
    tps = result.decode_tokens_per_s
    rate = f"{tps:.1f} tok/s" if tps else "- tok/s"
    return (
        f"TTFT {ttft} · {rate} · {result.prompt_tokens} prompt + {result.completion_tokens} "
        f"answer tokens · {result.total_s:.2f} s"
    )


def run_repl(session: ChatSession, console: Console, once: str | None = None) -> None:
    """Chat until /exit (or end of input). ``once`` answers a single prompt and returns."""
    if once is not None:
        _answer(session, console, once)
        return
    console.print(f"[bold]{session.model}[/] — type a message; /reset clears, /exit quits.")
    while True:
        try:
            line = console.input("[bold cyan]> [/]")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            session.reset()
            console.print("[dim]conversation cleared[/]")
            continue
        _answer(session, console, text)


def _answer(session: ChatSession, console: Console, text: str) -> None:
    for piece in session.ask(text):
        console.print(piece, end="", markup=False, highlight=False)
    console.print()
    if session.last is not None:
        console.print(f"[dim]{describe(session.last)}[/]")
