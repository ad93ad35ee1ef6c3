"""Speculation as services, on the real stack (real NATS, real PostgreSQL, tiny family).

The contract: whatever the chain, the gateway's output is the target's own, token for
token under greedy decoding and for the same seed when sampling.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest

from shared.messages import SUBJECT_LEVEL, LevelCall, LevelItem, LevelReply, decode, encode
from shared.stack.procs import PidFile, wait_until
from tests.stack_fixtures import target_only, token_prompts

pytestmark = pytest.mark.stack

CHAINS = ["target", "drafter,target", "verifier,target", "drafter,verifier,target",
          "ngram,drafter,target", "ngram,drafter,verifier,target", "fused,verifier,target"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(tiny_family):
    """30 token-id prompts from held-out code and prose."""
    return token_prompts(tiny_family, 15, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_family, prompts):
    return target_only(tiny_family, prompts, MAX_TOKENS)


def body(prompt, chain: str | None, **extra) -> dict:
    data = {"model": "specmesh", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True, **extra}
    if chain:
        data["speculation"] = {"chain": chain, "k": 3}
    return data


async def complete_all(url: str, bodies: list[dict], concurrency: int = 16) -> list[dict]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def one(b):
            async with limit:
                resp = await client.post("/v1/completions", json=b)
                assert resp.status_code == 200, resp.text
                return resp.json()

        return await asyncio.gather(*(one(b) for b in bodies))


@pytest.mark.parametrize("chain", CHAINS)
def test_every_chain_reproduces_target_only(stack, prompts, reference, chain):
    _, settings = stack
    results = asyncio.run(complete_all(settings.gateway.http_url, [body(p, chain) for p in prompts]))
    got = [r["choices"][0]["token_ids"] for r in results]
    mismatched = [i for i, (g, want) in enumerate(zip(got, reference)) if g != want]
    assert not mismatched, f"chain {chain}: prompts {mismatched} differ from target-only"
    report = results[0]["speculation"]
    assert report["chain"] == chain.split(",")
    levels = {lv["name"]: lv for r in results for lv in r["speculation"]["levels"]}
    assert set(levels) == set(chain.split(",")[:-1])  # every proposing level reports, the target does not
    for r in results:
        for lv in r["speculation"]["levels"]:
            assert 0 <= lv["accepted"] <= lv["drafted"]


def test_a_conversations_next_turn_starts_on_its_cached_head(stack, tiny_family, prompts):
    """Prefix caching through the services: a second turn (the first turn's prompt, its
    answer, a new question) and another question after the same opening run on the heads
    the target and the drafters still hold, and give the target alone's tokens."""
    from tests.test_metrics import metrics_url, scrape

    env, settings = stack
    opening, first, second = prompts[16] + prompts[17], prompts[2][:20], prompts[20][:20]
    target = metrics_url(env, "target")
    hits = ("specmesh_prefix_cache_hits_total", (("model", "target"),))
    before = scrape(target).get(hits, 0.0)
    salt = {"cache_salt": f"turns-{os.getpid()}"}  # apart from what the other tests cached
    answer = asyncio.run(complete_all(settings.gateway.http_url, [body(opening + first, "drafter,verifier,target",
                                                                       **salt)]))[0]["choices"][0]["token_ids"]
    turns = [opening + first + answer + second, opening + second]
    results = asyncio.run(complete_all(settings.gateway.http_url, [body(turns[0], "ngram,drafter,target", **salt)]))
    results += asyncio.run(complete_all(settings.gateway.http_url, [body(turns[1], "drafter,target", **salt)]))
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results]
    assert cached[0] >= len(opening + first + answer) - 1 and cached[1] >= len(opening)  # the client is told
    got = [answer] + [r["choices"][0]["token_ids"] for r in results]
    assert got == target_only(tiny_family, [opening + first] + turns, MAX_TOKENS)
    reused = scrape(target)[hits] - before
    assert reused >= len(opening + first + answer) - 1 + len(opening)


def test_requests_on_different_chains_at_once_reproduce_target_only(stack, prompts, reference):
    """One target worker serving every chain at the same time verifies them in one forward per round."""
    _, settings = stack
    chains = [CHAINS[i % len(CHAINS)] for i in range(len(prompts))]

    async def run() -> tuple[list[dict], list]:
        from shared.messages import SUBJECT_OUTCOME, Outcome, decode
        from shared.service import connect

        nc = await connect(settings, "test-outcomes")
        outcomes = []
        async def on_outcome(msg) -> None:
            outcomes.append(decode(msg.data, Outcome))

        sub = await nc.subscribe(SUBJECT_OUTCOME, cb=on_outcome)
        try:
            bodies = [body(p, c) for p, c in zip(prompts, chains)]
            for b in bodies[1::2]:  # k left out: the per-round depth policy steers these
                del b["speculation"]["k"]
            results = await complete_all(settings.gateway.http_url, bodies, 30)
            ids = {r["id"] for r in results}
            for _ in range(100):  # outcomes follow the commits' answers
                if len([o for o in outcomes if o.request_id in ids]) >= len(results):
                    break
                await asyncio.sleep(0.05)
            return results, [o for o in outcomes if o.request_id in ids]
        finally:
            await sub.unsubscribe()
            await nc.close()

    results, outcomes = asyncio.run(run())
    got = [r["choices"][0]["token_ids"] for r in results]
    mismatched = [(i, chains[i]) for i, (g, want) in enumerate(zip(got, reference)) if g != want]
    assert not mismatched, f"differ from target-only: {mismatched}"
    assert [r["speculation"]["chain"] for r in results] == [c.split(",") for c in chains]
    # The driver tells the router which requests shared their rounds with other chains.
    assert len(outcomes) == len(results) and any(o.mixed_share > 0 for o in outcomes)
    assert all(0 <= o.mixed_share <= 1 for o in outcomes)
    # And each steered request's rounds by the depth the policy allowed (none for a pinned k).
    by_id = {o.request_id: o for o in outcomes}
    for i, r in enumerate(results):
        depths, ks = by_id[r["id"]].depths, by_id[r["id"]].k
        if i % 2 == 0 or chains[i] == "target":
            assert depths == [], (i, chains[i], depths)
        else:
            assert 1 <= len(depths) <= ks[-1] + 1 and sum(depths) >= 1, (chains[i], ks, depths)


