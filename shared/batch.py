"""Batch files: many API requests from a JSONL file through the gateway, one result line each.

The format is OpenAI's Batch API's (and vLLM's `run-batch`'s). An input line:

    {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "specmesh", "messages": [{"role": "user", "content": "Hi"}]}}

`url` is one of `URLS`; `body` is that endpoint's request (no `stream`); a body without
`model` gets the served model's. An output line:

    {"id": "batch_req_<hex>", "custom_id": "q-1",
     "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}}, "error": null}

A request the gateway answered has its `response`, whatever the status (a 400 carries the
gateway's error body); one that got no answer after its retries (connection refused) has
`response: null` and an `error` {"code": "no_response", "message"}. A file with a line
that is not a request (not JSON, no `custom_id` or one used before, another `url`, a
`stream`) is refused whole, every such line named, before anything is sent (as OpenAI
validates a batch file).

Nothing finished is lost: each result is appended and flushed as its request ends, so a
run stopped at any point keeps what it finished. Run again with the same output file and
only the requests it lacks are sent (`resume`): a torn last line is dropped, and the
results that may come out otherwise (no answer, 408, 429, 5xx) are taken out of it and
sent again.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

URLS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
RETRIED = frozenset({408, 429, 500, 502, 503, 504})  # statuses a later attempt may turn into an answer
MAX_BACKOFF_S = 10.0
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class BatchRequest:
    """One line of a batch file."""

    line: int  # 1-based
    custom_id: str
    url: str
    body: dict


class BadBatch(ValueError):
    """A batch file with lines that are not requests; `problems` names each."""

    def __init__(self, problems: list[str]):
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        super().__init__("the batch file has lines that are not requests; nothing was sent:\n  "
                         + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))
        self.problems = problems


def read_batch(lines: list[str]) -> list[BatchRequest]:
    """The requests of a batch file's lines (blank lines skipped); BadBatch naming every line
    that is not one, and every `custom_id` used twice (ids name results)."""
    requests: list[BatchRequest] = []
    problems: list[str] = []
    first: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            request = _parse(number, text)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if request.custom_id in first:
            problems.append(f"line {number}: custom_id {request.custom_id!r} is line {first[request.custom_id]}'s "
                            f"too; each line needs its own")
            continue
        first[request.custom_id] = number
        requests.append(request)
    if problems:
        raise BadBatch(problems)
    return requests


def _parse(number: int, text: str) -> BatchRequest:
    try:
        item = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"line {number}: not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise ValueError(f"line {number}: a request is a JSON object, got {type(item).__name__}")
    custom_id, method, url, body = item.get("custom_id"), item.get("method", "POST"), item.get("url"), item.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError(f"line {number}: custom_id must be a non-empty string, got {custom_id!r}")
    if method != "POST":
        raise ValueError(f"line {number}: method must be 'POST', got {method!r}")
    if url not in URLS:
        raise ValueError(f"line {number}: url must be one of {', '.join(URLS)}, got {url!r}")
    if not isinstance(body, dict):
        raise ValueError(f"line {number}: body must be a JSON object (the request to {url}), got {body!r:.40}")
    if body.get("stream"):
        raise ValueError(f"line {number}: stream is not available in a batch (each result is one line); drop it")
    return BatchRequest(number, custom_id, url, body)


def read_results(path: Path) -> dict[str, dict]:
    """The results an output file holds, by custom_id, for `resume`.

    A last line without its newline (a run stopped mid-write) is cut off the file, and the
    results a retry may change (`retried`) are taken out of it (rewritten atomically). A
    line that is not a result is a ValueError, and the file is left as it was: it is not a
    batch output.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    kept: dict[str, dict] = {}
    keep_lines: list[bytes] = []
    for number, raw in enumerate(data[:data.rfind(b"\n") + 1].splitlines(keepends=True), start=1):
        if not raw.strip():
            continue
        try:
            result = json.loads(raw)
        except ValueError:
            raise ValueError(f"{path}, line {number}: not JSON, so not a batch output; give another output path") \
                from None
        if not isinstance(result, dict) or not isinstance(result.get("custom_id"), str) or "response" not in result:
            raise ValueError(f"{path}, line {number}: not a batch result (no custom_id or response); give another "
                             f"output path")
        if not retried(result):
            kept[result["custom_id"]] = result
            keep_lines.append(raw)
    new = b"".join(keep_lines)
    if new != data:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(new)
        os.replace(tmp, path)
    return kept


def retried(result: dict) -> bool:
    """Whether a result's request may be answered otherwise if sent again (it is, on resume)."""
    response = result.get("response")
    return not isinstance(response, dict) or response.get("status_code") in RETRIED


@dataclass
class BatchPlan:
    """What a run still has to do."""

    requests: list[BatchRequest]  # to send
    skipped: int  # requests whose results the output file already holds


def plan_batch(requests: list[BatchRequest], out: Path, resume: bool = True) -> BatchPlan:
    """The requests whose results `out` lacks (with `resume`; else all of them, and `out` is emptied)."""
    if not resume:
        out.write_bytes(b"")
        return BatchPlan(requests, 0)
    done = read_results(out)
    todo = [r for r in requests if r.custom_id not in done]
    return BatchPlan(todo, len(requests) - len(todo))


