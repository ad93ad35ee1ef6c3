"""Stored responses of the Responses API (`store: true`), for `previous_response_id` and
`GET` / `DELETE /v1/responses/{id}`.

A stored response is one JSON record: the `response` object as it was answered, its
`input_items`, and the `conversation` (chat messages) that a follow-up with
`previous_response_id` continues: the earlier turns, this turn's input and its output (not
the instructions: OpenAI's rule, a follow-up gives its own).

The gateway keeps them in a JetStream key-value bucket (`KvResponseStore`): they outlive a
gateway restart, every gateway replica sees them, and they expire after
`gateway.responses_ttl_s`. `MemoryResponseStore` keeps them in the process (tests, and a
gateway run without NATS).
"""

from __future__ import annotations

import json
from collections import OrderedDict

from shared.nats_auth import KV_RESPONSES_BUCKET as BUCKET


class StoreError(RuntimeError):
    """The store could not take or give a record (NATS down, the bucket full, a record too big)."""


class MemoryResponseStore:
    """Records in this process, the oldest dropped past `limit`."""

    def __init__(self, limit: int = 10_000):
        self.limit = limit
        self._records: OrderedDict[str, dict] = OrderedDict()

    async def get(self, response_id: str) -> dict | None:
        record = self._records.get(response_id)
        return json.loads(json.dumps(record)) if record is not None else None  # a copy, as a real store gives

    async def put(self, response_id: str, record: dict) -> None:
        self._records[response_id] = json.loads(json.dumps(record))
        self._records.move_to_end(response_id)
        while len(self._records) > self.limit:
            self._records.popitem(last=False)

    async def delete(self, response_id: str) -> bool:
        return self._records.pop(response_id, None) is not None


class KvResponseStore:
    """Records in a JetStream key-value bucket (one key per response id; the id is a valid key)."""

    def __init__(self, kv):
        self.kv = kv

    @classmethod
    async def open(cls, js, ttl_s: float, max_bytes: int) -> KvResponseStore:
        return cls(await js.create_key_value(bucket=BUCKET, ttl=ttl_s, history=1, max_bytes=max_bytes))

    async def get(self, response_id: str) -> dict | None:
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        try:
            entry = await self.kv.get(response_id)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except Exception as exc:
            raise StoreError(f"the response store cannot be read: {type(exc).__name__}: {exc}") from exc
        return json.loads(entry.value) if entry.value else None

    async def put(self, response_id: str, record: dict) -> None:
        try:
            await self.kv.put(response_id, json.dumps(record, separators=(",", ":")).encode())
        except Exception as exc:
            raise StoreError(f"the response store cannot take it: {type(exc).__name__}: {exc}") from exc

    async def delete(self, response_id: str) -> bool:
        if await self.get(response_id) is None:
            return False
        try:
            await self.kv.purge(response_id)
        except Exception as exc:
            raise StoreError(f"the response store cannot delete it: {type(exc).__name__}: {exc}") from exc
        return True
