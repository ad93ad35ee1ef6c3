"""JSON Schema as a byte automaton: `response_format` json_schema (OpenAI's structured outputs).

`compile_schema(text)` turns a schema into a `SchemaAutomaton` with the interface
`grammar.Grammar` walks (`initial`, `step(state, byte)`, `done(state)`). Everything it lets a
model write validates against the schema. Where the schema leaves a choice, it takes one:
an object's properties come in the schema's order, each at most once, the required ones
always and the others as the model chooses, and none but those unless the schema lists
none (then any object, or only `{}` when `additionalProperties` constrains them).

Taken: `type` (a name or a list of names), `properties`, `required`,
`additionalProperties`, `items` (one schema, or false), `prefixItems` (a tuple's), `minItems`, `maxItems`, `minLength`,
`maxLength`, `minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum` (any, on an
integer or a number: a regular expression per bound, compared digit by digit as the bound
is written; a bounded number is written without an exponent, but for a bound of 0),
`pattern` (a regular expression, searched as JSON Schema says unless
anchored with ^ and $; through interegular's automata), `format` (date, time, date-time,
uuid, ipv4, email, hostname, uri (http and https URLs): each a regular expression here;
dates stop at day 28, so every one exists), `enum`, `const`, `$ref` to the schema's own `$defs` / `definitions` (recursion
included), `anyOf` (any branches: two objects, two arrays...), `oneOf` whose branches start
with different bytes (a string or null...) or are objects told apart by a property's
constant (pydantic's discriminated unions): so no output matches two, `allOf` of one
schema: what pydantic's `model_json_schema()` writes for most models. Annotations (`title`, `description`, `default`, `examples`,
`$schema`, `$id`, `$comment`...) are ignored. A string whose length, pattern or format is
constrained takes no `\\u` escapes (a surrogate pair would count as two characters).
Beside a pattern or format, `maxLength` is kept by taking a character only while a match
can still end within the length left (each automaton state's distance to a match; hostname
and uri carry their own 253 and 2083), and `minLength` only up to the shortest match (so
every match meets it). `multipleOf` (integers and numbers): an automaton of the remainder
modulo the step's digits. Any other keyword (`patternProperties`, another format...) is refused
with a ValueError that names it: a constraint left out would let through an output the
schema refuses. The root is an object or an array (the gateway asks response_format for an
object, as OpenAI does; tool calls are a list).

A state is the readings of the output so far that can still finish: a tuple of (frames,
whitespace run), one frame per value being written, innermost last. One reading, unless an
anyOf's branches start alike (two objects): then one per branch the output still fits, until
it fits one; at most MAX_STACKS (dropping a reading only narrows what may be written).
"""

from __future__ import annotations

import itertools
import json
import re
from functools import lru_cache

from shared.engine.grammar import (
    DIGITS, DONE, ESCAPE, EXP, EXP_MARK, EXP_SIGN, FIRST_KEY, FRAC, INT, MAX_DEPTH, MINUS, NUMBER,
    NUMBER_ENDS, STRING, UTF8_LEADS, WHITESPACE, ZERO, DOT, after_whitespace, step as json_step, value_start,
)

MAX_SCHEMA_BYTES = 1 << 16  # most bytes of schema text a request may send
MAX_NODES = 4096  # most schema nodes after compiling
MAX_STACKS = 16  # most readings of one output an automaton state follows (anyOf's branches; beyond: dropped)
TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "items", "prefixItems",
                      "minItems", "maxItems", "multipleOf", "minLength", "maxLength", "pattern", "format", "enum", "const", "$ref", "$defs", "definitions",
                      "anyOf", "oneOf", "allOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "discriminator"})  # discriminator: OpenAPI's, held by the consts
VALUE_STARTS = frozenset(b'{["-0123456789tfn')  # the bytes any JSON value can start with
_DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"  # a DNS label: at most 63 characters, no hyphen at either end
_HOST = rf"{_LABEL}(\.{_LABEL})*"
FORMATS = {  # format -> a regular expression every match of which is valid
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "ipv4": rf"({_OCTET}\.){{3}}{_OCTET}",
    "email": r"[a-z0-9]+([._+-][a-z0-9]+)*@[a-z0-9]+(-[a-z0-9]+)*(\.[a-z0-9]+(-[a-z0-9]+)*)*\.[a-z]{2,}",
    "hostname": _HOST,
    "uri": rf"https?://{_HOST}(:[1-9][0-9]{{0,3}})?(/[A-Za-z0-9._~-]+)*/?(\?[A-Za-z0-9._~-]+=[A-Za-z0-9._~-]*"
           rf"(&[A-Za-z0-9._~-]+=[A-Za-z0-9._~-]*)*)?",
}
FORMAT_MAX_LENGTH = {"hostname": 253, "uri": 2083}  # a hostname's limit; a URL's as browsers and pydantic keep it
UNESCAPED = {ord('"'): '"', ord("\\"): "\\", ord("/"): "/", ord("b"): "\b", ord("f"): "\f", ord("n"): "\n",
             ord("r"): "\r", ord("t"): "\t"}


MAX_PATTERN_STATES = 4096  # most states of the automaton one pattern's construction may make
LOOKAROUND = re.compile(r"(?<!\\)\(\?<?[=!]")  # (?= (?! (?<= (?<! not after a backslash


class PatternTooLarge(Exception):
    pass


