"""The virtual-model hook: names served by code on top of real models, same routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi.testclient import TestClient

from edgelm.server.app import create_app
from edgelm.server.virtual import VirtualAnswer, VirtualModel
from edgelm.types import Chunk, GenerationRequest


class Shout(VirtualModel):
    """``shout:<model>`` answers with the model's answer in capitals."""

    def matches(self, name: str) -> bool:
        return name.startswith("shout:")

    def cards(self, state):
        return [self.card(state, "shout:fake-a", description="capitals")]

    async def answer(self, state, name: str, request: GenerationRequest) -> VirtualAnswer:
        base = name.split(":", 1)[1]
        state.catalog.resolve(base)  # unknown base model → 404 before streaming
        result = VirtualAnswer(
            chunks=self._stream(state, base, request), headers={"x-edgelm-base": base}
        )

        async def chunks() -> AsyncIterator[Chunk]:
            n = 0
            async for chunk in result.chunks:
                n += 1
                yield replace(chunk, text=chunk.text.upper())
            result.extension["chunks"] = n

        return VirtualAnswer(chunks=chunks(), extension=result.extension, headers=result.headers)

    async def _stream(self, state, base, request) -> AsyncIterator[Chunk]:
        async for chunk in state.pool.stream(base, request):
            yield chunk


def make(settings, catalog) -> TestClient:
    return TestClient(create_app(settings, catalog=catalog, virtual=[Shout()]))


MSG = [{"role": "user", "content": "hi"}]


def test_virtual_model_listed_and_answers(settings, catalog) -> None:
    with make(settings, catalog) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert "shout:fake-a" in ids
        assert client.get("/v1/models/shout:fake-a").json()["tier"] == "virtual"
        response = client.post(
            "/v1/chat/completions", json={"model": "shout:fake-a", "messages": MSG}
        )
        body = response.json()
        assert body["model"] == "shout:fake-a"
        assert body["choices"][0]["message"]["content"] == "FAKE ANSWER TO: HI"
        assert body["edgelm"] == {"chunks": 5}
        assert response.headers["x-edgelm-base"] == "fake-a"
        assert body["usage"]["completion_tokens"] == 4


def test_virtual_model_streams_with_extension(settings, catalog) -> None:
    with make(settings, catalog) as client:
        payload = {"model": "shout:fake-b", "messages": MSG, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            assert response.headers["x-edgelm-base"] == "fake-b"
            lines = [b for b in response.read().decode().split("\n\n") if b]
        events = [json.loads(b[6:]) for b in lines[:-1]]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert text == "FAKE ANSWER TO: HI"
        assert events[-1]["edgelm"] == {"chunks": 5}


def test_virtual_model_errors(settings, catalog) -> None:
    with make(settings, catalog) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "shout:nope", "messages": MSG}
        )
        assert response.status_code == 404 and "fake-a" in response.json()["error"]["message"]
