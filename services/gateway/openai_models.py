"""The OpenAI API's wire shapes that SpecMesh serves, as pydantic models (they are the OpenAPI schema).

Extensions beyond OpenAI's fields: `speculation` (request: chain, k, enabled,
confidence_threshold; response: chain, k and acceptance per level), `timings`, `top_k`,
`repetition_penalty`, `min_tokens`, `ignore_eos` and `stop_token_ids` (vLLM's),
`include_stop_str_in_output` (vLLM's), `return_token_ids` (vLLM's name) for the generated
token ids, and `response_format` on the completions endpoint too (as vLLM). Tool calling:
`tools`, `tool_choice`, `parallel_tool_calls` (services/gateway/tools.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from services.gateway.chat import Rendering
from shared.engine.json_schema import canonical_schema
from shared.engine.regex import choice_regex
from shared.messages import MAX_TOP_LOGPROBS
from services.gateway.choices import MAX_CHOICES
from services.gateway.generation import (
    BIAS_MAX, MAX_CACHE_SALT, MAX_K, MAX_LOGIT_BIAS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, PENALTY_MAX, REPETITION_MAX, SLO_MAX_MS,
    TEMPERATURE_MAX, SpeculationRequest,
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class SpeculationOptions(BaseModel):
    """Per-request speculation control; anything left out takes the gateway's default."""

    model_config = ConfigDict(extra="forbid")

    chain: StrictStr | list[StrictStr] | None = Field(
        None, description="Models of the chain, bottom level first: 'drafter,target' or ['drafter', 'target'].")
    k: Annotated[StrictInt, Field(ge=0, le=MAX_K)] | list[Annotated[StrictInt, Field(ge=0, le=MAX_K)]] | None = Field(
        None, description="Tokens each proposing level drafts per verification: one value, or one per level.")
    enabled: StrictBool | None = Field(None, description="false: no speculation (target only).")
    confidence_threshold: Probability | None = Field(None, description="Stop drafting below this confidence.")
    slo_tpot_ms: Annotated[float, Field(gt=0, le=SLO_MAX_MS, allow_inf_nan=False)] | None = Field(
        None, description="This request's TPOT objective in ms: it runs on the router's cheapest chain predicted "
                          "to meet it, never on a trial; the report says whether it was met.")

    def to_request(self) -> SpeculationRequest:
        return SpeculationRequest(chain=self.chain, k=self.k, enabled=self.enabled,
                                  confidence_threshold=self.confidence_threshold, slo_tpot_ms=self.slo_tpot_ms)


class StreamOptions(BaseModel):
    include_usage: StrictBool = Field(False, description="Send a last chunk with `usage` (and empty `choices`).")
    continuous_usage_stats: StrictBool = Field(
        False, description="Extension (vLLM's): with include_usage, every chunk carries its choice's usage so far.")


MAX_CHOICE_STRINGS = 256
Choices = Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICE_STRINGS)]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: one constraint of the output."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    regex: StrictStr | None = None
    choice: Choices | None = None
    json_: dict[str, Any] | None = Field(None, alias="json")
    json_object: StrictBool | None = None
    grammar: StrictStr | None = Field(None, description="Not supported.")

    def one(self) -> bool:
        given = [self.regex, self.choice, self.json_, self.json_object or None, self.grammar]
        return sum(v is not None for v in given) == 1 and self.grammar is None


