"""response_format json_schema: the schema automaton, its refusals, and chains under it.

What the automaton completes is checked with the `jsonschema` library (a random walk over
the bytes it allows ends in an instance that validates), what a schema's instances written
in the schema's order look like is accepted, and chains emit the target alone's tokens
under the schema's mask (made here by a brute-force walk of every token's bytes).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.engine.grammar import advance, token_bytes
from shared.engine.json_schema import KEYWORDS, SchemaAutomaton, canonical_schema, compile_schema
from shared.engine.sampling import SamplingParams
from tests.test_engine_chain import MAX_TOKENS, engine_family, pool, prompts  # noqa: F401 - fixtures
from tests.test_engine_grammar import json_target_alone, takes

PERSON = {"type": "object", "title": "Person", "properties": {
    "name": {"type": "string", "description": "annotations are ignored"},
    "age": {"type": "integer"},
    "height": {"type": ["number", "null"]},
    "admin": {"type": "boolean"},
    "role": {"enum": ["user", "admin", 3, None]},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"const": "Paris"}, "zip": {"type": "string"}},
                "required": ["city"], "additionalProperties": False},
    "extra": {},
    "meta": {"type": "object"},
    "none": {"type": "object", "additionalProperties": {"type": "integer"}},
}, "required": ["name", "age"]}
SMALL = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                                          "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}}}
TREE = {"$defs": {"Node": {"type": "object", "properties": {
    "label": {"type": "string", "minLength": 1, "maxLength": 3},
    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 2}}}},
    "$ref": "#/$defs/Node"}
FORMATTED = {"type": "object", "properties": {
    "when": {"type": "string", "format": "date-time"}, "day": {"type": "string", "format": "date"},
    "id": {"type": "string", "format": "uuid"}, "ip": {"type": "string", "format": "ipv4"},
    "mail": {"type": "string", "format": "email"}, "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{1,3}$"},
    "free": {"type": "string", "pattern": "b+"}}}
SCHEMAS = [PERSON, SMALL, TREE, FORMATTED,
           {"type": "object", "properties": {"maybe": {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "null"}]},
                                             "one": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
                                             "all": {"allOf": [{"enum": ["x", "y"]}]}}},
           {"type": "object", "properties": {"n": {"enum": [1, 12, 123]}, "x": {"type": "number"}}},
           {"type": "object", "properties": {"list": {"type": "array", "items": {"type": "array",
                                                                                  "items": {"type": "integer"}}}}},
           {"type": "object"}, {"properties": {}},
           {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1},
                                             "t": {"type": "number", "exclusiveMinimum": -273.15},
                                             "d": {"type": "number", "minimum": 0.25, "exclusiveMaximum": 0.5},
                                             "m": {"type": "integer", "multipleOf": 7, "minimum": -50, "maximum": 50},
                                             "q": {"type": "number", "multipleOf": 0.25}}},
           {"type": "object", "properties": {  # overlapping anyOf: the automaton follows every branch that fits
               "pet": {"anyOf": [{"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}}},
                                 {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}}},
                                 {"type": "object", "properties": {"kind": {"const": "cow"}}}]},
               "n": {"anyOf": [{"type": "integer", "minimum": 10}, {"type": "number", "minimum": 0}]},
               "s": {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "string", "pattern": "^x+$"}]}}},
           {"type": "array", "minItems": 1, "items": {"anyOf": [  # a root list, as tool calls are
               {"type": "object", "properties": {"name": {"const": "add"}, "arguments": {
                   "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
               {"type": "object", "properties": {"name": {"const": "add_all"}, "arguments": {
                   "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}}}}}}]}}]


def walk(automaton, rng: random.Random, limit: int = 2000) -> bytes | None:
    """Random bytes the automaton allows, leaning towards closing, until it is done."""
    state, out = automaton.initial, bytearray()
    alphabet = list(range(0x20, 0x7F)) + [0x0A, 0xC3, 0xA9]
    while not automaton.done(state):
        if len(out) > limit:
            return None
        options = [b for b in alphabet if automaton.step(state, b) is not None]
        assert options, f"a dead end after {bytes(out)!r}"
        closers = [b for b in options if b in b'}]",:@.TZb-0123456789eltrfnu']
        b = rng.choice(closers if closers and rng.random() < 0.7 else options)
        state = automaton.step(state, b)
        out.append(b)
    return bytes(out)


def finished_walks(automaton, seed: int, tries: int, limit: int, enough: int) -> list[bytes]:
    """The walks (of `tries`) that close their object within `limit` bytes, at most `enough`."""
    rng, texts = random.Random(seed), []
    for _ in range(tries):
        text = walk(automaton, rng, limit)
        if text is not None:
            texts.append(text)
            if len(texts) == enough:
                break
    return texts


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_what_the_automaton_completes_validates(schema):
    """With formats asserted: jsonschema's checker for date, time, date-time, uuid, ipv4, email."""
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    texts = finished_walks(compile_schema(canonical_schema(schema)), seed=7, tries=60, limit=600, enough=12)
    for text in texts:
        jsonschema.validate(json.loads(text), schema, format_checker=checker)
    assert len(texts) >= 5


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=8), age=st.integers(-10**6, 10**6), height=st.none() | st.floats(allow_nan=False, allow_infinity=False),
       admin=st.booleans(), role=st.sampled_from(["user", "admin", 3, None]), tags=st.lists(st.text(max_size=4), min_size=1, max_size=3),
       indent=st.sampled_from([None, 2]))
