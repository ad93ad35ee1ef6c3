"""The gateway's server-sent events as the benchmarks read them: one JSON chunk per event.

A `data: {...}` line is a chunk, `data: [DONE]` and anything else are skipped, and an
error event (the gateway's `{"error": {...}}`, sent when a generation fails mid-stream)
raises `StreamError` with its message.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Iterator


class StreamError(RuntimeError):
    """The stream ended with an error event; the text is the gateway's message."""


def chunk_of(line: str) -> dict | None:
    """The JSON chunk of one SSE line; None for a line that carries none."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    chunk = json.loads(line[len("data: "):])
    if isinstance(chunk, dict) and "error" in chunk:
        error = chunk["error"]
        raise StreamError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
    return chunk


async def chunks(resp) -> AsyncIterator[dict]:
    """The chunks of an httpx streaming response (async)."""
    async for line in resp.aiter_lines():
        chunk = chunk_of(line)
        if chunk is not None:
            yield chunk


def chunks_sync(resp) -> Iterator[dict]:
    """The chunks of an httpx streaming response (sync)."""
    for line in resp.iter_lines():
        chunk = chunk_of(line)
        if chunk is not None:
            yield chunk