class _Sampled(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored; known but unsupported ones are refused."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(description="The served model (GET /v1/models).")
    temperature: Annotated[float, Field(ge=0.0, le=TEMPERATURE_MAX)] | None = Field(
        None, description="0 is greedy; default 1.")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(None, description="Nucleus mass; default 1.")
    top_k: Annotated[StrictInt, Field(ge=0)] | None = Field(None, description="Extension: keep the k likeliest tokens; 0 is off.")
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="Extension (vLLM's): drop tokens less likely than min_p times the likeliest (after "
                          "temperature); 0 (the default) is off.")
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="Extension (vLLM's): each prompt token's log-probability and rank under the target, and the "
                          "n likeliest at its position (not with stream).")
    allowed_token_ids: list[StrictInt] | None = Field(
        None, description="Extension (vLLM's): only these token ids may be generated (every level keeps to them).")
    priority: StrictInt | None = Field(
        None, description="Extension (vLLM's): where a target has requests waiting for room, lower priorities are "
                          "admitted first (equal ones in arrival order); default 0. Running requests are not preempted.")
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="Extension (vLLM's): keep only the prompt's last n tokens (for chat, of the templated "
                          "conversation).")
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = Field(None, description="Seed for sampling.")
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings; the output is cut before the first one found.")
    include_stop_str_in_output: StrictBool | None = Field(
        None, description="Extension (vLLM's): keep the stop string that ended the output at its end.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = Field(
        None, description=f"Choices per prompt (default 1; prompts x n at most {MAX_CHOICES}); seeded, sample j draws "
                          f"with seed + j.")
    presence_penalty: Annotated[float, Field(ge=-PENALTY_MAX, le=PENALTY_MAX)] | None = Field(
        None, description="Subtracted once from the logit of every token already in the output; default 0.")
    frequency_penalty: Annotated[float, Field(ge=-PENALTY_MAX, le=PENALTY_MAX)] | None = Field(
        None, description="Subtracted from a token's logit once per time it is in the output; default 0.")
    repetition_penalty: Annotated[float, Field(gt=0.0, le=REPETITION_MAX)] | None = Field(
        None, description="Extension (vLLM's): the logits of tokens in the prompt or output are divided by it where "
                          "positive, multiplied where negative; default 1 (off).")
    logit_bias: dict[str, Any] | None = Field(
        None, description=f"Token id -> bias in [-{BIAS_MAX:g}, {BIAS_MAX:g}], added to its logit (at most "
                          f"{MAX_LOGIT_BIAS} entries).")
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="Extension (vLLM's): no end of sequence before this many tokens (at most max_tokens).")
    ignore_eos: StrictBool | None = Field(
        None, description="Extension (vLLM's): go on past the end-of-sequence token, up to max_tokens.")
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None, description="Extension (vLLM's): token ids that end the output (kept in token_ids, not in the text).")
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'json_object'}: the output is one JSON object (OpenAI's JSON mode); {'type': "
                          "'json_schema', 'json_schema': {'name', 'schema', 'strict'}}: one object that validates "
                          "against the schema (structured outputs; the keywords taken are in the gateway's README); "
                          "enforced token by token at every level. {'type': 'text'} (the default): free text.")
    guided_regex: StrictStr | None = Field(
        None, description="Extension (vLLM's): the whole output matches this regular expression.")
    guided_choice: Choices | None = Field(None, description="Extension (vLLM's): the output is one of these strings.")
    guided_json: dict[str, Any] | None = Field(
        None, description="Extension (vLLM's): the output is one JSON object of this schema (as response_format "
                          "json_schema).")
    guided_grammar: StrictStr | None = Field(None, description="Not supported (refused).")
    use_beam_search: StrictBool | None = Field(None, description="Not supported (true is refused).")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="Extension (vLLM's newer name for the guided_ fields): {regex | choice | json | json_object}.")
    user: StrictStr | None = None
    cache_salt: Annotated[StrictStr, Field(min_length=1, max_length=MAX_CACHE_SALT)] | None = Field(
        None, description="Extension (vLLM's): the model services reuse a prompt head they cached (prefix caching) "
                          "only for requests of the same salt; without one, requests share theirs.")
    speculation: SpeculationOptions | None = Field(None, description="Extension: per-request speculation control.")
    return_token_ids: StrictBool = Field(False, description="Extension: the generated token ids in each choice.")

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first field asking for something SpecMesh does not do."""
        for param, value, ok, why in self._checks():
            if value is not None and not ok:
                return param, f"{param}={value!r} is not supported: {why}."
        return None

    def _constraints(self) -> list[str]:
        """The fields that constrain the output (one at most)."""
        named = [name for name in ("guided_regex", "guided_choice", "guided_json", "structured_outputs")
                 if getattr(self, name) is not None]
        return named + (["response_format"] if self.response_format not in (None, {"type": "text"}) else [])

    def _checks(self) -> list[tuple[str, Any, bool, str]]:
        constraints = self._constraints()
        return [("response_format", self.response_format, self._response_format() is not None,
                 "it must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
                 "{'name': ..., 'schema': {...}}}"),
                (constraints[-1] if constraints else "", " and ".join(constraints), len(constraints) <= 1,
                 "give one of response_format, guided_json, guided_regex, guided_choice, structured_outputs"),
                ("structured_outputs", self.structured_outputs,
                 self.structured_outputs is None or self.structured_outputs.one(),
                 "it must hold exactly one of regex, choice, json, json_object (grammar is not supported)"),
                ("guided_grammar", self.guided_grammar, False, "EBNF grammars are not taken; use guided_regex or "
                                                                 "guided_json"),
                ("use_beam_search", self.use_beam_search, not self.use_beam_search, "there is no beam search")]

    def _response_format(self) -> tuple[str, str] | None:
        """`response_format` as (format, schema); None if not one of the shapes taken."""
        fmt = self.response_format
        if fmt is None or fmt == {"type": "text"}:
            return "", ""
        if fmt == {"type": "json_object"}:
            return "json_object", ""
        spec = fmt.get("json_schema")
        if set(fmt) != {"type", "json_schema"} or fmt["type"] != "json_schema" or not isinstance(spec, dict) \
                or not isinstance(spec.get("schema"), dict) or not set(spec) <= {"name", "schema", "strict", "description"}:
            return None
        return "json_schema", canonical_schema(spec["schema"])

    def response_format_spec(self) -> tuple[str, str, str]:
        """The job's (`Sampling.response_format`, `json_schema`, `regex`), from whichever field
        constrains the output (`unsupported()` has refused two, or a shape not taken; the schema
        or expression itself is checked when planned)."""
        so = self.structured_outputs
        regex = self.guided_regex if self.guided_regex is not None else so.regex if so else None
        choice = self.guided_choice if self.guided_choice is not None else so.choice if so else None
        schema = self.guided_json if self.guided_json is not None else so.json_ if so else None
        if regex is not None:
            return "regex", "", regex
        if choice is not None:
            return "regex", "", choice_regex(choice)
        if schema is not None:
            return "json_schema", canonical_schema(schema), ""
        if so is not None and so.json_object:
            return "json_object", "", ""
        return (*self._response_format(), "")


class CompletionRequest(_Sampled):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_CHOICES)] | \
        Annotated[list[StrictInt], Field(min_length=1)] | \
        Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)] = Field(
        description=f"Text or token ids, or a batch of up to {MAX_CHOICES} of either (one choice per prompt and "
                    f"sample: index = prompt * n + sample).")
    max_tokens: StrictInt | None = Field(None, description="Most tokens to generate; default 16.")
    echo: StrictBool | None = Field(
        None, description="true: the prompt before the completion, and with `logprobs` its tokens' log-probabilities "
                          "(the first null); with max_tokens 0, the prompt alone.")
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="Each token's log-probability, and those of the `logprobs` likeliest tokens at its "
                          f"position (0..{MAX_TOP_LOGPROBS}).")
    best_of: StrictInt | None = Field(None, description="Only n (each sample is returned).")
    suffix: StrictStr | None = Field(None, description="Not supported.")

    def _checks(self) -> list[tuple[str, Any, bool, str]]:
        return super()._checks() + [
            ("best_of", self.best_of, self.best_of == (self.n or 1), "only n: every sample is returned"),
            ("suffix", self.suffix, False, "no insertion"),
        ]

    def logprobs_wanted(self) -> int:
        """-1: no log-probabilities; n >= 0: each token's and the n likeliest (GenerateJob.logprobs)."""
        return -1 if self.logprobs is None else self.logprobs

    def prompt_values(self) -> list[str | list[int]]:
        """The prompts of the batch (one, unless a list of strings or of token-id lists)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]


class ContentPart(BaseModel):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: StrictStr


FunctionName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCall(BaseModel):
    name: FunctionName
    arguments: StrictStr = Field(description="The arguments as JSON text (an object).")


class MessageToolCall(BaseModel):
    """A call an earlier assistant message made (rendered into the prompt)."""

    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, description="An assistant message's calls.")
    tool_call_id: StrictStr | None = Field(None, description="A tool message: the call it answers.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    name: FunctionName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema of the arguments (an object); "
                                                                "the keywords taken are response_format's.")
    strict: StrictBool | None = Field(None, description="Accepted; constrained calls always follow the schema.")


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(_Sampled):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = Field(None, description="Most tokens to generate; default 128.")
    max_completion_tokens: StrictInt | None = Field(None, description="The same as max_tokens (newer name); wins.")
    logprobs: StrictBool | None = Field(None, description="true: each token's log-probability.")
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description=f"With logprobs: also the likeliest tokens at each position (0..{MAX_TOP_LOGPROBS}).")
    tools: list[Tool] | None = Field(None, description="Functions the model may call (services/gateway/tools.py).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'auto' (the default with tools): calls when the output is a call list; 'required' or a "
                          "named function: the output is constrained to calls; 'none': text.")
    parallel_tool_calls: StrictBool | None = Field(None, description="false: at most one call (default true).")
    add_generation_prompt: StrictBool = Field(True, description="Extension (vLLM's): the assistant's cue after the "
                                                                "messages.")
    continue_final_message: StrictBool = Field(False, description="Extension (vLLM's): continue the last (assistant) "
                                                                  "message; needs add_generation_prompt: false.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extension (vLLM's): variables for the checkpoint's own chat template (e.g. enable_thinking).")

    def rendering(self) -> Rendering:
        return Rendering(self.add_generation_prompt, self.continue_final_message, self.chat_template_kwargs or {})

    def _checks(self) -> list[tuple[str, Any, bool, str]]:
        return super()._checks() + [
            ("top_logprobs", self.top_logprobs, self.logprobs is True, "it needs logprobs: true"),
        ]

    def logprobs_wanted(self) -> int:
        """-1: no log-probabilities; n >= 0: each token's and the n likeliest (GenerateJob.logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else -1


