"""What the gateway's APIs call to generate: a job in, committed token batches out.

`NatsBackend` sends the job to a target worker over NATS and yields its `TokenBatch`es in
order, de-duplicated by position (a resumed request may resend a batch), resuming on
another target replica if the one serving the request dies.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from shared.messages import GenerateJob, TokenBatch


class GenerationError(RuntimeError):
    """A generation failed for a reason the client should see (message is user-facing)."""


class Backend(Protocol):
    model_name: str
    max_context: int  # longest prompt + max_tokens a request may ask for

    def tokenizer(self):
        """The family's transformers tokenizer (shared by every model of the chain)."""

    def chains(self) -> list[list[str]]:
        """Chains a request may ask for, bottom level first."""

    def generate(self, job: GenerateJob) -> AsyncIterator[TokenBatch]:
        """Committed tokens of `job`, in order; raises GenerationError on failure."""

    async def cancel(self, request_id: str) -> None:
        """Stop a generation (client gone, stop string hit); frees its KV everywhere."""
