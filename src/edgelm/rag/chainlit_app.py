"""Chainlit front end for local RAG: ``edgelm rag chat`` (or ``chainlit run chainlit_app.py``).

It owns no model: retrieval runs on the local collection and every token comes from the edgelm
service (``EDGELM_ENDPOINT`` or the local one), exactly like ``edgelm rag ask``. Environment:
``EDGELM_RAG_COLLECTION`` (collection), ``EDGELM_RAG_SLM`` / ``EDGELM_RAG_LLM`` (the models
behind the selector's SLM and LLM choices; "hybrid" is the router's virtual model).
Files dropped into the chat are copied under ``$EDGELM_HOME/rag/uploads/<collection>/`` and
ingested into the current collection (embedded by the service when the collection has vectors).
Start it with ``edgelm rag chat``, which also keeps Chainlit's own files out of the current
directory (see :mod:`edgelm.rag.chainlit_setup`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import chainlit as cl
from chainlit.input_widget import Select, Slider

from edgelm.rag.ingest import SUFFIXES
from edgelm.rag.local import LocalRag
from edgelm.settings import load_settings

MODEL_CHOICES = ["SLM", "LLM", "hybrid"]


def _model_for(choice: str) -> tuple[str, str | None]:
    """(model that answers, fallback) for a selector choice; only the SLM escalates."""
    slm = os.environ.get("EDGELM_RAG_SLM", "slm")
    llm = os.environ.get("EDGELM_RAG_LLM", "llm")
    if choice == "LLM":
        return llm, None
    if choice == "hybrid":
        return "hybrid", None
    return slm, llm


def _collection() -> str:
    return cl.user_session.get("collection") or os.environ.get("EDGELM_RAG_COLLECTION", "default")


@cl.on_chat_start
async def start() -> None:
    rag = load_settings().rag
    cl.user_session.set("collection", os.environ.get("EDGELM_RAG_COLLECTION", rag.collection))
    cl.user_session.set(
        "settings", {"model": "SLM", "top_k": rag.top_k, "temperature": rag.temperature}
    )
    await cl.ChatSettings(
        [
            Select(id="model", label="Model", values=MODEL_CHOICES, initial_index=0),
            Slider(
                id="top_k", label="Top-k context blocks", initial=rag.top_k, min=1, max=10, step=1
            ),
            Slider(
                id="temperature",
                label="Temperature",
                initial=rag.temperature,
                min=0,
                max=1.5,
                step=0.1,
            ),
        ]
    ).send()
    await cl.Message(
        content=f"Ask about the documents in collection **{_collection()}**, "
        "or drop files here to add them."
    ).send()


@cl.on_settings_update
async def update(settings: dict[str, Any]) -> None:
    cl.user_session.set("settings", settings)


async def _ingest(files: list[Any]) -> str:
    local = LocalRag(load_settings())
    name = _collection()
    folder = local.settings.home / "rag" / "uploads" / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    skipped = []
    for file in files:
        target = folder / Path(file.name).name
        if target.suffix.lower() not in SUFFIXES:
            skipped.append(target.name)
            continue
        shutil.copyfile(file.path, target)
        paths.append(target)
    if not paths:
        return "No supported files (.md, .txt, .html, .pdf) in the upload."
    try:
        report = await cl.make_async(local.ingest)(paths, name)
    except Exception as exc:  # e.g. the service is down and the collection needs embeddings
        return f"Could not ingest: {getattr(exc, 'message', None) or exc}"
    note = f" Skipped (unsupported): {', '.join(skipped)}." if skipped else ""
    failed = "".join(f"\n- failed {src}: {err}" for src, err in report.failed.items())
    return f"Ingested into **{name}**: {report.summary()}.{note}{failed}"


@cl.on_message
async def answer(message: cl.Message) -> None:
    files = [e for e in (message.elements or []) if getattr(e, "path", None)]
    if files:
        await cl.Message(content=await _ingest(files)).send()
    question = (message.content or "").strip()
    if not question:
        return
    prefs = cl.user_session.get("settings") or {}
    model, fallback = _model_for(str(prefs.get("model", "SLM")))
    local = LocalRag(load_settings())
    options = local.options(
        model=model,
        top_k=int(prefs.get("top_k", 4)),
        temperature=float(prefs.get("temperature", 0.3)),
    )
    options.fallback_model = fallback
    reply = cl.Message(content="")
    try:
        _, chunks, extension = await local.stream(question, options, collection=_collection())
        async for chunk in chunks:
            if chunk.text:
                await reply.stream_token(chunk.text)
    except Exception as exc:  # show the error in the chat instead of a dead spinner
        message_text = getattr(exc, "message", None) or str(exc)
        reply.content = f"Error: {message_text}"
        await reply.send()
        return
    citations = extension.get("citations", [])
    # Elements are named by chunk id, which is unique: Chainlit's side panel gathers every
    # element of the same name, so "[1]" of one answer would show the [1] of all the others.
    reply.elements = [
        cl.Text(
            name=c["chunk_id"],
            content=f"{c['source']} ({c['location']})\n\n{c['text']}",
            display="side",
        )
        for c in citations
    ]
    if citations:
        listing = "\n".join(f"- [{c['n']}] {c['chunk_id']} ({c['location']})" for c in citations)
        reply.content += f"\n\n**Sources**\n{listing}"
    note = (
        "refused: nothing relevant retrieved"
        if extension.get("refused")
        else extension.get("model")
    )
    if extension.get("escalated"):
        note = f"{note} (escalated)"
    reply.content += f"\n\n*{note}*"
    await reply.send()
