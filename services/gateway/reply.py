"""One request's response bodies, whole or as stream chunks, in the OpenAI API's shapes.

Choices come in index order (services/gateway/choices.py). With several choices each one
carries its own `speculation` and `timings`; with one, the response does. `echo`
(completions) puts the prompt before the completion, in the text and, with `logprobs`, in
the log-probabilities (the prompt's first token has none: `null`); `max_tokens: 0` with
`echo` answers the prompt alone, its log-probabilities being the point (scoring text, as
evaluation harnesses do). Streaming sends the prompt as each choice's first chunk.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from services.gateway.generation import Outcome
from services.gateway.logprobs import chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from services.gateway.reasoning import Thinking
from services.gateway.tools import ToolPlan
from shared.engine.token_text import token_text
from shared.messages import GenerateJob


class Reply:
    """Builds one request's response bodies (whole or chunks)."""

    def __init__(self, kind: str, request_id: str, model: str, body, tokenizer, jobs: list[GenerateJob],
                 prompts: list, tools: ToolPlan | None = None, thinking: Thinking | None = None):
        self.kind, self.request_id, self.model = kind, request_id, model
        self.tools = tools if tools and tools.parses else None  # chat: outputs read for tool calls
        self.thinking = thinking  # chat: the thinking apart from the answer (reasoning.py)
        self.created = int(time.time())
        self.token_ids = body.return_token_ids
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.continuous = self.include_usage and body.stream_options.continuous_usage_stats
        self.live: list[Outcome] = []  # streaming: the choices' outcomes as they grow (for continuous usage)
        self.top = body.logprobs_wanted()
        self.logprobs = self.top >= 0
        self.prompt_top = body.prompt_logprobs  # vLLM's prompt_logprobs (None: not asked)
        self.samples = body.n or 1  # choices per prompt
        self.several = len(jobs) > 1  # each choice carries its own speculation and timings
        self.echo = bool(getattr(body, "echo", False))
        self.echo_only = self.echo and body.max_tokens == 0  # the prompt alone: the one token made is left out
        self.truncated = getattr(body, "truncate_prompt_tokens", None) is not None
        self.jobs, self.prompts, self.tokenizer = jobs, prompts, tokenizer  # `tokenizer`: the backend's getter
        self._text = token_text(tokenizer()) if self.logprobs or self.prompt_top is not None else None
        self._offset: dict[int, int] = {}  # completions: per choice, the text of the tokens sent so far

    # -- parts --------------------------------------------------------------------------
    def _logprobs(self, index: int, token_ids: list[int], logprobs: list) -> dict | None:
        """The choice's `logprobs` for these tokens in this API's shape (None unless the request asked)."""
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return chat_logprobs(self._text, token_ids, logprobs)
        out = completion_logprobs(self._text, token_ids, logprobs, self._offset.get(index, 0))
        self._offset[index] = self._offset.get(index, 0) + sum(len(t) for t in out["tokens"])
        return out

    def _prompt_logprobs(self, index: int, out: Outcome) -> dict | None:
        """The prompt's tokens in the completions shape: the first has no log-probability."""
        if not self.logprobs:
            return None
        first, *rest = self.jobs[index].prompt
        head = self._text.text(first)
        self._offset[index] = len(head)
        asked = out.prompt_logprobs if self.prompt_top is None else [  # the job carries more for prompt_logprobs
            replace(lp, top_ids=lp.top_ids[:self.top], top_logprobs=lp.top_logprobs[:self.top])
            for lp in out.prompt_logprobs]
        tail = self._logprobs(index, rest, asked)
        return {"tokens": [head] + tail["tokens"], "token_logprobs": [None] + tail["token_logprobs"],
                "top_logprobs": [None] + tail["top_logprobs"], "text_offset": [0] + tail["text_offset"]}

    def _prompt_text(self, index: int) -> str:
        prompt = self.prompts[index // self.samples]
        if self.truncated:
            return self.tokenizer().decode(self.jobs[index].prompt)  # what ran: the prompt's kept tail
        return prompt if isinstance(prompt, str) else self.tokenizer().decode(prompt)

    def _report(self, choice: dict, body: dict, out: Outcome) -> None:
        """The speculation report and timings: the response's, or with several choices each choice's own."""
        (choice if self.several else body).update(speculation=out.speculation, timings=out.timings)

    def _finish_reason(self, out: Outcome, calls: list[dict] | None = None) -> str:
        if self.tools:
            return self.tools.finish_reason(calls, out.finish_reason)
        return "length" if self.echo_only else out.finish_reason

    def _head(self, obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    # -- bodies -------------------------------------------------------------------------
    def whole(self, outcomes: list[Outcome]) -> dict:
        head = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        body = head | {"choices": [], "usage": self.usage(outcomes)}
        if self.kind == "chat" and self.prompt_top is not None:  # vLLM's: the response's, not a choice's
            body["prompt_logprobs"] = vllm_prompt_logprobs(self._text, self.jobs[0].prompt, outcomes[0].prompt_logprobs,
                                                           self.prompt_top)
        for index, out in enumerate(outcomes):
            ids, logprobs, text = (out.token_ids, out.logprobs, out.text) if not self.echo_only else ([], [], "")
            choice, calls = {"index": index}, None
            if self.kind == "chat":
                reasoning, text = self.thinking.split(text) if self.thinking else (None, text)
                found = self.tools.read(text) if self.tools and out.finish_reason == "stop" else None
                calls = found and found[1]
                choice["message"] = {"role": "assistant", "content": text} if found is None else \
                    {"role": "assistant", "content": found[0], "tool_calls": calls}
                if reasoning is not None:
                    choice["message"]["reasoning_content"] = reasoning
                choice["logprobs"] = self._logprobs(index, ids, logprobs)
            elif self.echo:
                choice["text"] = self._prompt_text(index) + text
                prompt = self._prompt_logprobs(index, out)
                rest = self._logprobs(index, ids, logprobs)
                choice["logprobs"] = prompt and {key: prompt[key] + rest[key] for key in prompt}
            else:
                choice["text"] = text
                choice["logprobs"] = self._logprobs(index, ids, logprobs)
            if self.kind != "chat" and self.prompt_top is not None:  # vLLM's: each completion choice's
                choice["prompt_logprobs"] = vllm_prompt_logprobs(self._text, self.jobs[index].prompt,
                                                                 out.prompt_logprobs, self.prompt_top)
            choice["finish_reason"] = self._finish_reason(out, calls)
            choice["stop_reason"] = out.stop_reason
            if self.token_ids:
                choice["token_ids"] = ids
            self._report(choice, body, out)
            body["choices"].append(choice)
        return body

    def _chunk(self, index: int, content, lp: dict | None, finish_reason: str | None) -> tuple[dict, dict]:
        if self.kind == "chat":
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk") | {"choices": [choice]}
        else:
            choice = {"index": index, "text": content or "", "logprobs": lp, "finish_reason": finish_reason}
            body = self._head("text_completion") | {"choices": [choice]}
        if self.include_usage:
            body["usage"] = self._usage_so_far(index) if self.continuous and self.live else None
        return body, choice

    def _usage_so_far(self, index: int) -> dict:
        """vLLM's continuous usage: the choice's prompt and the tokens it has made so far."""
        prompt, made = len(self.jobs[index].prompt), len(self.live[index].token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}

    def chunk(self, index: int, content, token_ids: list[int] | None = None, logprobs: list | None = None) -> dict:
        """New text (or, for chat, the role) of one choice."""
        lp = self._logprobs(index, token_ids, logprobs or []) if token_ids else None
        body, choice = self._chunk(index, content, lp, None)
        if self.token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        return body

    def prompt_chunk(self, index: int, out: Outcome) -> dict:
        """The echoed prompt, first in each choice's stream (its log-probabilities came with the first tokens)."""
        return self._chunk(index, self._prompt_text(index), self._prompt_logprobs(index, out), None)[0]

    def tool_chunk(self, index: int, calls: list[dict]) -> dict:
        """A chat choice's tool calls, whole, in one chunk (`tools.ToolStream` held them to the end)."""
        return self._chunk(index, {"tool_calls": [{"index": j} | call for j, call in enumerate(calls)]}, None, None)[0]

    def finish_chunk(self, index: int, out: Outcome, calls: list[dict] | None = None) -> dict:
        body, choice = self._chunk(index, None, None, self._finish_reason(out, calls))
        choice["stop_reason"] = out.stop_reason
        self._report(choice, body, out)
        return body

    def usage(self, outcomes: list[Outcome]) -> dict:
        """Token counts over the choices: each prompt counted once, every choice's completion; of
        the prompts' tokens, those the target's prefix cache held (OpenAI's cached_tokens)."""
        prompt = sum(out.prompt_tokens for out in outcomes[::self.samples])
        cached = sum(out.cached_tokens for out in outcomes[::self.samples])
        completion = 0 if self.echo_only else sum(len(out.token_ids) for out in outcomes)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def usage_chunk(self, outcomes: list[Outcome]) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._head(obj) | {"choices": [], "usage": self.usage(outcomes)}

    @staticmethod
    def sse(body: dict) -> str:
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