INDEPENDENT = ["drafter-code,target", "drafter-prose,target", "verifier,target", "ngram,target"]


def test_chains_proposing_at_once_reproduce_target_only(stack, prompts, reference):
    """Chains that share no lower level propose in threads of their own (`parallel_chains`):
    greedy and seeded outputs stay the target's, 30 requests over four such chains at once."""
    _, settings = stack
    assert settings.speculation.parallel_chains
    chains = [INDEPENDENT[i % len(INDEPENDENT)] for i in range(len(prompts))]
    results = asyncio.run(complete_all(settings.gateway.http_url, [body(p, c) for p, c in zip(prompts, chains)], 30))
    mismatched = [(i, chains[i]) for i, (r, want) in enumerate(zip(results, reference))
                  if r["choices"][0]["token_ids"] != want]
    assert not mismatched, f"differ from target-only: {mismatched}"
    sampled = dict(temperature=0.9, top_p=0.95)
    seeded = [body(p, c, seed=99 + i, **sampled) for i, (p, c) in enumerate(zip(prompts[:12], chains))]
    alone = [body(p, None, seed=99 + i, speculation={"enabled": False}, **sampled) for i, p in enumerate(prompts[:12])]
    together = asyncio.run(complete_all(settings.gateway.http_url, seeded, 30))
    target = asyncio.run(complete_all(settings.gateway.http_url, alone, 30))
    assert [r["choices"][0]["token_ids"] for r in together] == [r["choices"][0]["token_ids"] for r in target]


def test_seeded_sampling_is_the_same_through_every_chain(stack, prompts):
    _, settings = stack
    runs = {}
    for chain in ["target", "drafter,target", "drafter,verifier,target"]:
        bodies = [body(p, chain, temperature=0.9, top_p=0.95, seed=1234 + i) for i, p in enumerate(prompts[:8])]
        runs[chain] = [r["choices"][0]["token_ids"] for r in asyncio.run(complete_all(settings.gateway.http_url, bodies))]
    assert runs["drafter,target"] == runs["target"]
    assert runs["drafter,verifier,target"] == runs["target"]
    assert len({tuple(t) for t in runs["target"]}) > 1  # really sampled, not one fixed answer


def test_min_p_sampling_through_every_level_is_the_target_alones(stack, prompts):
    _, settings = stack
    runs = {}
    for chain in ["target", "drafter,target", "ngram,drafter,verifier,target"]:
        bodies = [body(p, chain, temperature=1.2, min_p=0.2, seed=77 + i) for i, p in enumerate(prompts[:8])]
        runs[chain] = [r["choices"][0]["token_ids"] for r in asyncio.run(complete_all(settings.gateway.http_url, bodies))]
    assert runs["drafter,target"] == runs["target"] == runs["ngram,drafter,verifier,target"]
    unfiltered = [body(p, "target", temperature=1.2, seed=77 + i) for i, p in enumerate(prompts[:8])]
    assert runs["target"] != [r["choices"][0]["token_ids"]
                              for r in asyncio.run(complete_all(settings.gateway.http_url, unfiltered))]


def test_allowed_token_ids_through_every_level_are_the_target_alones(stack, prompts, reference):
    _, settings = stack
    allowed = sorted({t for out in reference[:6] for t in out})[::2]
    runs = {}
    for chain in ["target", "ngram,drafter,verifier,target"]:
        bodies = [body(p, chain, allowed_token_ids=allowed) for p in prompts[:6]]
        runs[chain] = [r["choices"][0]["token_ids"] for r in asyncio.run(complete_all(settings.gateway.http_url, bodies))]
    assert runs["ngram,drafter,verifier,target"] == runs["target"]
    assert all(set(out) <= set(allowed) for out in runs["target"]) and runs["target"] != reference[:6]


def test_a_batch_file_through_the_services_is_the_target_alones(stack, prompts, reference, tmp_path):
    from shared.batch import plan_batch, read_batch, run_batch

    _, settings = stack
    lines = [json.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
                         "body": body(p, "drafter,verifier,target")}) for i, p in enumerate(prompts[:10])]
    out = tmp_path / "results.jsonl"
    summary = asyncio.run(run_batch(plan_batch(read_batch(lines), out), out, url=settings.gateway.http_url,
                                    concurrency=4))
    assert summary.outcomes == {"200": 10}
    got = {r["custom_id"]: r["response"]["body"]["choices"][0]["token_ids"]
           for r in map(json.loads, out.read_text().splitlines())}
    assert [got[f"p{i}"] for i in range(10)] == reference[:10]