def test_instances_in_the_schemas_order_are_accepted(name, age, height, admin, role, tags, indent):
    instance = {"name": name, "age": age, "height": height, "admin": admin, "role": role, "tags": tags,
                "address": {"city": "Paris", "zip": "75001"}, "extra": [1, {"a": None}], "meta": {"k": "v"}, "none": {}}
    automaton = compile_schema(canonical_schema(PERSON))
    assert takes(automaton, json.dumps(instance, indent=indent, ensure_ascii=False))


@pytest.mark.parametrize("text", [
    '{"name":"a","age":1.5}',  # an integer property takes no fraction
    '{"age":1,"name":"a"}',  # the schema's order
    '{"name":"a"}',  # age is required
    '{"age":1}',  # so is name
    '{"name":"a","age":1,}',  # a comma needs a key after it
    '{"name":"a","age":1,"admin":true,"admin":false}',  # once each
    '{"name":"a","age":1,"height":null,"admin":true,"role":"root"}',  # not in the enum
    '{"name":"a","age":1,"height":null,"admin":true,"role":3,"tags":[]}',  # minItems
    '{"name":"a","age":1,"height":null,"admin":true,"role":3,"tags":["a","b","c","d"]}',  # maxItems
    '{"name":"a","age":1,"height":null,"admin":true,"role":12}',
])
def test_what_breaks_the_schema_is_refused(text):
    """Each breaks PERSON in one place."""
    automaton = compile_schema(canonical_schema(PERSON))
    assert not takes(automaton, text)


@pytest.mark.parametrize("schema, text, ok", [
    (PERSON, '{"name":"a","age":1}', True),  # the optional properties left out
    (PERSON, '{"name":"a","age":1,"admin":true,"none":{}}', True),  # some of them
    (PERSON, '{"name":"a","age":1,"address":{"city":"Paris"}}', True),
    (PERSON, '{"name":"a","age":1,"address":{"zip":"1"}}', False),  # city is required
    (SMALL, "{}", True), (SMALL, "{ }", True), (SMALL, '{"color":"red"}', True), (SMALL, "{,}", False),
    (SMALL, '{"color":"red","ok":true}', False),  # in the schema's order only
])
def test_optional_properties_may_be_left_out(schema, text, ok):
    automaton = compile_schema(canonical_schema(schema))
    assert takes(automaton, text) == ok
    if ok:
        jsonschema.validate(json.loads(text), schema)