def _bounded_crawl(alphabet, initial, final, follow):
    """interegular's `fsm.crawl` (the one routine every automaton of it is built by), with a
    state index and a bound: a request's pattern such as `a.{30}`, searched, would take
    2^30 states and hold the process for good."""
    from interegular.fsm import FSM, OblivionError

    states, index, finals, table = [initial], {_frozen(initial): 0}, set(), {}
    i = 0
    while i < len(states):
        state = states[i]
        if final(state):
            finals.add(i)
        table[i] = {}
        for transition in alphabet.by_transition:
            try:
                nxt = follow(state, transition)
            except OblivionError:
                continue
            key = _frozen(nxt)
            j = index.get(key)
            if j is None:
                if len(states) >= MAX_PATTERN_STATES:
                    raise PatternTooLarge(f"its automaton needs more than {MAX_PATTERN_STATES} states")
                j = index[key] = len(states)
                states.append(nxt)
            table[i][transition] = j
        i += 1
    return FSM(alphabet=alphabet, states=range(len(states)), initial=0, finals=finals, map=table,
               __no_validation__=True)


@lru_cache(maxsize=1)
def _interegular():
    """interegular, imported when a schema first needs a pattern, its automata built by
    `_bounded_crawl` (every construction of it goes through `fsm.crawl`)."""
    import interegular
    import interegular.fsm

    interegular.fsm.crawl = _bounded_crawl
    return interegular


def _frozen(state):
    """A hashable stand-in for one of interegular's crawl states (sets, tuples and lists of them)."""
    if isinstance(state, (set, frozenset)):
        return frozenset(_frozen(s) for s in state)
    if isinstance(state, (list, tuple)):
        return (type(state) is list, tuple(_frozen(s) for s in state))
    if isinstance(state, dict):
        return frozenset((k, _frozen(v)) for k, v in state.items())
    return state


class Pattern:
    """A regular expression as a character automaton (interegular's FSM), kept to the states
    from which a match can still end: `step` refuses a character that would leave none."""

    def __init__(self, regex, where: str, shown: str | None = None):
        """`regex`, or a list of them (or of interegular FSMs) that a match must all match whole (intersected)."""
        if any(isinstance(one, str) and LOOKAROUND.search(one) for one in ([regex] if isinstance(regex, str) else regex)):
            raise ValueError(f"{where}: pattern {(shown or regex)!r} is not supported (lookarounds: interegular "
                             f"reads them as its own intersections, not as Python or ECMA do)")
        try:
            fsm = None
            for one in [regex] if isinstance(regex, str) else regex:
                made = _interegular().parse_pattern(one).to_fsm() if isinstance(one, str) else one
                fsm = made if fsm is None else fsm & made
        except Exception as exc:  # interegular's errors have no common base
            raise ValueError(f"{where}: pattern {(shown or regex)!r} is not supported ({exc})") from None
        back: dict[int, set[int]] = {}
        for state, row in fsm.map.items():
            for target in row.values():
                back.setdefault(target, set()).add(state)
        live, pending = set(fsm.finals), list(fsm.finals)
        while pending:
            for state in back.get(pending.pop(), ()):
                if state not in live:
                    live.add(state)
                    pending.append(state)
        if fsm.initial not in live:
            raise ValueError(f"{where}: pattern {(shown or regex)!r} matches nothing")
        # The fewest characters from each live state to a match (a breadth-first walk back from the ends).
        dist, frontier = dict.fromkeys(fsm.finals, 0), list(fsm.finals)
        while frontier:
            nxt = []
            for state in frontier:
                for before in back.get(state, ()):
                    if before not in dist:
                        dist[before] = dist[state] + 1
                        nxt.append(before)
            frontier = nxt
        self.fsm, self.live, self.initial, self.finals = fsm, frozenset(live), fsm.initial, fsm.finals
        self.dist = dist
        self.shortest = dist[fsm.initial]  # the shortest match's length
        self.named = sorted(ord(c) for c in fsm.alphabet._symbol_mapping if isinstance(c, str) and len(c) == 1)
        self._ranges: dict[tuple[int, int, int, int], bool] = {}

    def step(self, state: int, char: str, within: int = -1) -> int | None:
        """The state after `char`, None unless a match can still end from it (within `within`
        more characters, when that is >= 0: the string's maxLength left)."""
        symbol = self.fsm.alphabet[char]
        target = self.fsm.map.get(state, {}).get(symbol) if symbol is not None else None
        if target not in self.live or (within >= 0 and self.dist[target] > within):
            return None
        return target

    def any_in(self, state: int, low: int, high: int, within: int = -1) -> bool:
        """Whether some character in code points low..high steps `state` (a multi-byte
        character begun: its bytes so far leave this range)."""
        key = (state, low, high, within)
        if key not in self._ranges:
            from bisect import bisect_left, bisect_right

            named = self.named[bisect_left(self.named, low):bisect_right(self.named, high)]
            found = any(self.step(state, chr(c), within) is not None for c in named)
            if not found and len(named) < high - low + 1:  # a character the pattern does not name
                taken = set(named)
                other = next(c for c in range(low, high + 1) if c not in taken)
                found = self.step(state, chr(other), within) is not None
            self._ranges[key] = found
        return self._ranges[key]


def _code_points(begun: bytes, low: int, high: int, left: int) -> tuple[int, int]:
    """The code points a character can still be: `begun` so far, the next byte in low..high,
    `left` bytes after the next (0x80-0xBF each)."""
    first = (begun + bytes([low]) + b"\x80" * left).decode()
    last = (begun + bytes([high]) + b"\xbf" * left).decode()
    return ord(first), ord(last)


