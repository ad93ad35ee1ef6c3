"""Hostile bytes on every subject: each is dropped with an error, and every service keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import msgpack
import pytest

from shared.messages import (
    SUBJECT_ASSIGNMENTS, SUBJECT_CANCEL, SUBJECT_COMMIT, SUBJECT_GENERATE, SUBJECT_LEVEL, SUBJECT_OUTCOME,
    SUBJECT_PROFILE, SUBJECT_STATE_GET, SUBJECT_TOKENS, V, Commit, GenerateJob, Sampling, encode,
)

pytestmark = pytest.mark.stack

REQUEST_SUBJECTS = [SUBJECT_GENERATE, f"{SUBJECT_LEVEL}.drafter-code", f"{SUBJECT_LEVEL}.verifier", SUBJECT_COMMIT,
                    SUBJECT_STATE_GET]
PUBLISH_SUBJECTS = [SUBJECT_CANCEL, SUBJECT_OUTCOME, SUBJECT_PROFILE, SUBJECT_ASSIGNMENTS, f"{SUBJECT_TOKENS}.nobody"]


def payloads() -> dict[str, bytes]:
    good = encode(GenerateJob("bad-1", [1, 2, 3], 4))
    return {
        "not msgpack": b"\xc1\xc1\xc1",
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "wrong version": msgpack.packb({"v": V + 7, "type": "generate", "request_id": "x", "prompt": [], "max_tokens": 1}),
        "wrong type": encode(Commit("bad-2", 0, 0, [1])),
        "wrong field types": msgpack.packb({"v": V, "type": "generate", "request_id": 5, "prompt": "abc", "max_tokens": "many"}),
        "negative max_tokens": encode(GenerateJob("bad-3", [1, 2], -5)),
        "huge prompt ids": encode(GenerateJob("bad-4", [10**12], 4)),
        "bad request id": encode(GenerateJob("bad id with spaces*", [1, 2], 4)),
        "oversized": b"\x00" * (900 * 1024),
    }


def test_every_subject_survives_hostile_bytes(stack):
    from shared.service import connect

    _, settings = stack

    async def go() -> list[str]:
        nc = await connect(settings, "test-hostile")
        unanswered = []
        try:
            for subject in REQUEST_SUBJECTS:
                for name, data in payloads().items():
                    if name == "wrong type" and subject == SUBJECT_COMMIT:
                        continue  # that one is a valid commit
                    try:
                        await nc.request(subject, data, timeout=5)
                    except Exception:
                        unanswered.append(f"{subject}: {name}")
            for subject in PUBLISH_SUBJECTS:
                for data in payloads().values():
                    await nc.publish(subject, data)
            await nc.flush()
        finally:
            await nc.close()
        return unanswered

    # Request subjects answer even garbage (with an error), so a caller is never left waiting.
    assert asyncio.run(go()) == []
    # Every service still answers, and a request still completes correctly.
    health = httpx.get(f"{settings.gateway.http_url}/health", timeout=10).json()
    assert health["status"] == "ok", health
    resp = httpx.post(f"{settings.gateway.http_url}/v1/completions", timeout=60,
                      json={"model": "specmesh", "prompt": "def f(x):", "max_tokens": 8, "temperature": 0,
                            "speculation": {"chain": "drafter,verifier,target"}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1


def test_invalid_job_is_answered_with_an_error(stack):
    """A job the target cannot run comes back as an error batch, not silence."""
    from shared.messages import TokenBatch, decode
    from shared.service import connect

    _, settings = stack

    async def go(job: GenerateJob) -> TokenBatch:
        nc = await connect(settings, "test-badjob")
        try:
            inbox: asyncio.Queue = asyncio.Queue()
            await nc.subscribe(f"{SUBJECT_TOKENS}.{job.request_id}", cb=inbox.put)
            await nc.request(SUBJECT_GENERATE, encode(job), timeout=5)
            return decode((await asyncio.wait_for(inbox.get(), 30)).data, TokenBatch)
        finally:
            await nc.close()

    batch = asyncio.run(go(GenerateJob("bad-job-1", [1, 2], 4, chain=["target", "drafter"])))
    assert batch.finished and batch.finish_reason == "error"
    assert "target" in batch.error
    for n, (sampling, words) in enumerate([(Sampling(repetition_penalty=0.0), "repetition_penalty"),
                                           (Sampling(logit_bias_ids=[1, 2], logit_bias_values=[3.0]), "logit_bias"),
                                           (Sampling(response_format="yaml"), "response_format"),
                                           (Sampling(response_format="json_schema", json_schema="{"), "json_schema"),
                                           (Sampling(response_format="json_object", min_tokens=2), "min_tokens")]):
        batch = asyncio.run(go(GenerateJob(f"bad-job-s{n}", [1, 2], 4, sampling=sampling)))
        assert batch.finished and batch.finish_reason == "error" and words in batch.error