def test_keys_that_start_alike_are_told_apart_by_their_bytes():
    schema = {"type": "object", "properties": {"ab": {"type": "integer"}, "abc": {"type": "boolean"},
                                               "a": {"type": "null"}}}
    automaton = compile_schema(canonical_schema(schema))
    for text, ok in [('{"ab":1,"abc":true,"a":null}', True), ('{"abc":true}', True), ('{"a":null}', True),
                     ('{"ab":true}', False), ('{"abc":1}', False), ('{"ab":1,"ab":2}', False)]:
        assert takes(automaton, text) == ok, text


@pytest.mark.parametrize("text, ok", [
    ('{"label":"ab","children":[{"label":"c","children":[]}]}', True),
    ('{"label":"","children":[]}', False),  # minLength
    ('{"label":"abcd","children":[]}', False),  # maxLength
    (r'{"label":"\u00e9","children":[]}', False),  # no \u escapes under a length bound
    (r'{"label":"\néx","children":[]}', True),  # an escape and a two-byte character count once each
    ('{"label":"a","children":[{},{},{}]}', False),
])
def test_a_recursive_schema_and_string_lengths(text, ok):
    automaton = compile_schema(canonical_schema(TREE))
    assert takes(automaton, text) == ok
    if ok:
        jsonschema.validate(json.loads(text), TREE)


def test_a_pydantic_models_schema_is_taken_and_its_outputs_parse_back():
    """What `model_json_schema()` writes ($defs and $ref, Optional as anyOf with null, Literal
    and Enum as enum, lengths, formats, bounds): walks of its automaton validate and parse as the model."""
    import datetime
    import enum
    import uuid
    from typing import Literal, Optional

    from pydantic import BaseModel, Field, HttpUrl

    class Color(enum.Enum):
        RED = "red"
        BLUE = "blue"

    class Address(BaseModel):
        city: str = Field(max_length=8)
        zip: Optional[str] = None

    class User(BaseModel):
        name: str = Field(min_length=1, max_length=6, description="the user's name")
        age: int
        score: float | None = None
        tags: list[str] = Field(max_length=2)
        address: Address
        role: Literal["admin", "user"]
        color: Color
        born: datetime.date
        key: uuid.UUID
        count: int = Field(ge=-3, lt=40)
        ratio: float = Field(ge=0)
        confidence: float = Field(ge=0, le=1)
        temperature: float = Field(gt=-273.15, lt=1e4)
        friends: list["User"] = Field(default_factory=list, max_length=1)

    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int

    class Dog(BaseModel):
        kind: Literal["dog"]
        good: bool

    class Link(BaseModel):
        site: HttpUrl  # format uri, minLength 1, maxLength 2083
        code: str = Field(pattern=r"^[a-z]+[0-9]*$", max_length=4)

    class Shape(BaseModel):
        pair: tuple[int, str]  # prefixItems, minItems = maxItems = 2
        point: tuple[float, float, float]
        many: tuple[bool, ...]  # items

    class Owner(BaseModel):
        pet: Cat | Dog = Field(discriminator="kind")  # oneOf told apart by kind, with OpenAPI's discriminator
        other: Cat | Dog | None = None  # anyOf of two objects that start alike, and null

    for model in (User, Owner, Link, Shape):
        schema = model.model_json_schema()
        texts = finished_walks(compile_schema(canonical_schema(schema)), seed=3, tries=40, limit=3000, enough=40)
        for text in texts:
            jsonschema.validate(json.loads(text), schema)
            model.model_validate_json(text)
        assert len(texts) >= 10
        if model is Owner:
            kinds = {(type(o.pet).__name__, type(o.other).__name__) for o in map(Owner.model_validate_json, texts)}
    assert {"Cat", "Dog"} <= {k for pair in kinds for k in pair}  # both branches are written


LINKS = {"type": "object", "properties": {
    "site": {"type": "string", "format": "uri"}, "host": {"type": "string", "format": "hostname"},
    "code": {"type": "string", "pattern": "^[a-z]+[0-9]*$", "maxLength": 4},
    "name": {"type": "string", "pattern": "é", "maxLength": 3}}}


