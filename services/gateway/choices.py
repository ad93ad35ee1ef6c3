"""Several choices in one request: a batch of prompts (completions) and `n` samples of each.

Each choice is a generation of its own: its own request id (`<id>-<index>`), job, NATS
stream and router assignment. Every choice is planned before any starts, so a bad prompt
anywhere is a 400 and nothing runs. A choice's `index` is prompt * n + sample, as in the
OpenAI API. Sample j of a seeded request draws with seed + j: the n samples differ, and each
is the answer a single request with that seed gets. Under greedy decoding the n samples are
the same text. The choices run at once; one failing cancels the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from services.gateway.generation import (
    SEED_MAX, ApiError, Delta, Generation, GenerationRequest, Outcome, invalid, plan,
)
from shared.messages import GenerateJob

MAX_CHOICES = 64  # prompts x n per request


def choice_requests(base: GenerationRequest, prompts: Sequence[str | list[int]], n: int) -> list[GenerationRequest]:
    """One `GenerationRequest` per choice, in index order; ApiError when there are too many."""
    if len(prompts) * n > MAX_CHOICES:
        raise invalid(f"{len(prompts)} prompts x n={n} make {len(prompts) * n} choices; at most {MAX_CHOICES} "
                      f"per request (send several requests).", "n" if n > 1 else base.prompt_param)
    if len(prompts) * n == 1:
        return [replace(base, prompt=prompts[0])]
    out = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            seed = None if base.seed is None else (base.seed + j) % (SEED_MAX + 1)
            out.append(replace(base, request_id=f"{base.request_id}-{p * n + j}", prompt=prompt, seed=seed,
                               prompt_param=base.prompt_param if len(prompts) == 1 else f"{base.prompt_param}[{p}]"))
    return out


def plan_all(backend, settings, requests: Sequence[GenerationRequest]) -> list[tuple[GenerateJob, list[str]]]:
    """`plan` for every choice; if one cannot run, none is left counted in flight."""
    planned: list[tuple[GenerateJob, list[str]]] = []
    try:
        for request in requests:
            planned.append(plan(backend, settings, request))
    except ApiError:
        if (release := getattr(backend, "release", None)) is not None:
            for job, _ in planned:
                release(job.request_id)
        raise
    return planned


async def run_all(generations: Sequence[Generation]) -> list[Outcome]:
    """Every choice's outcome; the first error cancels the others and is raised."""
    tasks = [asyncio.ensure_future(g.run()) for g in generations]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def merged(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, Delta | None]]:
    """(choice index, delta) as each choice produces it; (index, None) when that choice has ended.

    The first error of any choice is raised here, and closing this iterator (the client
    gone) cancels every choice still running, which cancels its backend generation."""
    if len(generations) == 1:  # no tasks for the common case
        deltas = generations[0].deltas()
        try:
            async for delta in deltas:
                yield 0, delta
        finally:
            await deltas.aclose()
        yield 0, None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for delta in generation.deltas():
                queue.put_nowait((index, delta, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, delta, error = await queue.get()
            if error is not None:
                raise error
            running -= delta is None
            yield index, delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
