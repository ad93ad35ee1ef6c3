"""vLLM's structured-output fields on both endpoints (`guided_regex`, `guided_choice`,
`guided_json`, `structured_outputs`) against the in-memory backend: what reaches the job,
and the refusals (two constraints at once, a grammar, a bad expression)."""

from __future__ import annotations

import json

import pytest

from shared.engine.regex import compile_regex
from tests.test_engine_grammar import takes
from tests.test_gateway_api import MODEL, backend, client, service, tok  # noqa: F401

BODIES = {"/v1/completions": {"model": MODEL, "prompt": "Hi"},
          "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}}


@pytest.mark.parametrize("url", list(BODIES))
async def test_guided_fields_reach_the_job(client, backend, url):
    async def sampling(**extra):
        r = await client.post(url, json=BODIES[url] | extra)
        assert r.status_code == 200, r.text
        return backend.jobs[-1].sampling

    s = await sampling(guided_regex=r"[0-9]{2}")
    assert (s.response_format, s.regex) == ("regex", r"[0-9]{2}")
    for extra in ({"guided_choice": ["yes", "no (really)"]}, {"structured_outputs": {"choice": ["yes", "no (really)"]}}):
        s = await sampling(**extra)
        automaton = compile_regex(s.regex)
        assert s.response_format == "regex" and takes(automaton, "no (really)") and not takes(automaton, "no")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for extra in ({"guided_json": schema}, {"structured_outputs": {"json": schema}}):
        s = await sampling(**extra)
        assert s.response_format == "json_schema" and json.loads(s.json_schema) == schema
    s = await sampling(structured_outputs={"json_object": True})
    assert s.response_format == "json_object"
    s = await sampling(structured_outputs={"regex": "a+"})
    assert (s.response_format, s.regex) == ("regex", "a+")


@pytest.mark.parametrize("extra, param, words", [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one of"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format", "one of"),
    ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs", "grammar is not supported"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp", None),
    ({"guided_regex": "a(?=b)"}, "guided_regex", "lookarounds"),
    ({"guided_regex": "(a"}, "guided_regex", "not supported"),
    ({"guided_choice": []}, "guided_choice", None),
    ({"guided_choice": [""]}, "guided_choice[0]", None),
    ({"guided_json": {"type": "object", "patternProperties": {}}}, "response_format", "patternProperties"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens", None),
])
async def test_bad_guided_fields_are_refused_and_nothing_runs(client, backend, extra, param, words):
    before = len(backend.jobs)
    r = await client.post("/v1/completions", json=BODIES["/v1/completions"] | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert words is None or words in error["message"], error
    assert len(backend.jobs) == before