def test_penalties_and_logit_bias_through_every_level_are_the_target_alones(stack, tiny_family, prompts, reference):
    """Penalties travel to every level (drafter and verifier services included) and each row
    is penalized by its own prefix: every chain gives the target alone's tokens, greedy and
    seeded, and they are not the unpenalized ones."""
    _, settings = stack
    url = settings.gateway.http_url
    extra = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3,
             "logit_bias": {"12": 4.0, "30": -100}}
    want = target_only(tiny_family, prompts[:8], MAX_TOKENS, presence_penalty=0.5, frequency_penalty=0.5,
                       repetition_penalty=1.3, logit_bias=((12, 4.0), (30, -100.0)))
    assert want != reference[:8]
    for chain in ["target", "ngram,drafter,target", "drafter,verifier,target", "fused,verifier,target"]:
        results = asyncio.run(complete_all(url, [body(p, chain, **extra) for p in prompts[:8]]))
        assert [r["choices"][0]["token_ids"] for r in results] == want, chain
    seeded = {chain: [r["choices"][0]["token_ids"] for r in asyncio.run(complete_all(
        url, [body(p, chain, temperature=0.9, seed=77 + i, **extra) for i, p in enumerate(prompts[:6])]))]
        for chain in ["target", "drafter,verifier,target"]}
    assert seeded["drafter,verifier,target"] == seeded["target"]


def test_json_mode_through_every_level_is_the_target_alones(stack, tiny_family, prompts):
    """response_format json_object travels to every level and each row is constrained by its
    own output: every chain gives the target alone's tokens under it, every text is the start
    of a JSON object, and one pushed to close (a bias on `}`) is a whole object that parses,
    finished by the end of sequence (finish reason stop)."""
    import json

    from transformers import AutoTokenizer

    _, settings = stack
    url = settings.gateway.http_url
    tok = AutoTokenizer.from_pretrained(str(tiny_family.path("target")))
    close = str(tok.convert_tokens_to_ids("}"))
    json_mode = {"response_format": {"type": "json_object"}}
    want = target_only(tiny_family, prompts[:6], MAX_TOKENS, response_format="json_object")
    for chain in ["target", "ngram,drafter,target", "drafter,verifier,target"]:
        results = asyncio.run(complete_all(url, [body(p, chain, **json_mode) for p in prompts[:6]]))
        assert [r["choices"][0]["token_ids"] for r in results] == want, chain
        assert all(r["choices"][0]["text"].startswith("{") for r in results)
    closed = asyncio.run(complete_all(url, [body(p, "ngram,drafter,verifier,target", logit_bias={close: 8},
                                                 **json_mode) for p in prompts[:3]]))
    for r in closed:
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["token_ids"][-1] == tok.eos_token_id
        assert isinstance(json.loads(choice["text"]), dict)
    # A schema: the same, and what closes validates against it (whitespace pushed down: the tiny
    # models would spend the budget on it).
    import jsonschema

    from shared.engine.grammar import token_bytes
    from shared.engine.json_schema import canonical_schema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tone": {"enum": ["warm", "cold"]},
                                               "n": {"type": "array", "items": {"type": "null"}, "maxItems": 2}}}
    spaces = {str(t): -10 for t, data in enumerate(token_bytes(tok)) if data and not data.strip()}
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
           "logit_bias": spaces, "max_tokens": 64}
    want = target_only(tiny_family, prompts[:4], 64, response_format="json_schema", json_schema=canonical_schema(schema),
                       logit_bias=tuple((int(t), -10.0) for t in spaces))
    for chain in ["ngram,drafter,verifier,target", "fused,target"]:
        results = asyncio.run(complete_all(url, [body(p, chain, **fmt) for p in prompts[:4]]))
        assert [r["choices"][0]["token_ids"] for r in results] == want, chain
    finished = [r["choices"][0] for r in results if r["choices"][0]["finish_reason"] == "stop"]
    assert finished
    for choice in finished:
        jsonschema.validate(json.loads(choice["text"]), schema)


def test_guided_choice_and_regex_through_every_level_are_the_target_alones(stack, tiny_family, prompts):
    """vLLM's guided_choice and guided_regex: every chain gives the target alone's tokens under
    the expression, and each answer is one of the choices (then the end of sequence)."""
    from shared.engine.regex import choice_regex

    _, settings = stack
    url = settings.gateway.http_url
    choices = ["return x", "def f(x):", "pass", "print(x)"]
    want = target_only(tiny_family, prompts[:4], MAX_TOKENS, response_format="regex", regex=choice_regex(choices))
    for chain in ["ngram,drafter,target", "drafter,verifier,target"]:
        results = asyncio.run(complete_all(url, [body(p, chain, guided_choice=choices) for p in prompts[:4]]))
        assert [r["choices"][0]["token_ids"] for r in results] == want, chain
        assert all(r["choices"][0]["text"] in choices and r["choices"][0]["finish_reason"] == "stop" for r in results)
    regex = r"[a-z]{1,6}_[0-9]{2}"
    want = target_only(tiny_family, prompts[:4], MAX_TOKENS, response_format="regex", regex=regex)
    results = asyncio.run(complete_all(url, [body(p, "ngram,drafter,target", guided_regex=regex) for p in prompts[:4]]))
    assert [r["choices"][0]["token_ids"] for r in results] == want