@pytest.mark.parametrize("value, field, ok", [
    ("https://example.com/a/b-c?x=1&y=", "site", True), ("http://a:8080/", "site", True),
    ("ftp://a.b", "site", False), ("http://-a.com", "site", False), ("http://a..b", "site", False),
    ("x-1.example", "host", True), ("a" * 63 + ".b", "host", True), ("a" * 64 + ".b", "host", False),
    (".".join(["a" * 50] * 5), "host", False),  # 254 characters: over a hostname's 253
    ("ab12", "code", True), ("abc12", "code", False), ("a", "code", True), ("1a", "code", False),
    ("aéb", "name", True), ("é", "name", True), ("abcé", "name", False), ("abc", "name", False),
])
def test_patterns_and_formats_with_a_length_bound(value, field, ok):
    """maxLength beside a pattern or format: a character is taken only if a match can still
    end within the length left (formats carry their own: hostname 253, uri 2083)."""
    good = {"site": "http://a", "host": "a", "code": "a", "name": "é"}
    text = json.dumps(good | {field: value}, ensure_ascii=False)
    automaton = compile_schema(canonical_schema(LINKS))
    assert takes(automaton, text) == ok
    if ok:
        jsonschema.validate(json.loads(text), LINKS)
    for text in finished_walks(automaton, seed=11, tries=40, limit=800, enough=15):  # no dead end on the way
        jsonschema.validate(json.loads(text), LINKS)


@pytest.mark.parametrize("value, field, ok", [
    ("2024-02-28T23:59:59.5+01:00", "when", True), ("2024-02-30T10:00:00Z", "when", False),
    ("2024-02-28 10:00:00Z", "when", False), ("2024-12-01", "day", True), ("2024-1-01", "day", False),
    ("123e4567-e89b-12d3-a456-426614174000", "id", True), ("123E4567-e89b-12d3-a456-426614174000", "id", False),
    ("255.0.10.1", "ip", True), ("256.0.0.1", "ip", False), ("a.b+c@x-y.example.org", "mail", True),
    ("a@b", "mail", False), ("AB-123", "code", True), ("AB-1234", "code", False), ("xab", "code", False),
    ("..abbb..", "free", True), ("a a", "free", False), (r"\n\tb", "free", True), ("\u00e9b", "free", True),
])
def test_formats_and_patterns(value, field, ok):
    """Each value alone in FORMATTED's field (the others a valid constant), accepted or not."""
    good = {"when": "2024-01-01T00:00:00Z", "day": "2024-01-01", "id": "00000000-0000-0000-0000-000000000000",
            "ip": "1.2.3.4", "mail": "a@b.io", "code": "AA-1", "free": "b"}
    text = json.dumps(good | {field: value}, ensure_ascii=False)
    automaton = compile_schema(canonical_schema(FORMATTED))
    assert takes(automaton, text) == ok
    if ok:
        jsonschema.validate(json.loads(text), FORMATTED, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}, "pattern"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "a.{30}"}}}, "more than 4096 states"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "iri"}}}, "'iri' is not supported"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "date", "maxLength": 9}}}, "below"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^a+$", "minLength": 2}}}, "minLength 2"),
    ({"type": "object", "properties": {"a": {"type": "number", "minimum": 3, "exclusiveMaximum": 3}}},
     "no number is within"),
    ({"type": "object", "properties": {"a": {"type": "number", "maximum": "3"}}}, "finite number"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 2}}}, "no integer"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 0}}}, "multipleOf must be"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 9973}}}, "4096 states"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 2, "minimum": 3, "maximum": 3}}},
     "no integer is within"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "object"}, {"properties": {}}]}}}, "start alike"),
    ({"type": "object", "properties": {"a": {"oneOf": [  # a constant in one branch only tells nothing apart
        {"properties": {"k": {"const": 1}}}, {"properties": {"k": {"type": "integer"}}}]}}}, "start alike"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"enum": ["x"]}]}}}, "start alike"),
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"maxLength": 3}]}}}, "allOf"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}], "type": "string"}}}, "anyOf"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "names nothing"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "only local"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/b", "maxLength": 2}}, "$defs": {"b": {}}}, "beside"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": 3, "maxLength": 2}}}, "maxLength"),
    ({"type": "object", "properties": {"a": {"type": "string", "maxLength": -2}}}, "maxLength must be"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 1.5}}}, "minItems must be"),
    ({"type": "string"}, "root must be an object"),
    ({"anyOf": [{"type": "object"}, {"type": "array"}]}, "root must be an object"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "type must be"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 1}}}, "maxItems"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": [{}]}}}, "prefixItems"),
    ({"type": "object", "properties": {"a": {"prefixItems": [{}], "items": False, "minItems": 2}}}, "items false"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "enum"),
])
def test_unsupported_schemas_are_refused_with_the_keyword(schema, words):
    with pytest.raises(ValueError, match=words.replace("$", "\\$")):
        SamplingParams(response_format="json_schema", json_schema=canonical_schema(schema))
    with pytest.raises(ValueError, match="not JSON"):
        compile_schema("{nope")
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema=canonical_schema(SMALL))  # a schema without its response format