def _searched(pattern: str) -> str:
    """JSON Schema's `pattern` matches anywhere in the string unless anchored (^ ... $)."""
    start = pattern.startswith("^")
    end = pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[int(start): len(pattern) - int(end)]
    return ("" if start else r"[\s\S]*") + f"({body})" + ("" if end else r"[\s\S]*")




def _encode(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class _Compiler:
    """Schema -> node table. Nodes: ("object", ((key bytes, node), ...), free, required flags),
    ("array", item or -1 (none), min, max or -1, (prefix item, ...)), ("string", min, max or -1, pattern index or -1), ("number", pattern index
    or -1), ("integer", pattern index or -1) (the pattern of its bounds), ("enum",
    (bytes, ...)), ("any",), ("alt", (node, ...), exclusive) (a oneOf's branches start with different bytes),
    ("ref", node) for a `$ref` (compiled once, so a schema may refer to itself)."""

    def __init__(self, root: dict) -> None:
        self.root = root
        self.nodes: list[tuple] = []
        self.refs: dict[str, int] = {}
        self.patterns: list[Pattern] = []

    def resolve(self, ref, where: str):
        """The schema a local `$ref` ("#/$defs/Name", a JSON pointer into the root) names."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ValueError(f"{where}: only local $ref (#/...) are supported, got {ref!r}")
        target = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"{where}: $ref {ref!r} names nothing in the schema")
            target = target[part]
        return target

    def reference(self, schema: dict, depth: int, where: str) -> int:
        extra = sorted(set(schema) - ANNOTATIONS - {"$ref", "$defs", "definitions"})
        if extra:
            raise ValueError(f"{where}: keywords beside $ref ({extra[0]!r}) are not supported")
        ref = schema["$ref"]
        if not isinstance(ref, str):
            raise ValueError(f"{where}: $ref must be a string, got {ref!r}")
        if ref in self.refs:
            return self.refs[ref]
        nid = self.refs[ref] = self.add(("ref", -1))
        self.nodes[nid] = ("ref", self.compile(self.resolve(ref, where), depth + 1, ref))
        return nid

    def first_bytes(self, nid: int, seen: frozenset = frozenset()) -> frozenset:
        """The bytes a value of node `nid` can start with."""
        node = self.nodes[nid]
        kind = node[0]
        if kind in ("ref", "alt"):
            targets = (node[1],) if kind == "ref" else node[1]
            if nid in seen:
                return frozenset()
            return frozenset().union(*(self.first_bytes(t, seen | {nid}) for t in targets))
        starts = {"object": b"{", "array": b"[", "string": b'"', "number": b"-0123456789", "integer": b"-0123456789"}
        if kind in starts:
            return frozenset(starts[kind])
        if kind == "enum":
            return frozenset(a[0] for a in node[1])
        return VALUE_STARTS

    def check_alternatives(self) -> None:
        """No output matches two branches of a oneOf: every two of them start with different
        bytes, or are objects told apart by a property each fixes to its own constant (a
        discriminated union: `kind: "cat"` / `kind: "dog"`; the property is required, so
        each output holds its branch's). anyOf's may overlap: the
        automaton follows every branch an output still fits."""
        for node in self.nodes:
            if node[0] != "alt" or not node[2]:
                continue
            firsts = [self.first_bytes(b) for b in node[1]]
            for i, j in itertools.combinations(range(len(firsts)), 2):
                if firsts[i] & firsts[j] and not self.told_apart(node[1][i], node[1][j]):
                    raise ValueError("oneOf whose branches can start alike (two strings, two objects without a "
                                     "property fixed to a different constant in each...) is not supported: an "
                                     "output could match two of them (anyOf may overlap)")

    def told_apart(self, a: int, b: int) -> bool:
        """Whether nodes `a` and `b` are objects with a required property that each fixes to a different constant."""
        fixed = []
        for nid in (a, b):
            while self.nodes[nid][0] == "ref":
                nid = self.nodes[nid][1]
            node = self.nodes[nid]
            if node[0] != "object":
                return False
            fixed.append({key: self.nodes[sub][1][0] for (key, sub), needed in zip(node[1], node[3])
                          if needed and self.nodes[sub][0] == "enum" and len(self.nodes[sub][1]) == 1})
        return any(fixed[1].get(key, value) != value for key, value in fixed[0].items() if key in fixed[1])

    def add(self, node: tuple) -> int:
        if len(self.nodes) >= MAX_NODES:
            raise ValueError(f"the json_schema is too large (more than {MAX_NODES} nodes)")
        self.nodes.append(node)
        return len(self.nodes) - 1

    def compile(self, schema, depth: int, where: str) -> int:
        if depth > MAX_DEPTH:
            raise ValueError(f"the json_schema nests deeper than {MAX_DEPTH} levels")
        if schema is True or schema == {}:
            return self.add(("any",))
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a schema must be an object, got {schema!r}")
        unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS)
        if unknown:
            raise ValueError(f"{where}: json_schema keyword {unknown[0]!r} is not supported (supported: "
                             f"{', '.join(sorted(KEYWORDS))}; annotations are ignored)")
        if "$ref" in schema:
            return self.reference(schema, depth, where)
        for name in ("anyOf", "oneOf", "allOf"):
            if name not in schema:
                continue
            options = schema[name]
            extra = sorted(set(schema) - ANNOTATIONS - {name, "$defs", "definitions"})
            if not isinstance(options, list) or not options or extra:
                raise ValueError(f"{where}: {name} must be a non-empty list of schemas with no other keyword beside "
                                 f"it{f' (found {extra[0]!r})' if extra else ''}")
            if name == "allOf" and len(options) > 1:
                raise ValueError(f"{where}: allOf of more than one schema is not supported")
            branches = [self.compile(option, depth + 1, f"{where}.{name}[{i}]") for i, option in enumerate(options)]
            return branches[0] if len(branches) == 1 else self.add(("alt", tuple(branches), name == "oneOf"))
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}: enum must be a non-empty list")
            return self.add(("enum", tuple(dict.fromkeys(_encode(v) for v in values))))
        types = schema.get("type")
        if types is None:  # the type the keywords constrain (a narrower schema: what it lets through validates)
            if {"properties", "additionalProperties", "required"} & set(schema):
                types = ["object"]
            elif {"items", "prefixItems", "minItems", "maxItems"} & set(schema):
                types = ["array"]
            elif {*BOUNDS, "multipleOf"} & set(schema):
                types = ["number"]
            elif {"minLength", "maxLength", "pattern", "format"} & set(schema):
                types = ["string"]
            else:
                return self.add(("any",))
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
            raise ValueError(f"{where}: type must be one of {', '.join(TYPES)} or a list of them, got {types!r}")
        if "number" in types:
            types = [t for t in types if t != "integer"]  # a number's branch writes integers too
        branches = [self.typed(t, schema, depth, where) for t in dict.fromkeys(types)]
        return branches[0] if len(branches) == 1 else self.add(("alt", tuple(branches), False))

    def typed(self, kind: str, schema: dict, depth: int, where: str) -> int:
        if kind == "boolean":
            return self.add(("enum", (b"true", b"false")))
        if kind == "null":
            return self.add(("enum", (b"null",)))
        if kind == "string":
            low, high = _counts(schema, "minLength", "maxLength", where)
            regex = schema.get("pattern")
            fmt = schema.get("format")
            if fmt is not None:
                if regex is not None:
                    raise ValueError(f"{where}: pattern and format together are not supported")
                if not isinstance(fmt, str) or fmt not in FORMATS:
                    raise ValueError(f"{where}: format {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
                regex = "^" + FORMATS[fmt] + "$"
            if regex is None:
                return self.add(("string", low, high, -1))
            if not isinstance(regex, str):
                raise ValueError(f"{where}: pattern must be a string, got {regex!r}")
            pattern = Pattern(_searched(regex), where, shown=fmt or regex)
            high = min(h for h in (high, FORMAT_MAX_LENGTH.get(fmt, -1)) if h >= 0) \
                if max(high, FORMAT_MAX_LENGTH.get(fmt, -1)) >= 0 else -1
            if low > pattern.shortest:  # every match would have to be checked for it: not taken
                raise ValueError(f"{where}: minLength {low} with a {'format' if fmt else 'pattern'} whose shortest "
                                 f"match is {pattern.shortest} characters is not supported")
            if 0 <= high < pattern.shortest:
                raise ValueError(f"{where}: maxLength {high} is below the {'format' if fmt else 'pattern'}'s "
                                 f"shortest match ({pattern.shortest} characters)")
            self.patterns.append(pattern)
            return self.add(("string", 0, high, len(self.patterns) - 1))
        if kind in ("number", "integer"):
            bounds = {k: schema[k] for k in BOUNDS if k in schema}
            regex = _bounded(kind, bounds, where)
            regexes = [] if regex is None else [regex] if isinstance(regex, str) else regex
            if "multipleOf" in schema:
                regexes.append(_multiples(schema["multipleOf"], kind == "integer", where))
                bounds["multipleOf"] = schema["multipleOf"]
            if not regexes:
                return self.add((kind, -1))
            try:
                self.patterns.append(Pattern(regexes, where, shown=str(bounds)))  # an automaton matches whole texts
            except ValueError as exc:
                if "matches nothing" in str(exc):
                    raise ValueError(f"{where}: no {kind} is within {bounds}") from None
                raise
            return self.add((kind, len(self.patterns) - 1))
        if kind == "array":
            items = schema.get("items", {})
            if isinstance(items, list):
                raise ValueError(f"{where}: items must be one schema or false (a tuple is prefixItems)")
            prefix = schema.get("prefixItems", [])
            if not isinstance(prefix, list):
                raise ValueError(f"{where}: prefixItems must be a list of schemas")
            low, high = _counts(schema, "minItems", "maxItems", where)
            if items is False:  # nothing after the prefix
                high = len(prefix) if high < 0 else min(high, len(prefix))
                if high < low:
                    raise ValueError(f"{where}: minItems ({low}) is above the {len(prefix)} prefixItems with items "
                                     f"false")
            firsts = tuple(self.compile(sub, depth + 1, f"{where}.prefixItems[{i}]") for i, sub in enumerate(prefix))
            rest = -1 if items is False else self.compile(items, depth + 1, f"{where}.items")
            return self.add(("array", rest, low, high, firsts))
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise ValueError(f"{where}: properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or any(not isinstance(n, str) or n not in properties for n in required):
            missing = [n for n in required if not isinstance(n, str) or n not in properties] \
                if isinstance(required, list) else required
            raise ValueError(f"{where}: required names {missing!r}, which properties does not list")
        extra = schema.get("additionalProperties")
        free = not properties and extra in (None, True, {})
        props = tuple((_encode(name), self.compile(sub, depth + 1, f"{where}.properties.{name}"))
                      for name, sub in properties.items())
        return self.add(("object", props, free, tuple(name in required for name in properties)))


class SchemaAutomaton:
    """The byte automaton of one compiled schema (see the module's docstring)."""

    def __init__(self, schema: dict):
        compiler = _Compiler(schema)
        root = compiler.compile(schema, 0, "$")
        compiler.check_alternatives()
        self.nodes, self.patterns = compiler.nodes, compiler.patterns
        while self.nodes[root][0] == "ref":
            root = self.nodes[root][1]
        self.root_kind = self.nodes[root][0]
        if self.root_kind not in ("object", "array"):  # a number at the root would never end
            raise ValueError("the json_schema's root must be an object (type: object)")
        self.initial = (((("val", root),), 0),)

    @staticmethod
    def done(state: tuple) -> bool:
        return any(not frames for frames, _ in state)

    def step(self, state: tuple, b: int) -> tuple | None:
        out: dict[tuple, None] = {}
        for frames, run in state:
            for nxt in self._advance(frames, run, b):
                out[nxt] = None
                if len(out) >= MAX_STACKS:  # fewer ways to go on: every one left is still valid
                    break
        return tuple(out) or None

    def _advance(self, frames: tuple, run: int, b: int) -> list[tuple]:
        """The (frames, whitespace run) one way of reading the output goes to after `b`."""
        if not frames:
            return []
        if b in WHITESPACE and self._spacer(frames):
            run = after_whitespace(run, b)
            return [] if run is None else [(frames, run)]
        out = []
        for nxt in self._step(frames, b):
            if len(nxt) > 2 * MAX_DEPTH:  # a schema that refers to itself nests no deeper than JSON mode
                continue
            if b in WHITESPACE and self._ended_by(frames[-1], b):  # the space after a number or literal
                spaced = after_whitespace(0, b)
                if spaced is not None:
                    out.append((nxt, spaced))
            else:
                out.append((nxt, 0))
        return out

    def _ended_by(self, top: tuple, b: int) -> bool:
        """Whether `b` ends the value on top (a number or literal ends on the byte after it)."""
        if top[0] == "num":
            return True
        if top[0] == "enum":
            return not any(a.startswith(top[2] + bytes([b])) for a in self.nodes[top[1]][1])
        return top[0] == "any" and top[1][0] == NUMBER and top[1][1] == ""

    @staticmethod
    def _spacer(frames: tuple) -> bool:
        """Whether whitespace may come here (between JSON's tokens; not before the root)."""
        top = frames[-1]
        kind = top[0]
        if kind == "val":
            return len(frames) > 1
        if kind == "obj":
            return top[3] in ("c", "s") or (top[3] == "k" and top[4] == 0) or (top[3] == "K" and not top[4])
        return kind == "arr" and top[3] in ("f", "s")

    def _complete(self, rest: tuple) -> tuple:
        """Frames after the value on top of `rest` ended: its container moves on."""
        if not rest:
            return ()
        parent = rest[-1]
        if parent[0] == "obj":
            return rest[:-1] + (("obj", parent[1], parent[2] + 1, "s", 0),)
        _, _, low, high, firsts = self.nodes[parent[1]]  # an array's count, capped where nothing tells counts apart
        return rest[:-1] + (("arr", parent[1], min(parent[2] + 1, max(low, high, len(firsts))), "s"),)

    def _step(self, frames: tuple, b: int) -> list[tuple]:
        """The frames after `b`: one per way of reading it (several only inside an anyOf)."""
        if not frames:
            return []
        top, rest = frames[-1], frames[:-1]
        kind = top[0]
        if b in WHITESPACE and self._spacer(frames):
            return [frames]  # whitespace right after a number or literal that ended on it
        if kind == "val":
            return self._begin(rest, top[1], b)
        if kind == "obj":
            _, nid, i, phase, off = top
            props = self.nodes[nid][1]
            if phase == "k":
                key = props[i][0]
                if b != key[off]:
                    return []
                return [rest + ((("obj", nid, i, "k", off + 1) if off + 1 < len(key) else ("obj", nid, i, "c", 0)),)]
            if phase == "K":  # a key of several that may come next, `off` its bytes so far
                return self._key(rest, nid, i, off, b)
            if phase == "c":
                return [rest + (("obj", nid, i, "v", 0), ("val", props[i][1]))] if b == 0x3A else []
            if phase == "s" and b == 0x2C and i < len(props):
                return [rest + (self._next_key(nid, i),)]
            return [self._complete(rest)] if phase == "s" and b == 0x7D and not any(self.nodes[nid][3][i:]) else []
        if kind == "arr":
            _, nid, count, phase = top
            _, item, low, high, firsts = self.nodes[nid]
            if phase == "f":
                if b == 0x5D and low == 0:
                    return [self._complete(rest)]
                return self._begin(rest + (("arr", nid, count, "v"),), firsts[0] if firsts else item, b) \
                    if high != 0 else []
            if b == 0x2C and (high < 0 or count < high):  # item `count` next (a prefix's, then `items`)
                return [rest + (("arr", nid, count, "v"), ("val", firsts[count] if count < len(firsts) else item))]
            return [self._complete(rest)] if b == 0x5D and count >= low else []
        if kind == "str":
            return self._string(rest, top, b)
        if kind == "any":
            inner = json_step(top[1], b)
            if inner is None:  # a number ends on the byte after it
                ended = top[1][0] == NUMBER and top[1][1] == "" and top[1][2] in NUMBER_ENDS
                return self._step(self._complete(rest), b) if ended else []
            return [self._complete(rest) if inner[0] == DONE else rest + (("any", inner),)]
        if kind == "num":
            _, integer, sub, pattern_index, match = top
            nxt = _number(sub, b, integer)
            pattern = self.patterns[pattern_index] if pattern_index >= 0 else None
            if nxt is not None:
                if pattern:
                    match = pattern.step(match, chr(b))
                    if match is None:
                        return []
                return [rest + (("num", integer, nxt, pattern_index, match),)]
            if sub not in NUMBER_ENDS or (pattern and match not in pattern.finals):
                return []
            return self._step(self._complete(rest), b)
        return self._enum(rest, top[1], top[2], b)  # "enum"

    def _string(self, rest: tuple, top: tuple, b: int) -> list[tuple]:
        """A string's frame after `b`: ("str", JSON automaton state, node, characters so far
        (capped where the bounds stop telling counts apart), pattern state, the bytes of a
        character begun); the last three only for a constrained string."""
        _, inner, nid, count, match, begun = top
        _, low, high, pattern_index = self.nodes[nid]
        pattern = self.patterns[pattern_index] if pattern_index >= 0 else None
        if low or high >= 0 or pattern:
            mode = inner[0]
            char = None
            if mode == STRING and inner[2][1] == 0:  # between characters
                if b == 0x22:
                    if count < low or (pattern and match not in pattern.finals):
                        return []
                elif high >= 0 and count >= high:
                    return []
                else:
                    count = min(count + 1, max(low, high))
                    within = high - count if high >= 0 else -1  # characters a pattern may still take after this one
                    if b < 0x80 and b != 0x5C:
                        char = chr(b)
                    elif b == 0x5C:
                        if pattern and all(pattern.step(match, c, within) is None for c in UNESCAPED.values()):
                            return []  # no escaped character could come next
                    else:
                        begun = bytes([b])
                        lead = UTF8_LEADS.get(b)
                        if pattern and lead and not pattern.any_in(
                                match, *_code_points(begun, lead[1], lead[2], lead[0] - 1), within):
                            return []
            elif mode == ESCAPE:
                if b == 0x75:
                    return []  # no \\u escapes: a surrogate pair would count twice
                char = UNESCAPED.get(b)
            elif mode == STRING:  # inside a multi-byte character
                if not inner[2][2] <= b <= inner[2][3]:
                    return []
                begun += bytes([b])
                left = inner[2][1] - 1
                if not left:
                    char, begun = begun.decode(), b""
                elif pattern and not pattern.any_in(match, *_code_points(begun, 0x80, 0xBF, left - 1),
                                                    high - count if high >= 0 else -1):
                    return []
            if pattern and char is not None:
                match = pattern.step(match, char, high - count if high >= 0 else -1)
                if match is None:
                    return []
        inner = json_step(inner, b)
        if inner is None:
            return []
        return [self._complete(rest) if inner[0] == DONE else rest + (("str", inner, nid, count, match, begun),)]

    def _begin(self, rest: tuple, nid: int, b: int, seen: frozenset = frozenset()) -> list[tuple]:
        """Frames after `b` starts a value of node `nid` (on top of `rest`): one per branch of
        an anyOf that `b` can start (`seen`: the refs and anyOfs passed, a loop of them starts nothing)."""
        node = self.nodes[nid]
        kind = node[0]
        if kind in ("ref", "alt"):
            if nid in seen:
                return []
            options = (node[1],) if kind == "ref" else node[1]
            return [got for option in options for got in self._begin(rest, option, b, seen | {nid})]
        if kind == "object":
            if b != 0x7B:
                return []
            if node[2]:
                return [rest + (("any", (FIRST_KEY, "o", None)),)]
            return [rest + (self._next_key(nid, 0) if node[1] else ("obj", nid, 0, "s", 0),)]
        if kind == "array":
            return [rest + (("arr", nid, 0, "f"),)] if b == 0x5B else []
        if kind == "string":
            pattern_index = node[3]
            match = self.patterns[pattern_index].initial if pattern_index >= 0 else None
            return [rest + (("str", (STRING, "", (False, 0)), nid, 0, match, b""),)] if b == 0x22 else []
        if kind in ("number", "integer"):
            sub = MINUS if b == 0x2D else ZERO if b == 0x30 else INT if b in DIGITS else None
            if sub is None:
                return []
            pattern_index = node[1]
            match = None
            if pattern_index >= 0:
                pattern = self.patterns[pattern_index]
                match = pattern.step(pattern.initial, chr(b))
                if match is None:
                    return []
            return [rest + (("num", kind == "integer", sub, pattern_index, match),)]
        if kind == "enum":
            return self._enum(rest, nid, b"", b)
        inner = value_start("", b)  # "any"
        return [] if inner is None else [rest + (("any", inner),)]

    def _next_key(self, nid: int, i: int) -> tuple:
        """The frame before the key of property `i` or one after it that may come instead:
        properties are written in the schema's order, an optional one may be left out."""
        if self.nodes[nid][3][i]:
            return ("obj", nid, i, "k", 0)  # this key and no other
        return ("obj", nid, i, "K", b"")

    def _key(self, rest: tuple, nid: int, lo: int, prefix: bytes, b: int) -> list[tuple]:
        """After `b` in a key that may be property `lo`'s or a later one's, up to the first
        required; `}` right away if none of them is required."""
        _, props, _, required = self.nodes[nid]
        if not prefix and b == 0x7D and lo == 0 and not any(required):  # right after `{` (after a comma, lo > 0)
            return [self._complete(rest)]
        grown = prefix + bytes([b])
        fits = []
        for j in range(lo, len(props)):
            if props[j][0].startswith(grown):
                fits.append(j)
            if required[j]:
                break
        if not fits:
            return []
        if len(fits) > 1:
            return [rest + (("obj", nid, fits[0], "K", grown),)]
        j = fits[0]
        key = props[j][0]
        return [rest + (("obj", nid, j, "c", 0) if key == grown else ("obj", nid, j, "k", len(grown)),)]

    def _enum(self, rest: tuple, nid: int, prefix: bytes, b: int) -> list[tuple]:
        alternatives = self.nodes[nid][1]
        grown = prefix + bytes([b])
        longer = [a for a in alternatives if a.startswith(grown)]
        if longer:
            if len(longer) == 1 and longer[0] == grown:
                return [self._complete(rest)]
            return [rest + (("enum", nid, grown),)]
        return self._step(self._complete(rest), b) if prefix in alternatives else []


def _number(sub: int, b: int, integer: bool) -> int | None:
    """A number's sub-state after `b`, None if `b` does not continue it."""
    if b in DIGITS:
        if sub in (MINUS, INT):
            return INT if sub == INT or b != 0x30 else ZERO
        if sub in (DOT, FRAC):
            return FRAC
        if sub in (EXP_MARK, EXP_SIGN, EXP):
            return EXP
        return None  # a leading zero takes no digit after it
    if integer:
        return None
    if b == 0x2E and sub in (ZERO, INT):
        return DOT
    if b in (0x65, 0x45) and sub in (ZERO, INT, FRAC):
        return EXP_MARK
    return EXP_SIGN if b in (0x2B, 0x2D) and sub == EXP_MARK else None


def _counts(schema: dict, low_name: str, high_name: str, where: str) -> tuple[int, int]:
    """A count's bounds (minLength / maxLength, minItems / maxItems): (low, high or -1 for none)."""
    low, high = schema.get(low_name, 0), schema.get(high_name)
    for name, value in ((low_name, low), (high_name, high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{where}: {name} must be an integer >= 0, got {value!r}")
    if high is not None and high < low:
        raise ValueError(f"{where}: {high_name} ({high}) is below {low_name} ({low})")
    return low, -1 if high is None else high


def _bounded(kind: str, bounds: dict, where: str) -> list | None:
    """Automata for the numbers `bounds` allow (None without bounds), one per bound (a match
    matches them all), written without an exponent but against a bound of 0."""
    if not bounds:
        return None
    for name, value in bounds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    ops = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if kind == "number":
        return [_compared(value, ops[name], integer=False) for name, value in bounds.items()]
    import math

    lows = [math.ceil(bounds["minimum"])] if "minimum" in bounds else []
    lows += [math.floor(bounds["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bounds else []
    highs = [math.floor(bounds["maximum"])] if "maximum" in bounds else []
    highs += [math.ceil(bounds["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bounds else []
    low, high = max(lows, default=None), min(highs, default=None)
    if low is not None and high is not None and low > high:
        raise ValueError(f"{where}: no integer is within {bounds}")
    return [_compared(value, op, integer=True) for value, op in ((low, ">="), (high, "<=")) if value is not None]


def _compared(bound, op: str, integer: bool):
    """An interegular automaton of the numbers x with `x op bound` (op one of >= > <= <), as
    JSON writes them without an exponent (with one too against a bound of 0: an exponent moves
    no number across 0) and never as "-0". It compares digit by digit, so it has a few states
    per digit of the bound: |x| against |bound| = W.F while the integer part is read (how many
    digits, and how its digits so far compare with W's), then the fraction's digits against F."""
    from decimal import Decimal

    from interegular.fsm import FSM, Alphabet, anything_else

    _interegular()
    exact = Decimal(repr(bound) if isinstance(bound, float) else bound)
    whole, _, frac = format(abs(exact), "f").partition(".")
    frac = frac.rstrip("0")
    negative_bound, exponent = exact < 0, exact == 0 and not integer
    wanted = {">=": "=>", ">": ">", "<=": "<=", "<": "<"}[op]
    flip = {"<": ">", ">": "<", "=": "="}

    def integer_part(state) -> str:  # x's integer part against W's
        _, _, _, i, seen, _ = state
        return "<" if i < len(whole) else seen if i == len(whole) else ">"

    def magnitude(state) -> str:  # |x| against |bound|, the number ending in `state`
        if state[0] == "int":
            seen, j = integer_part(state), 0
        else:
            _, _, _, seen, j = state[:5]
        return "<" if seen == "=" and j < len(frac) else seen

    def holds(negative: bool, nonzero: bool, m: str) -> bool:
        if negative and not nonzero:
            return False  # no "-0"
        if negative != negative_bound:
            return ("<" if negative else ">") in wanted
        return (flip[m] if negative else m) in wanted

    def after(state, char: str):
        digit = char.isdigit()
        kind = state[0]
        if kind in ("start", "minus"):
            negative = kind == "minus"
            if char == "-" and kind == "start":
                return ("minus",)
            if not digit:
                return None
            return "int", negative, char != "0", 1, _versus("=", char, whole, 0), char == "0"
        if kind == "int":
            _, negative, nonzero, i, seen, zero = state
            if digit and not zero:
                return "int", negative, nonzero or char != "0", min(i + 1, len(whole) + 1), \
                    _versus(seen, char, whole, i) if i < len(whole) else ">", False
            if char == "." and not integer:
                return "frac", negative, nonzero, integer_part(state), 0, True
            return ("exp", holds(negative, nonzero, magnitude(state)), "mark") if char in "eE" and exponent else None
        if kind == "frac":
            _, negative, nonzero, seen, j, _ = state
            if digit:
                if seen == "=":
                    seen, j = (_versus("=", char, frac, j), j + 1) if j < len(frac) else ("=" if char == "0" else ">", j)
                return "frac", negative, nonzero or char != "0", seen, j, False
            if char in "eE" and exponent and not state[5]:
                return "exp", holds(negative, nonzero, magnitude(state)), "mark"
            return None
        _, ok, phase = state  # the exponent
        if digit:
            return "exp", ok, "digits"
        return ("exp", ok, "sign") if char in "+-" and phase == "mark" else None

    chars = "0123456789-." + ("eE+" if exponent else "")
    alphabet = Alphabet.from_groups(*({c} for c in chars), {anything_else})
    index, states, table, finals = {("start",): 0}, [("start",)], {}, set()
    while len(table) < len(states):
        n = len(table)
        state = states[n]
        table[n] = {}
        for char in chars:
            nxt = after(state, char)
            if nxt is None:
                continue
            if nxt not in index:
                index[nxt] = len(states)
                states.append(nxt)
            table[n][alphabet[char]] = index[nxt]
        if state[0] == "int" or state[0] == "frac" and not state[5]:
            if holds(state[1], state[2], magnitude(state)):
                finals.add(n)
        elif state[0] == "exp" and state[1] and state[2] == "digits":
            finals.add(n)
    return FSM(alphabet=alphabet, states=set(table), initial=0, finals=finals, map=table)


def _versus(seen: str, char: str, digits: str, i: int) -> str:
    """How a digit string compares with `digits`' first i + 1, given how its first i compared
    (`seen`) and that its next digit is `char`."""
    if seen != "=":
        return seen
    return "<" if char < digits[i] else ">" if char > digits[i] else "="


def _multiples(step, integer: bool, where: str):
    """An interegular automaton of the numbers (integers) that are multiples of `step`, written
    without an exponent: step = m / 10^d, so a number is one when its digits up to the d-th
    after the point, as an integer, are a multiple of m, and every later digit is 0. States:
    the remainder modulo m so far, and how many digits after the point."""
    from decimal import Decimal
    from math import gcd

    from interegular.fsm import FSM, Alphabet, anything_else

    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < float("inf"):
        raise ValueError(f"{where}: multipleOf must be a number > 0, got {step!r}")
    written = Decimal(repr(step) if isinstance(step, float) else step).normalize().as_tuple()
    m = int("".join(map(str, written.digits))) * 10 ** max(written.exponent, 0)
    d = max(-written.exponent, 0)
    if integer:  # x = k * m / 10^d is an integer: m / gcd(m, 10^d) divides it
        m, d = m // gcd(m, 10 ** d), 0
    if m * (d + 3) > MAX_PATTERN_STATES:
        raise ValueError(f"{where}: multipleOf {step} needs more than {MAX_PATTERN_STATES} states")
    _interegular()
    alphabet = Alphabet.from_groups(*({c} for c in "0123456789-."), {anything_else})
    digit = {c: alphabet[c] for c in "0123456789"}

    # State ids: 0 the start, 1 after "-", then by remainder r: in the integer part; after the
    # point with `used` digits (0..d; 0: the point, no digit yet); past the d-th digit (zeros only).
    def part(r: int) -> int:
        return 2 + r

    def fraction(r: int, used: int) -> int:
        return 2 + m + r * (d + 1) + used

    def past(r: int) -> int:
        return 2 + m + m * (d + 1) + r

    table: dict[int, dict] = {0: {alphabet["-"]: 1}, 1: {}}
    finals = set()
    for r in range(m):
        table[part(r)] = {digit[c]: part((r * 10 + int(c)) % m) for c in digit}
        if d or not integer:
            table[part(r)][alphabet["."]] = fraction(r, 0)
        if r * 10 ** d % m == 0:
            finals.add(part(r))
        for used in range(d + 1):
            table[fraction(r, used)] = {digit[c]: fraction((r * 10 + int(c)) % m, used + 1) for c in digit} \
                if used < d else {digit["0"]: past(r)}
            if used and r * 10 ** (d - used) % m == 0:
                finals.add(fraction(r, used))
        table[past(r)] = {digit["0"]: past(r)}
        if r == 0:
            finals.add(past(r))
    for start in (0, 1):
        table[start].update({digit[c]: part(int(c) % m) for c in digit})
    return FSM(alphabet=alphabet, states=set(table), initial=0, finals=finals, map=table)


def canonical_schema(schema) -> str:
    """The schema as the text a request carries (keys in their order: it is the properties' order)."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


@lru_cache(maxsize=64)
def compile_schema(text: str) -> SchemaAutomaton:
    """The automaton of the schema in `text` (JSON), made once per text (ValueError if refused)."""
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the json_schema is longer than {MAX_SCHEMA_BYTES} bytes")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the json_schema is not JSON: {exc}") from None
    return SchemaAutomaton(schema)