def test_tool_calls_through_every_level_are_the_target_alones(stack, tiny_family):
    """tool_choice "required": the output is constrained to the call list at every level, so
    each chain gives the target alone's tokens under the same schema; what finishes comes
    back as tool_calls whose arguments validate against the function's parameters (also
    through the OpenAI SDK)."""

    import jsonschema
    from openai import OpenAI
    from transformers import AutoTokenizer

    from services.gateway.chat import chat_prompt
    from services.gateway.openai_models import ChatCompletionRequest
    from services.gateway.tools import tool_plan
    from shared.engine.grammar import token_bytes

    _, settings = stack
    url = settings.gateway.http_url
    tok = AutoTokenizer.from_pretrained(str(tiny_family.path("target")))
    spaces = {str(t): -10 for t, data in enumerate(token_bytes(tok)) if data and not data.strip()}
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["C", "F"]}},
               "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": weather}},
             {"type": "function", "function": {"name": "clock"}}]
    questions = ["Weather in Paris?", "def add(a, b):", "What time is it?"]
    chats = [{"model": "specmesh", "messages": [{"role": "user", "content": q}], "tools": tools,
              "tool_choice": "required", "max_tokens": 80, "temperature": 0, "logit_bias": spaces,
              "return_token_ids": True} for q in questions]
    plans = [ChatCompletionRequest(**c) for c in chats]
    plan = tool_plan(plans[0].tools, plans[0].tool_choice, plans[0].parallel_tool_calls)
    prompts = [list(tok.encode(chat_prompt(tok, c.messages, plan))) for c in plans]
    want = target_only(tiny_family, prompts, 80, response_format="json_schema", json_schema=plan.schema(),
                       logit_bias=tuple((int(t), -10.0) for t in spaces))

    async def ask(chain: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=c | {
                "speculation": {"chain": chain, "k": 3}}) for c in chats))
        assert all(r.status_code == 200 for r in replies), replies[0].text
        return [r.json()["choices"][0] for r in replies]

    for chain in ["ngram,drafter,target", "drafter,verifier,target"]:
        choices = asyncio.run(ask(chain))
        assert [c["token_ids"] for c in choices] == want, chain
    called = [c for c in choices if c["finish_reason"] == "tool_calls"]
    assert called, [c["message"] for c in choices]
    for choice in called:
        for call in choice["message"]["tool_calls"]:
            arguments = json.loads(call["function"]["arguments"])
            if call["function"]["name"] == "weather":
                jsonschema.validate(arguments, weather)
            else:
                assert arguments == {}
    client = OpenAI(base_url=f"{url}/v1", api_key="dev")
    done = client.chat.completions.create(model="specmesh", messages=[{"role": "user", "content": "Time?"}],
                                          tools=tools, tool_choice={"type": "function", "function": {"name": "clock"}},
                                          max_tokens=80, temperature=0, extra_body={"logit_bias": spaces})
    assert done.choices[0].finish_reason == "stop", done.choices[0].message
    assert [(c.function.name, c.function.arguments) for c in done.choices[0].message.tool_calls] == [("clock", "{}")]


def test_min_tokens_ignore_eos_and_stop_token_ids_through_the_services(stack, tiny_family, prompts, reference):
    """vLLM's extensions: the end of sequence (pushed up by logit_bias) comes exactly at
    min_tokens, through a chain whose drafts run past it; ignore_eos runs on to max_tokens;
    a stop token ends the output where the target alone emits it, out of the text."""
    from transformers import AutoTokenizer

    _, settings = stack
    tok = AutoTokenizer.from_pretrained(str(tiny_family.path("target")))
    eos = tok.eos_token_id
    stops = [ref[6] for ref in reference[:3]]
    ended = asyncio.run(complete_all(settings.gateway.http_url, [
        body(p, "ngram,drafter,verifier,target", stop_token_ids=[stop]) for p, stop in zip(prompts[:3], stops)]))
    for r, ref, stop in zip(ended, reference, stops):
        cut = ref.index(stop)
        choice = r["choices"][0]
        assert choice["token_ids"] == ref[:cut + 1] and choice["finish_reason"] == "stop"
        assert choice["text"] == tok.decode(ref[:cut], skip_special_tokens=True)
    cut = reference[0].index(stops[0])  # the stop token as the last one max_tokens allows: still "stop"
    last = asyncio.run(complete_all(settings.gateway.http_url, [
        body(prompts[0], "drafter,target", max_tokens=cut + 1, stop_token_ids=[stops[0]])]))[0]["choices"][0]
    assert last["token_ids"] == reference[0][:cut + 1] and last["finish_reason"] == "stop"
    eager = {"logit_bias": {str(eos): 100}}
    held = asyncio.run(complete_all(settings.gateway.http_url, [
        body(p, chain, min_tokens=5, **eager) for p in prompts[:3] for chain in ("target", "ngram,drafter,target")]))
    for r in held:
        ids = r["choices"][0]["token_ids"]
        assert len(ids) == 6 and ids[-1] == eos and eos not in ids[:-1], ids
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 6
    on = asyncio.run(complete_all(settings.gateway.http_url, [
        body(prompts[0], "drafter,target", max_tokens=8, ignore_eos=True, **eager)]))[0]["choices"][0]
    assert on["token_ids"] == [eos] * 8 and on["finish_reason"] == "length" and on["text"] == ""