@pytest.mark.parametrize("spec, params", [
    ("ngram,drafter,target", {}),
    ("drafter,verifier,target", {"temperature": 0.8, "seed": 3}),
])
def test_chains_under_a_schema_emit_the_target_alones_tokens_and_valid_objects(pool, prompts, spec, params):
    text = canonical_schema(SMALL)
    vocab = token_bytes(pool.tokenizer())
    spaces = tuple((t, -10.0) for t, data in enumerate(vocab) if data and not data.strip())  # the tiny models love them
    sampling = SamplingParams(response_format="json_schema", json_schema=text, logit_bias=spaces, **params)
    target = pool.get("target")
    automaton = compile_schema(text)
    subset = prompts[:2] + prompts[-2:]
    budget = 8 * MAX_TOKENS
    got = pool.chain(spec, k=3).generate(subset, budget, sampling=sampling)
    assert got == [json_target_alone(target, vocab, p, budget, sampling, automaton) for p in subset]
    finished = [out for out in got if out[-1] == target.eos_token_id]
    assert finished, "no output closed its object within the budget"
    for out in finished:
        jsonschema.validate(json.loads(b"".join(vocab[t] for t in out[:-1])), SMALL)
    other = replace(sampling, json_schema=canonical_schema(PERSON))  # another schema, another grammar
    assert pool.chain(spec, k=3).generate(subset[:1], 8, sampling=other)[0] != got[0][:8]


def test_unbounded_arrays_and_strings_revisit_their_states():
    """Counts are kept only as far as a bound tells them apart, so masks memoised per state
    serve every item of an unbounded array and every character of a free string."""
    lists = {"type": "object", "properties": {"list": {"type": "array", "items": {"type": "array",
                                                                               "items": {"type": "integer"}}}}}
    automaton = compile_schema(canonical_schema(lists))
    state, seen = advance(automaton.initial, b'{"list":[', automaton.step), set()
    for i in range(50):
        state = advance(state, b"[1]," if i < 49 else b"[1]", automaton.step)
        seen.add(state)
    assert len(seen) == 2 and automaton.done(advance(state, b"]}", automaton.step))
    free = compile_schema(canonical_schema(SMALL | {"properties": {"s": {"type": "string"}}}))
    state = advance(free.initial, b'{"s":"', free.step)
    assert advance(state, b"abc", free.step) == advance(state, b"abcdefgh", free.step)


@pytest.mark.parametrize("text, ok", [
    ('{"n": 12 , "x": 1.5e3\n  }', True), ('{"n":12\n\t,"x":1}', True), ('{"n":12  ,"x":1}', False),
    ('{"n":12\t,"x":1}', False), ('{"n":1\n\n,"x":1}', False), ('{ "n":1,"x":1}', True),
])
def test_whitespace_after_numbers_and_literals_follows_the_same_rule(text, ok):
    """A space, or a newline and an indent, between tokens; a number ends on the space after it."""
    automaton = compile_schema(canonical_schema(SCHEMAS[5]))  # {"n": enum 1/12/123, "x": number}
    assert takes(automaton, text) == ok