@dataclass
class BatchSummary:
    """What a run did: results by outcome, tokens, time."""

    sent: int = 0
    skipped: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "200", "400", ..., "no_response"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def succeeded(self) -> int:
        return sum(n for key, n in self.outcomes.items() if key.isdigit() and 200 <= int(key) < 300)

    @property
    def failed(self) -> int:
        return sum(self.outcomes.values()) - self.succeeded

    def as_dict(self) -> dict:
        rate = self.completion_tokens / self.elapsed_s if self.elapsed_s else None
        return {"sent": self.sent, "skipped": self.skipped, "succeeded": self.succeeded, "failed": self.failed,
                "outcomes": dict(sorted(self.outcomes.items())), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "elapsed_s": round(self.elapsed_s, 3),
                "completion_tokens_per_s": round(rate, 3) if rate is not None else None}


async def run_batch(plan: BatchPlan, out: Path, *, url: str, headers: dict[str, str] | None = None,
                    concurrency: int = 8, retries: int = 4, timeout_s: float = 600.0,
                    progress: Callable[[int], None] | None = None, ca_certs: Path | None = None) -> BatchSummary:
    """Send the plan's requests, `concurrency` at a time, appending each result to `out` as it ends.

    A request answered 408, 429 or 5xx, or not at all, is sent again up to `retries` times,
    after the `Retry-After` the gateway asked for or a doubling backoff. `ca_certs`: the PEM
    file that vouches for an https gateway's certificate (default: the system's).
    """
    if concurrency < 1 or retries < 0:
        raise ValueError(f"concurrency must be >= 1 and retries >= 0, got {concurrency} and {retries}")
    summary = BatchSummary(skipped=plan.skipped)
    started = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    verify = ssl.create_default_context(cafile=str(ca_certs)) if ca_certs else True
    async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=timeout_s, limits=limits,
                                 trust_env=False, verify=verify) as client:
        model = await _served_model(client) if any("model" not in r.body for r in plan.requests) else None
        gate = asyncio.Semaphore(concurrency)
        with out.open("a", encoding="utf-8") as sink:
            async def one(request: BatchRequest) -> None:
                async with gate:
                    summary.sent += 1
                    body = request.body if model is None or "model" in request.body else {"model": model} | request.body
                    result = await _send(client, request, body, retries)
                sink.write(json.dumps(result, separators=(",", ":"), ensure_ascii=False) + "\n")
                sink.flush()
                _count(summary, result)
                if progress:
                    progress(1)

            await asyncio.gather(*(one(r) for r in plan.requests))
    summary.elapsed_s = time.monotonic() - started
    return summary


async def _send(client: httpx.AsyncClient, request: BatchRequest, body: dict, retries: int) -> dict:
    """One request's result, after up to `retries` more attempts where another may answer."""
    for attempt in range(retries + 1):
        last = attempt == retries
        try:
            reply = await client.post(request.url, json=body)
        except httpx.HTTPError as exc:
            if last:
                return _result(request.custom_id, None, {"code": "no_response", "message": (
                    f"no answer from the gateway in {retries + 1} attempts: {type(exc).__name__}: {exc}")})
            await asyncio.sleep(_backoff(attempt))
            continue
        if reply.status_code in RETRIED and not last:
            await asyncio.sleep(_backoff(attempt, reply.headers.get("retry-after")))
            continue
        try:
            answer = reply.json()
        except ValueError:
            answer = {"error": {"message": reply.text[:1000], "type": "invalid_response", "param": None, "code": None}}
        return _result(request.custom_id, {"status_code": reply.status_code,
                                           "request_id": reply.headers.get("x-request-id", ""), "body": answer}, None)
    raise AssertionError("unreachable: the last attempt returns")


def _backoff(attempt: int, retry_after: str | None = None) -> float:
    """Seconds before the next attempt: the gateway's `Retry-After`, else 0.25 s doubling; at most 10 s."""
    try:
        asked = float(retry_after) if retry_after is not None else -1.0
    except ValueError:
        asked = -1.0
    return min(MAX_BACKOFF_S, asked if asked >= 0 else 0.25 * 2 ** attempt)


async def _served_model(client: httpx.AsyncClient) -> str | None:
    """The gateway's model name, for bodies that name none (None if it cannot say)."""
    try:
        reply = await client.get("/v1/models")
        return reply.json()["data"][0]["id"] if reply.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


def _result(custom_id: str, response: dict | None, error: dict | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


def _count(summary: BatchSummary, result: dict) -> None:
    response = result["response"]
    summary.outcomes[str(response["status_code"]) if response else result["error"]["code"]] += 1
    usage = response["body"].get("usage") if response and isinstance(response["body"], dict) else None
    if isinstance(usage, dict):
        summary.prompt_tokens += _tokens(usage.get("prompt_tokens", usage.get("input_tokens")))
        summary.completion_tokens += _tokens(usage.get("completion_tokens", usage.get("output_tokens")))


def _tokens(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