def test_logprobs_through_the_services_are_the_target_alones(stack, prompts, reference):
    """Log-probabilities travel worker -> state -> gateway with their tokens, and a chain's are
    the target alone's (its verify forward's rows, equal up to float round-off); the OpenAI
    client reads them in both APIs."""
    from openai import OpenAI

    _, settings = stack
    runs = {chain: asyncio.run(complete_all(settings.gateway.http_url,
                                            [body(p, chain, logprobs=3) for p in prompts[:6]]))
            for chain in ["target", "ngram,drafter,target"]}
    for alone, spec, want in zip(runs["target"], runs["ngram,drafter,target"], reference):
        assert spec["choices"][0]["token_ids"] == alone["choices"][0]["token_ids"] == want
        a, b = alone["choices"][0]["logprobs"], spec["choices"][0]["logprobs"]
        assert len(b["token_logprobs"]) == MAX_TOKENS and b["tokens"] == a["tokens"]
        assert b["token_logprobs"] == pytest.approx(a["token_logprobs"], abs=1e-4)
        for top_a, top_b in zip(a["top_logprobs"], b["top_logprobs"]):
            assert max(top_b.values()) == pytest.approx(max(top_a.values()), abs=1e-4)
        assert all(lp == max(top.values()) for lp, top in zip(b["token_logprobs"], b["top_logprobs"]))  # greedy
    client = OpenAI(base_url=f"{settings.gateway.http_url}/v1", api_key="dev")
    chat = client.chat.completions.create(model="specmesh", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert chat.choices[0].message.content in bytes(b for c in content for b in c.bytes).decode()


def test_state_forwards_the_logprobs_of_fresh_tokens_only(stack):
    """A commit that repeats committed tokens (a retry, a resume) passes on only the new
    tokens' log-probabilities, aligned with them; the record keeps them for a gateway that
    missed a batch; a job asking for too many is refused."""
    from shared.messages import (SUBJECT_COMMIT, SUBJECT_GENERATE, SUBJECT_STATE_GET, SUBJECT_TOKENS, Commit,
                                 GenerateJob, RequestState, StateQuery, TokenBatch, TokenLogprob, decode, encode)
    from shared.service import connect

    _, settings = stack
    lp = {t: TokenLogprob(-t / 10, [t], [-t / 10]) for t in range(1, 6)}

    async def go():
        nc = await connect(settings, "test-logprobs")
        try:
            inbox: asyncio.Queue = asyncio.Queue()
            await nc.subscribe(f"{SUBJECT_TOKENS}.lp-commit-1", cb=inbox.put)
            await nc.subscribe(f"{SUBJECT_TOKENS}.lp-job-1", cb=inbox.put)
            records = []
            for position, tokens, finished in [(0, [1, 2, 3], False), (1, [2, 3, 4, 5], True)]:
                scored = [lp[5]] if position == 0 else []  # the prompt [9, 5]: its second token's
                await nc.request(SUBJECT_COMMIT, encode(Commit("lp-commit-1", 0, position, tokens, prompt=[9, 5],
                                                               finished=finished, logprobs=[lp[t] for t in tokens],
                                                               prompt_logprobs=scored)), timeout=5)
                reply = await nc.request(SUBJECT_STATE_GET, encode(StateQuery("lp-commit-1")), timeout=5)
                records.append(decode(reply.data, RequestState))
            batches = [decode((await asyncio.wait_for(inbox.get(), 10)).data, TokenBatch) for _ in range(2)]
            await nc.request(SUBJECT_GENERATE, encode(GenerateJob("lp-job-1", [1, 2], 4, logprobs=21)), timeout=5)
            return records, batches, decode((await asyncio.wait_for(inbox.get(), 30)).data, TokenBatch)
        finally:
            await nc.close()

    records, (first, second), refused = asyncio.run(go())
    assert records[0].committed == [1, 2, 3] and records[0].logprobs == [lp[1], lp[2], lp[3]]
    assert records[0].prompt_logprobs == first.prompt_logprobs == [lp[5]] and second.prompt_logprobs == []
    assert not records[1].found  # finished: forgotten
    assert first.tokens == [1, 2, 3] and first.logprobs == [lp[1], lp[2], lp[3]]
    assert (second.position, second.tokens, second.logprobs) == (3, [4, 5], [lp[4], lp[5]])
    assert refused.finish_reason == "error" and "logprobs" in refused.error


def test_a_restarted_state_service_still_has_every_logprob(stack):
    """The record keeps its log-probabilities one key per commit: after kill -9 of the state
    service, the new process reads them all back; finishing deletes them."""
    from nats.js.errors import NoKeysError

    from shared.messages import SUBJECT_COMMIT, SUBJECT_STATE_GET, Commit, RequestState, StateQuery, TokenLogprob
    from shared.nats_auth import KV_LOGPROBS_BUCKET
    from shared.service import connect

    _, settings = stack
    lp = [TokenLogprob(-t / 8, [t, t + 1], [-t / 8, -1.0]) for t in range(12)]
    prompt_lp = [TokenLogprob(-0.5, [3], [-0.5])]

    async def ask(nc, message, timeout=5.0):
        return decode((await nc.request(SUBJECT_COMMIT if isinstance(message, Commit) else SUBJECT_STATE_GET,
                                         encode(message), timeout=timeout)).data, RequestState)

    async def commits(nc, spans, finished_last=False):
        for i, (start, end) in enumerate(spans):
            last = finished_last and i == len(spans) - 1
            reply = await ask(nc, Commit("lp-restart-1", 0, start, list(range(start, end)), prompt=[7, 3],
                                         finished=last, logprobs=lp[start:end],
                                         prompt_logprobs=prompt_lp if start == 0 else []))
            assert reply.error is None, reply.error

    async def before():
        nc = await connect(settings, "test-lp-restart")
        try:
            await commits(nc, [(0, 3), (3, 5), (5, 9)])
        finally:
            await nc.close()

    async def after():
        nc = await connect(settings, "test-lp-restart", user="admin")
        try:
            record = await ask(nc, StateQuery("lp-restart-1"), timeout=10)
            kv = await nc.jetstream().key_value(KV_LOGPROBS_BUCKET)
            stored = sorted(k for k in await kv.keys() if k.startswith("lp-restart-1."))
            await commits(nc, [(9, 12)], finished_last=True)
            await asyncio.sleep(1.0)  # the segments are deleted off the commit path
            try:
                left = [k for k in await kv.keys() if k.startswith("lp-restart-1.")]
            except NoKeysError:
                left = []
            return record, stored, left
        finally:
            await nc.close()

    asyncio.run(before())
    pid = PidFile(settings.run_dir, "state").read().pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _health(settings) == "ok" and PidFile(settings.run_dir, "state").read().pid != pid, 120, 0.5)
    record, stored, left = asyncio.run(after())
    assert record.committed == list(range(9)) and record.logprobs == lp[:9] and record.prompt_logprobs == prompt_lp
    assert stored == ["lp-restart-1.0", "lp-restart-1.3", "lp-restart-1.5"]
    assert left == []