# -- responses ------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens the target's prefix cache already held (not run again).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class LevelReport(BaseModel):
    name: str = Field(description="The level's model.")
    drafted: int = Field(description="Tokens it proposed to the level above.")
    accepted: int = Field(description="Of those, accepted by the level above.")
    acceptance_rate: float | None = Field(description="accepted / drafted (null when nothing was drafted).")
    accepted_per_position: list[int] = Field(description="Accepted count at each draft position.")
    expected_acceptance: float | None = Field(None, description="Sampling: mean 1 - TV(verifier, proposer) over the drafted positions (null under greedy decoding).")


class SpeculationReport(BaseModel):
    chain: list[str] = Field(description="Models of the chain, bottom level first.")
    k: list[int] = Field(description="Draft length per proposing level.")
    levels: list[LevelReport] = Field(description="One per proposing level, bottom first.")
    slo_tpot_ms: float | None = Field(None, description="The request's TPOT objective (null when it gave none).")
    slo_met: bool | None = Field(None, description="Whether the mean inter-token time met it (null without an objective).")


class Timings(BaseModel):
    first_token_ms: float | None
    total_ms: float
    inter_token_ms: float | None
    tokens_per_s: float | None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="Each generated token's text.")
    token_logprobs: list[float | None] = Field(
        description="Each token's log-probability under the target (-9999.0: none; null: an echoed prompt's first).")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="Per token, the likeliest tokens' text -> log-probability.")
    text_offset: list[int] = Field(description="Where each token's text starts in the completion.")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    speculation: SpeculationReport | None = None
    timings: Timings | None = None


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The text (null when the output is tool calls).")
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's exact UTF-8 bytes (a token may hold part of a character).")


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    speculation: SpeculationReport | None = None
    timings: Timings | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specmesh"
    max_model_len: int = Field(description="Longest prompt + max_tokens.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a prompt, or chat messages (rendered as the chat endpoint does)."""

    model: StrictStr
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    """vLLM's `/detokenize`: token ids back to text."""

    model: StrictStr
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 429, 500, 503, 504)}  # the routes' error answers
