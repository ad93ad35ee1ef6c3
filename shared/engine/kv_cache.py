"""The preallocated KV cache of one model: a slot per request, written at explicit positions.

Keys and values live in two tensors [layers, slots + 1, kv_heads, max_len, head_dim]
allocated once (gpt-fast's static cache). A request owns a slot and a length; a rollback
only moves the length (O(1), nothing is copied or wiped): positions past it are simply
overwritten by the next forward. The extra last slot is scratch space where the padding
of a ragged batch writes.

Prefix caching (vLLM's automatic prefix caching, at token rather than block grain): the
cache knows which tokens each slot holds. A freed slot keeps them until it is given out
again, least recently freed first, and `open_prefix` starts a request on the slot that
already holds the longest head of its prompt (or copies that head from a live request's
slot), so only the rest of the prompt is run. A chat's next turn finds its whole
conversation so far; requests with one system prompt share it. A salt (vLLM's
`cache_salt`) keeps requests apart: a head is only shared between requests of one salt.
"""

from __future__ import annotations

from typing import Sequence

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
        self._free = list(range(slots))  # least recently freed first
        self._slot: dict[str, int] = {}
        self._length: dict[str, int] = {}
        self._held: list[list[int]] = [[] for _ in range(slots)]  # the tokens each slot's positions hold
        self._salt: list[str] = [""] * slots  # the salt of the request that wrote them

    def open(self, request_id: str, salt: str = "") -> int:
        """Give `request_id` a slot of length 0 (reusing its slot if it already has one); what
        it writes is cached for requests of `salt`."""
        if request_id in self._slot:
            slot = self._slot[request_id]
            self._length[request_id], self._salt[slot] = 0, salt
            return slot
        if not self._free:
            raise CacheFullError(f"all {self.slots} KV cache slots are in use; release a request or raise max_batch")
        slot = self._free[0]
        self._take(request_id, slot, 0, salt)
        return slot

    def open_prefix(self, request_id: str, tokens: Sequence[int], salt: str = "") -> int:
        """Give `request_id` a slot whose first n positions already hold tokens[:n], for the
        largest n < len(tokens) any slot of the same `salt` offers (the last token is always
        run: its logits are the prefill's answer); return n. A request that has a slot gives
        it up first.

        A freed slot that holds exactly that head is taken as it is. A head of a longer
        sequence (a live request's, or a freed one's, such as another question after the
        same system prompt) is copied into the least recently freed slot instead, so the
        longer one stays for its own next turn."""
        self.close(request_id)
        if not self._free:
            raise CacheFullError(f"all {self.slots} KV cache slots are in use; release a request or raise max_batch")
        tokens = list(tokens)
        usable, found = self._heads(tokens, salt)
        n = max(found.values(), default=0)
        if n == 0:
            self._take(request_id, self._free[0], 0, salt)
            return 0
        exact = [slot for slot in reversed(self._free) if found.get(slot) == n == usable[slot]]
        if exact:  # nothing is lost by taking it
            self._take(request_id, exact[0], n, salt)
            return n
        source = next(slot for slot in [*reversed(self._free), *self._slot.values()] if found.get(slot) == n)
        target = next((slot for slot in self._free if slot != source), source)
        if target != source:
            start = found.get(target, 0)
            self.k[:, target, :, start:n] = self.k[:, source, :, start:n]
            self.v[:, target, :, start:n] = self.v[:, source, :, start:n]
            self._held[target][start:] = tokens[start:n]
        self._take(request_id, target, n, salt)
        return n

    def held_prefix(self, tokens: Sequence[int], salt: str = "") -> int:
        """The head `open_prefix` would start `tokens` on now, without opening anything."""
        return max(self._heads(list(tokens), salt)[1].values(), default=0)

    def _heads(self, tokens: list[int], salt: str) -> tuple[dict[int, int], dict[int, int]]:
        """Per slot of `salt` (freed or live): the positions it holds, and how many of them begin `tokens` (< len)."""
        cap = len(tokens) - 1
        usable = {slot: len(self._held[slot]) for slot in self._free if self._salt[slot] == salt}
        usable.update((slot, self._length[rid]) for rid, slot in self._slot.items() if self._salt[slot] == salt)
        return usable, {slot: common_prefix(self._held[slot], tokens, min(cap, n)) for slot, n in usable.items()}

    def _take(self, request_id: str, slot: int, length: int, salt: str) -> None:
        self._free.remove(slot)
        del self._held[slot][length:]
        self._salt[slot] = salt
        self._slot[request_id] = slot
        self._length[request_id] = length

    def close(self, request_id: str) -> None:
        """Free the request's slot (a no-op for an unknown request); the tokens it holds stay
        there for a later request's prefix until the slot is given out again."""
        slot = self._slot.pop(request_id, None)
        if slot is not None:
            del self._held[slot][self._length.pop(request_id):]
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

    def advance(self, request_id: str, tokens: Sequence[int]) -> None:
        """Mark the positions after the request's length as holding `tokens` (after a forward)."""
        length = self._length[request_id]
        new = length + len(tokens)
        if new > self.max_len:
            raise CacheFullError(f"request {request_id!r} would reach {new} tokens, over max_len={self.max_len}")
        held = self._held[self._slot[request_id]]
        del held[length:]
        held.extend(tokens)
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


def common_prefix(held: list[int], tokens: list[int], cap: int) -> int:
    """The length of the longest common head of `held` and `tokens`, at most `cap`: a
    binary search on slice equality (each comparison runs in C)."""
    low, high = 0, min(len(held), cap)
    while low < high:
        mid = (low + high + 1) // 2
        if held[:mid] == tokens[:mid]:
            low = mid
        else:
            high = mid - 1
    return low