def test_stored_responses_continue_and_outlive_a_gateway_restart(stack):
    """A Responses answer is kept in JetStream: a follow-up with previous_response_id gives
    what the whole conversation sent as chat gives, and after kill -9 of the gateway the new
    one still reads it back; deleting it makes a follow-up a 404."""
    _, settings = stack
    url = settings.gateway.http_url
    ask = {"model": "specmesh", "temperature": 0, "max_output_tokens": 12}

    async def turns():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            first = (await c.post("/v1/responses", json=ask | {"input": "def add(a, b):"})).json()
            second = (await c.post("/v1/responses", json=ask | {"input": "def mul(a, b):",
                                                                  "previous_response_id": first["id"]})).json()
            chat = (await c.post("/v1/chat/completions", json={
                "model": "specmesh", "temperature": 0, "max_tokens": 12, "speculation": {"enabled": False},
                "messages": [{"role": "user", "content": "def add(a, b):"},
                             {"role": "assistant", "content": first["output"][0]["content"][0]["text"]},
                             {"role": "user", "content": "def mul(a, b):"}]})).json()
            return first, second, chat

    first, second, chat = asyncio.run(turns())
    assert first["store"] is True and second["previous_response_id"] == first["id"]
    assert second["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    pid = PidFile(settings.run_dir, "gateway").read().pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _health(settings) == "ok" and PidFile(settings.run_dir, "gateway").read().pid != pid,
                      120, 0.5)

    async def after():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            again = (await c.get(f"/v1/responses/{second['id']}")).json()
            deleted = await c.delete(f"/v1/responses/{first['id']}")
            orphan = await c.post("/v1/responses", json=ask | {"input": "x", "previous_response_id": first["id"]})
            return again, deleted.status_code, orphan.status_code

    again, deleted, orphan = asyncio.run(after())
    assert again == {k: v for k, v in second.items() if k != "trace_id"} and (deleted, orphan) == (200, 404)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "specmesh_background_responses " in metrics and "specmesh_responses_stored_total" in metrics


def test_a_background_response_through_the_services_is_the_answered_one(stack):
    _, settings = stack
    ask = {"model": "specmesh", "temperature": 0, "max_output_tokens": 16, "input": "class Stack:"}

    async def run():
        async with httpx.AsyncClient(base_url=settings.gateway.http_url, timeout=120) as c:
            whole = (await c.post("/v1/responses", json=ask | {"store": False})).json()
            queued = (await c.post("/v1/responses", json=ask | {"background": True})).json()
            for _ in range(600):
                polled = (await c.get(f"/v1/responses/{queued['id']}")).json()
                if polled["status"] not in ("queued", "in_progress"):
                    return whole, queued, polled
                await asyncio.sleep(0.1)
            raise AssertionError(f"still {polled['status']}")

    whole, queued, polled = asyncio.run(run())
    assert queued["status"] == "queued" and polled["status"] == whole["status"]
    assert polled["output"][0]["content"] == whole["output"][0]["content"]


