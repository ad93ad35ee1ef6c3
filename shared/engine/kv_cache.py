"""The preallocated KV cache of one model: a slot per request, written at explicit positions.

Keys and values live in two tensors [layers, slots + 1, kv_heads, max_len, head_dim]
allocated once (gpt-fast's static cache). A request owns a slot and a length; a rollback
only moves the length (O(1), nothing is copied or wiped): positions past it are simply
overwritten by the next forward. The extra last slot is scratch space where the padding
of a ragged batch writes.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """No free slot, or a request would grow past max_len."""


class KVCache:
    """Slots, lengths and the key/value tensors of one model."""

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (layers, slots + 1, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.max_len = max_len
        self.scratch = slots  # index of the padding slot
        self._free = list(range(slots - 1, -1, -1))
        self._slot: dict[str, int] = {}
        self._length: dict[str, int] = {}

    def open(self, request_id: str) -> int:
        """Give `request_id` a slot of length 0 (reusing its slot if it already has one)."""
        if request_id in self._slot:
            self._length[request_id] = 0
            return self._slot[request_id]
        if not self._free:
            raise CacheFullError(f"all {self.slots} KV cache slots are in use; release a request or raise max_batch")
        slot = self._free.pop()
        self._slot[request_id] = slot
        self._length[request_id] = 0
        return slot

    def close(self, request_id: str) -> None:
        """Free the request's slot (a no-op for an unknown request)."""
        slot = self._slot.pop(request_id, None)
        if slot is not None:
            self._length.pop(request_id)
            self._free.append(slot)

    def slot(self, request_id: str) -> int:
        try:
            return self._slot[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}: prefill it first") from None

    def length(self, request_id: str) -> int:
        """How many positions of the request hold valid keys and values."""
        self.slot(request_id)
        return self._length[request_id]

    def advance(self, request_id: str, n: int) -> None:
        """Mark n more positions as written (after a forward)."""
        new = self._length[request_id] + n
        if new > self.max_len:
            raise CacheFullError(f"request {request_id!r} would reach {new} tokens, over max_len={self.max_len}")
        self._length[request_id] = new

    def check_room(self, request_id: str, n: int) -> None:
        """Raise before a forward that would write past max_len."""
        if self.length(request_id) + n > self.max_len:
            raise CacheFullError(
                f"request {request_id!r} would reach {self.length(request_id) + n} tokens, over max_len={self.max_len}"
            )

    def rollback(self, request_id: str, length: int) -> None:
        """Truncate the request to its first `length` positions: O(1), a move of the length."""
        current = self.length(request_id)
        if not 0 <= length <= current:
            raise ValueError(f"cannot roll request {request_id!r} back to {length}: it holds {current} positions")
        self._length[request_id] = length

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._slot

    @property
    def active(self) -> int:
        return len(self._slot)