@pytest.mark.parametrize("bounds", [{"minimum": 0}, {"minimum": -7, "maximum": 120}, {"exclusiveMinimum": 9.5},
                                    {"maximum": -3}, {"exclusiveMinimum": -2, "exclusiveMaximum": 2}, {"minimum": 100}])
def test_integer_bounds_take_exactly_the_integers_in_range(bounds):
    schema = {"type": "object", "properties": {"n": {"type": "integer", **bounds}}}
    automaton = compile_schema(canonical_schema(schema))
    validator = jsonschema.Draft202012Validator(schema)
    for value in range(-300, 300):
        for close in (b"}", b" }", b"\n}"):
            assert takes(automaton, b'{"n":' + str(value).encode() + close) == validator.is_valid({"n": value}), \
                (value, close)
    for junk in (b"-0", b"01", b"1.0", b"1e2"):
        assert not takes(automaton, b'{"n":' + junk + b"}")


@pytest.mark.parametrize("bounds, good, bad", [
    ({"minimum": 0}, ["0", "0.5", "12e-3", "3.25E+2"], ["-1", "-0.5", "-0"]),
    ({"exclusiveMinimum": 0}, ["0.5", "12", "0.001"], ["0", "0.0", "-1", "0e5"]),
])
def test_a_numbers_lower_bound_of_zero(bounds, good, bad):
    schema = {"type": "object", "properties": {"x": {"type": "number", **bounds}}}
    automaton = compile_schema(canonical_schema(schema))
    for text, ok in [(g, True) for g in good] + [(b, False) for b in bad]:
        assert takes(automaton, b'{"x":' + text.encode() + b"}") == ok, text
        if ok:
            jsonschema.validate(json.loads(b'{"x":' + text.encode() + b"}"), schema)


@pytest.mark.parametrize("text, ok", [
    ('{"pet":{"kind":"cat","lives":9},"n":12,"s":"xxxx"}', True),
    ('{"pet":{"kind":"dog","good":true},"n":1.5,"s":"ab"}', True),
    ('{"pet":{"kind":"cow"},"n":0,"s":""}', True),
    ('{"pet":{"kind":"cat","good":true},"n":1,"s":"a"}', False),  # a cat's property after a dog's kind
    ('{"pet":{"kind":"cow","lives":1},"n":1,"s":"a"}', False),
    ('{"pet":{"kind":"cat","lives":9},"n":-1,"s":"a"}', False),
    ('{"pet":{"kind":"cat","lives":9},"n":1,"s":"abc"}', False),  # too long for one branch, not all x for the other
])
def test_an_overlapping_any_of_takes_what_one_branch_takes(text, ok):
    schema = SCHEMAS[-2]
    automaton = compile_schema(canonical_schema(schema))
    assert takes(automaton, text) == ok
    assert not ok or jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))  # stricter: only listed properties


def test_many_alike_branches_are_followed_up_to_a_bound_and_every_output_still_validates():
    branches = [{"type": "object", "properties": {"k": {"const": f"v{i:02d}"}, f"p{i}": {"type": "integer"}}}
                for i in range(40)]
    schema = {"type": "object", "properties": {"x": {"anyOf": branches}}}
    automaton = compile_schema(canonical_schema(schema))
    state = advance(automaton.initial, b'{"x":{"k":"v', automaton.step)
    assert 1 <= len(state) <= 16
    for text in finished_walks(automaton, seed=5, tries=30, limit=400, enough=10):
        jsonschema.validate(json.loads(text), schema)


def test_a_loop_of_references_and_any_of_starts_nothing():
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/L"}},
              "$defs": {"L": {"anyOf": [{"$ref": "#/$defs/L"}, {"type": "boolean"}]}}}
    automaton = compile_schema(canonical_schema(schema))
    assert automaton.done(advance(automaton.initial, b'{"a":true}', automaton.step))