def test_a_batch_with_n_samples_is_its_single_requests(stack, prompts):
    """Prompts x n choices in one request run as requests of their own: choice p * n + j is
    what prompt p alone gives with seed + j, on any chain."""
    _, settings = stack
    batch = body(prompts[:2], "drafter,verifier,target", temperature=0.9, seed=40, n=2)
    [whole] = asyncio.run(complete_all(settings.gateway.http_url, [batch]))
    singles = asyncio.run(complete_all(settings.gateway.http_url, [
        body(p, "target", temperature=0.9, seed=40 + j) for p in prompts[:2] for j in range(2)]))
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    assert [c["token_ids"] for c in whole["choices"]] == [r["choices"][0]["token_ids"] for r in singles]
    assert whole["choices"][0]["token_ids"] != whole["choices"][1]["token_ids"]  # two samples, not one twice
    assert whole["usage"]["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in singles)


def test_scoring_a_completion_with_echo_gives_the_logprobs_it_was_generated_with(stack, prompts):
    """What evaluation harnesses do: `echo` with `max_tokens: 0` scores a text. Scoring the
    prompt plus its greedy completion gives, at the completion's positions, the very
    log-probabilities the completion was generated with (on another chain, too)."""
    _, settings = stack
    [made] = asyncio.run(complete_all(settings.gateway.http_url, [body(prompts[0], "drafter,target", logprobs=1)]))
    completion = made["choices"][0]["token_ids"]
    text = prompts[0] + completion
    [scored] = asyncio.run(complete_all(settings.gateway.http_url, [
        body(text, "ngram,target", logprobs=1, echo=True, max_tokens=0)]))
    lp = scored["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(text) and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][len(prompts[0]):] == pytest.approx(made["choices"][0]["logprobs"]["token_logprobs"],
                                                                    abs=1e-4)
    assert scored["usage"]["completion_tokens"] == 0 and scored["choices"][0]["token_ids"] == []


def test_prompt_logprobs_are_the_scored_prompts(stack, prompts):
    """vLLM's prompt_logprobs carry what echo scores, with each token's rank in the target's
    distribution (1 exactly where it is the likeliest)."""
    _, settings = stack
    [scored, echoed] = asyncio.run(complete_all(settings.gateway.http_url, [
        body(prompts[0], "drafter,target", max_tokens=1, prompt_logprobs=2),
        body(prompts[0], "drafter,target", max_tokens=1, echo=True, logprobs=2)]))
    got = scored["choices"][0]["prompt_logprobs"]
    want = echoed["choices"][0]["logprobs"]["token_logprobs"][:len(prompts[0])]  # the prompt's, then the token made
    assert got[0] is None and len(got) == len(prompts[0])
    for token, entry, logprob in zip(prompts[0][1:], got[1:], want[1:]):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(logprob, abs=1e-5)
        likeliest = next(iter(entry))
        assert (mine["rank"] == 1) == (likeliest == str(token)) and mine["rank"] >= 1


def test_unseeded_sampling_reports_expected_acceptance_per_level(stack, prompts):
    """Sampled requests carry each level's measured 1 - TV to the client (and to the router)."""
    _, settings = stack
    bodies = [body(p, "drafter,verifier,target", temperature=1.0) for p in prompts[:4]]
    results = asyncio.run(complete_all(settings.gateway.http_url, bodies))
    levels = [lv for r in results for lv in r["speculation"]["levels"] if lv["drafted"]]
    assert levels and all(0 < lv["expected_acceptance"] <= 1 for lv in levels), levels
    greedy = asyncio.run(complete_all(settings.gateway.http_url, [body(prompts[0], "drafter,target")]))
    assert all(lv["expected_acceptance"] is None for lv in greedy[0]["speculation"]["levels"])


def test_openai_client_completions_and_chat(stack):
    from openai import OpenAI

    _, settings = stack
    client = OpenAI(base_url=f"{settings.gateway.http_url}/v1", api_key="dev")
    done = client.completions.create(model="specmesh", prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens > 0
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="specmesh", prompt="def add(a, b):", max_tokens=12, temperature=0, stream=True) if chunk.choices)
    assert streamed == done.choices[0].text
    chat = client.chat.completions.create(model="specmesh", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=10, temperature=0)
    assert chat.choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="specmesh", messages=[{"role": "user", "content": "Hello"}], max_tokens=10, temperature=0,
        stream=True) if c.choices]
    assert "".join(parts) == chat.choices[0].message.content
    answered = client.responses.create(model="specmesh", input="Hello", max_output_tokens=10, temperature=0)
    assert answered.output_text == chat.choices[0].message.content  # the Responses API is the same chat
    streamed = "".join(e.delta for e in client.responses.create(model="specmesh", input="Hello", max_output_tokens=10,
                                                                temperature=0, stream=True)
                       if e.type == "response.output_text.delta")
    assert streamed == answered.output_text


def test_openai_client_parses_structured_outputs_into_a_pydantic_model(stack, tiny_family):
    """The OpenAI SDK's `chat.completions.parse(response_format=Model)` (strict json_schema):
    the answer parses as the model (whitespace pushed down: the tiny models would spend
    max_tokens on it)."""
    from typing import Literal

    from openai import OpenAI
    from pydantic import BaseModel, Field
    from transformers import AutoTokenizer

    from shared.engine.grammar import token_bytes

    class Mood(BaseModel):
        ok: bool
        tone: Literal["warm", "cold"]
        words: list[Literal["a", "b"]] = Field(max_length=2)

    _, settings = stack
    client = OpenAI(base_url=f"{settings.gateway.http_url}/v1", api_key="dev")
    tok = AutoTokenizer.from_pretrained(str(tiny_family.path("target")))
    spaces = {str(t): -10 for t, data in enumerate(token_bytes(tok)) if data and not data.strip()}
    parsed = [client.chat.completions.parse(model="specmesh", messages=[{"role": "user", "content": text}],
                                            response_format=Mood, max_tokens=96, temperature=0,
                                            extra_body={"logit_bias": spaces})
              for text in ("How is it?", "Say something.")]
    for answer in parsed:
        assert isinstance(answer.choices[0].message.parsed, Mood), answer.choices[0].message.content


def test_grpc_generate_and_stream(stack):
    import grpc

    from services.gateway.proto import generate_pb2, generate_pb2_grpc

    _, settings = stack

    async def go():
        async with grpc.aio.insecure_channel(f"{settings.gateway.host}:{settings.gateway.grpc_port}") as channel:
            stub = generate_pb2_grpc.TextGenerationStub(channel)
            request = generate_pb2.GenerateRequest(
                prompt="def add(a, b):", max_tokens=12, sampling=generate_pb2.SamplingParameters(temperature=0))
            whole = await stub.Generate(request)
            pieces = [r async for r in stub.GenerateStream(request)]
            chat = await stub.Generate(generate_pb2.GenerateRequest(
                messages=[generate_pb2.ChatMessage(role="user", content="def add(a, b):")], max_tokens=12,
                sampling=generate_pb2.SamplingParameters(temperature=0)))
            scored = await stub.Generate(generate_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7, 8, 9], max_tokens=1,
                                                                      prompt_logprobs=1))
            return whole, pieces, chat, scored

    whole, pieces, chat, scored = asyncio.run(go())
    assert len(scored.prompt_logprobs) == 4 and all(lp.rank >= 1 and lp.logprob <= 0 for lp in scored.prompt_logprobs)
    [via_http] = asyncio.run(complete_all(settings.gateway.http_url, [{"model": "specmesh", "prompt": [5, 6, 7, 8, 9],
                                                                        "max_tokens": 1, "prompt_logprobs": 1}]))
    assert [lp.rank for lp in scored.prompt_logprobs] == [
        entry[str(t)]["rank"] for entry, t in zip(via_http["choices"][0]["prompt_logprobs"][1:], [6, 7, 8, 9])]
    assert whole.text
    assert "".join(p.text for p in pieces) == whole.text
    [http] = asyncio.run(complete_all(settings.gateway.http_url, [{"model": "specmesh", "prompt": "User: def add(a, b):\nAssistant:",
                                                                    "max_tokens": 12, "temperature": 0}]))
    assert chat.text == http["choices"][0]["text"]  # the conversation rendered as the chat API renders it


def test_stale_epoch_message_is_dropped(stack):
    """A level call tagged with an older epoch changes nothing on the replica."""
    from shared.service import connect

    _, settings = stack

    async def go():
        nc = await connect(settings, "test-intruder")
        try:
            subject = f"{SUBJECT_LEVEL}.drafter-code"
            from shared.messages import Sampling

            call = LevelCall("prefill", [LevelItem("stale-test", 5, 0, [1, 2, 3, 4], sampling=Sampling())])
            first = decode((await nc.request(subject, encode(call), timeout=5)).data, LevelReply)
            sticky = f"{subject}.{first.worker}"
            stale = LevelCall("rollback", [LevelItem("stale-test", 4, 1)])
            refused = decode((await nc.request(sticky, encode(stale), timeout=5)).data, LevelReply)
            probe = LevelCall("rollback", [LevelItem("stale-test", 5, 4)])
            after = decode((await nc.request(sticky, encode(probe), timeout=5)).data, LevelReply)
            await nc.request(sticky, encode(LevelCall("release", [LevelItem("stale-test", 5, 0)])), timeout=5)
            garbage = await nc.request(sticky, b"\x93\x01\x02", timeout=5)
            return first, refused, after, decode(garbage.data, LevelReply)
        finally:
            await nc.close()

    first, refused, after, garbage = asyncio.run(go())
    assert first.results[0].length == 4
    assert refused.results[0].error == "stale epoch"
    assert after.results[0].error is None and after.results[0].length == 4  # still all four tokens
    assert garbage.error and "bad message" in garbage.error


def test_killed_drafter_mid_request_still_gives_identical_output(stack, prompts, reference):
    """kill -9 of the drafter while 16 requests run: a shorter chain takes over, output unchanged."""
    env, settings = stack
    run_dir = settings.run_dir

    async def go():
        task = asyncio.create_task(complete_all(settings.gateway.http_url,
                                                [body(p, "drafter,target", max_tokens=MAX_TOKENS) for p in prompts[:16]]))
        await asyncio.sleep(0.5)
        os.kill(PidFile(run_dir, "drafter").read().pid, signal.SIGKILL)
        return await task

    results = asyncio.run(go())
    got = [r["choices"][0]["token_ids"] for r in results]
    assert got == reference[:16]
    # The supervisor restarts the drafter, and the stack is healthy again.
    assert wait_until(lambda: _health(settings) == "ok", 120, 0.5)


def _health(settings) -> str | None:
    try:
        return httpx.get(f"{settings.gateway.http_url}/health", timeout=5).json()["status"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError):
        return None


def test_bench_serve_reports_identical_outputs_and_overhead(stack):
    from tests.stack_fixtures import specmesh

    env, _ = stack
    out = specmesh(env, "bench", "serve", "--prompts", "2", "--max-tokens", "8", "--chains", "target;drafter,target",
                   "--json", timeout=300)
    report = json.loads(out.stdout)
    assert set(report["chains"]) == {"target", "drafter,target"}
    for row in report["chains"].values():
        assert row["identical"] is True
        assert row["services"]["tokens_per_s"] > 0 and row["engine"]["tokens_per_s"] > 0
        assert row["distribution_overhead"] == round(1 - row["services"]["tokens_per_s"] / row["engine"]["tokens_per_s"], 3)