def _number_text(sign: bool, whole: int, fraction: str) -> str:
    return ("-" if sign else "") + str(whole) + (f".{fraction}" if fraction else "")


BOUND = st.decimals(min_value=-60, max_value=60, places=2, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(low=st.none() | BOUND, high=st.none() | BOUND, low_open=st.booleans(), high_open=st.booleans(),
       as_float=st.booleans(), values=st.lists(st.tuples(st.booleans(), st.integers(0, 99),
                                                          st.text("0123456789", max_size=4)), min_size=1, max_size=8))
def test_a_numbers_bounds_take_exactly_the_numbers_within(low, high, low_open, high_open, as_float, values):
    """minimum / maximum / exclusive ones on a number: a number written without an exponent is
    taken exactly when it is within (compared as decimals, as written)."""
    from decimal import Decimal

    def bound(value):
        return float(value) if as_float else int(value) if value == value.to_integral_value() else float(value)

    bounds = {}
    if low is not None:
        bounds["exclusiveMinimum" if low_open else "minimum"] = bound(low)
    if high is not None:
        bounds["exclusiveMaximum" if high_open else "maximum"] = bound(high)
    schema = {"type": "object", "properties": {"x": {"type": "number"} | bounds}, "required": ["x"]}
    try:
        automaton = compile_schema(canonical_schema(schema))
    except ValueError as exc:
        assert "no number is within" in str(exc)
        lo, hi = Decimal(repr(bounds.get("minimum", bounds.get("exclusiveMinimum")))), \
            Decimal(repr(bounds.get("maximum", bounds.get("exclusiveMaximum"))))
        assert lo > hi or (lo == hi and (low_open or high_open))
        return
    for sign, whole, fraction in values:
        text = _number_text(sign and (whole or fraction.strip("0")), whole, fraction)
        x = Decimal(text)
        within = all({"minimum": x >= Decimal(repr(v)), "exclusiveMinimum": x > Decimal(repr(v)),
                      "maximum": x <= Decimal(repr(v)), "exclusiveMaximum": x < Decimal(repr(v))}[k]
                     for k, v in bounds.items())
        assert takes(automaton, ('{"x":' + text + "}")) == within, (bounds, text)


@settings(max_examples=60, deadline=None)
@given(low=st.integers(-2 ** 64, 2 ** 64), span=st.integers(0, 2 ** 66), tries=st.lists(st.integers(-2 ** 66, 2 ** 66),
                                                                                     min_size=1, max_size=6))
def test_integer_bounds_of_many_digits_take_exactly_the_integers_within(low, span, tries):
    """int64-sized bounds (the usual ones a typed API writes) compile at once, one automaton
    per bound compared digit by digit, and take exactly the integers within."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": low, "maximum": low + span}},
              "required": ["n"]}
    automaton = compile_schema(canonical_schema(schema))
    for value in tries + [low, low - 1, low + span, low + span + 1]:
        assert takes(automaton, '{"n":' + str(value) + "}") == (low <= value <= low + span), value


@pytest.mark.parametrize("bounds, good, bad", [
    ({"maximum": 1.7976931348623157e308}, ["0", "-1", "17976931348623157" + "0" * 292], ["2" + "0" * 308]),
    ({"exclusiveMinimum": 5e-324}, ["1", "0." + "0" * 323 + "6"], ["0", "0." + "0" * 323 + "5", "-1"]),
    ({"minimum": -1e20, "maximum": 1e-20}, ["-100000000000000000000", "0.00000000000000000001", "0"],
     ["-100000000000000000000.5", "0.000000000000000000011"]),
])
def test_a_numbers_bounds_at_the_ends_of_a_double(bounds, good, bad):
    schema = {"type": "object", "properties": {"x": {"type": "number", **bounds}}, "required": ["x"]}
    automaton = compile_schema(canonical_schema(schema))
    for text, ok in [(g, True) for g in good] + [(b, False) for b in bad]:
        assert takes(automaton, '{"x":' + text + "}") == ok, text


@pytest.mark.parametrize("text, ok", [
    ('{"t":[1,"a"]}', True), ('{"t":[1]}', True), ('{"t":[]}', True), ('{"t":[1,"a",true,false]}', True),
    ('{"t":["a",1]}', False), ('{"t":[1,"a",3]}', False),  # after the prefix, booleans
    ('{"u":[1,2]}', True), ('{"u":[1,2,3]}', False), ('{"u":[1]}', False),  # items false, minItems 2
])
def test_prefix_items_are_a_tuple(text, ok):
    schema = {"type": "object", "properties": {
        "t": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": {"type": "boolean"}},
        "u": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "integer"}], "items": False,
              "minItems": 2}}}
    automaton = compile_schema(canonical_schema(schema))
    assert takes(automaton, text) == ok
    if ok:
        jsonschema.validate(json.loads(text), schema)


@settings(max_examples=150, deadline=None)
@given(step=st.sampled_from([1, 3, 7, 12, 0.5, 0.25, 0.05, 2.5, 0.1, 1e-3]), integer=st.booleans(),
       bounded=st.booleans(), values=st.lists(st.tuples(st.booleans(), st.integers(0, 400),
                                                          st.text("0123456789", max_size=4)), min_size=1, max_size=8))
def test_multiple_of_takes_exactly_the_multiples(step, integer, bounded, values):
    """multipleOf on integers and numbers (with bounds too): a number written without an
    exponent is taken exactly when it is a multiple, compared as decimals."""
    from decimal import Decimal

    schema = {"type": "integer" if integer else "number", "multipleOf": step} | ({"maximum": 100} if bounded else {})
    automaton = compile_schema(canonical_schema({"type": "object", "properties": {"x": schema}, "required": ["x"]}))
    for sign, whole, fraction in values:
        fraction = "" if integer else fraction
        text = _number_text(sign and (whole or fraction.strip("0")), whole, fraction)
        x = Decimal(text)
        want = x % Decimal(repr(step)) == 0 and (not bounded or x <= 100)
        assert takes(automaton, ('{"x":' + text + "}")) == want, (schema, text)


@pytest.mark.parametrize("sub, text, ok", [
    ({"minimum": 3}, "4", True), ({"minimum": 3}, "2", False), ({"multipleOf": 2}, "3", False),
    ({"maxLength": 2}, '"ab"', True), ({"maxLength": 2}, '"abc"', False), ({"pattern": "^a$"}, '"b"', False),
    ({"minItems": 1}, "[]", False),
])
def test_keywords_without_a_type_constrain_the_type_they_name(sub, text, ok):
    """`{"minimum": 3}` alone: any value, but a number must be >= 3; the output is taken to be
    a number (narrower, so what it writes validates)."""
    schema = {"type": "object", "properties": {"x": sub}, "required": ["x"]}
    automaton = compile_schema(canonical_schema(schema))
    assert takes(automaton, ('{"x":' + text + "}")) == ok
    assert jsonschema.Draft202012Validator(schema).is_valid(json.loads('{"x":' + text + "}")) or not ok


_LEAF = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=4) | st.sampled_from(["object", "array", "string", "integer", "number", "date", "uri", "^a+$",
                                             "#/$defs/x", "#"])
_VALUE = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(sorted(KEYWORDS) + ["x", "a"]), inner, max_size=4),
                      max_leaves=10)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=st.dictionaries(st.sampled_from(sorted(KEYWORDS) + ["x", "title"]), _VALUE, max_size=5))
def test_any_schema_is_compiled_or_refused_with_a_value_error(schema):
    """Keywords with values of every kind, in every place: an automaton or a ValueError (the
    gateway's 400), never another exception, and never a construction that runs away (a
    bound of 1e308 once built a regular expression of every integer below it)."""
    try:
        SchemaAutomaton(json.loads(json.dumps(schema)))
    except ValueError:
        pass
