"""KV caches for the Gemma 4 text decoder.

One cache per KV-producing layer. Full-attention layers keep every position in a buffer that grows in steps.
Sliding layers keep a ring of ``sliding_window`` slots: the token at absolute position ``p`` lives in slot
``p % window``, so a decode step overwrites exactly the token that left the window. A prefill chunk is attended
against the previous ``window - 1`` tokens (in order) plus the chunk itself, which is the "room for one chunk" the
ring needs while the chunk is processed. KV-shared layers own no cache: they read what their producer returned.

``snapshot()`` / ``restore()`` let a chat rewind to the end of an earlier prompt (cheap: a snapshot of a growing
buffer is its length, a snapshot of a ring is the ring itself, which is small).
"""

from __future__ import annotations

from typing import Any, Protocol

import mlx.core as mx


class KVCache(Protocol):
    offset: int

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]: ...
    def snapshot(self) -> Any: ...
    def restore(self, snap: Any) -> None: ...
    def trim(self, n: int) -> int: ...
    def reserve(self, n: int) -> None: ...
    @property
    def nbytes(self) -> int: ...


class GlobalCache:
    """Every position, in a buffer that grows ``step`` slots at a time."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = keys.shape  # (B, Hkv, L, D)
        need = self.offset + L
        if self.keys is None:
            self.keys = mx.zeros((B, H, self._rounded(need), D), keys.dtype)
            self.values = mx.zeros((B, H, self._rounded(need), values.shape[3]), values.dtype)
        self.reserve(need)
        self.keys[:, :, self.offset : need] = keys
        self.values[:, :, self.offset : need] = values
        self.offset = need
        return self.keys[:, :, :need], self.values[:, :, :need]

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions (the compiled decode step writes in place and cannot grow)."""
        if self.keys is not None and n > self.keys.shape[2]:
            pad = ((0, 0), (0, 0), (0, self._rounded(n) - self.keys.shape[2]), (0, 0))
            self.keys, self.values = mx.pad(self.keys, pad), mx.pad(self.values, pad)

    def _rounded(self, n: int) -> int:
        return ((n + self.step - 1) // self.step) * self.step

    def snapshot(self) -> int:
        return self.offset

    def restore(self, snap: int) -> None:
        # Positions before `snap` are never rewritten, so rewinding the length is enough.
        self.offset = snap

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SlidingCache:
    """A ring of ``window`` slots; slot ``p % window`` holds position ``p``."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def size(self) -> int:
        return min(self.offset, self.window)

    def _ordered(self, n: int) -> tuple[mx.array, mx.array]:
        """The last ``n`` stored tokens, oldest first."""
        W, off = self.window, self.offset
        if self.offset <= W:
            sl = slice(off - n, off)
            return self.keys[:, :, sl], self.values[:, :, sl]
        idx = mx.array([(p % W) for p in range(off - n, off)])
        return mx.take(self.keys, idx, axis=2), mx.take(self.values, idx, axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = keys.shape  # (B, Hkv, L, D)
        W = self.window
        if L == 1 and self.keys is not None:
            slot = self.offset % W
            self.keys[:, :, slot : slot + 1] = keys
            self.values[:, :, slot : slot + 1] = values
            self.offset += 1
            # Every stored slot is inside the window of the new token, so order does not matter.
            n = min(self.offset, W)
            return self.keys[:, :, :n], self.values[:, :, :n]

        prev = min(self.size, W - 1)
        if prev:
            old_k, old_v = self._ordered(prev)
            all_k = mx.concatenate([old_k, keys], axis=2)    # (B, Hkv, prev + L, D)
            all_v = mx.concatenate([old_v, values], axis=2)
        else:
            all_k, all_v = keys, values
        self._store_tail(all_k, all_v, self.offset + L)
        return all_k, all_v

    def _store_tail(self, all_k: mx.array, all_v: mx.array, end: int) -> None:
        """Keep the last ``window`` positions of an ordered run ending at ``end`` in their ring slots."""
        W = self.window
        B, H, _, D = all_k.shape
        if self.keys is None:
            self.keys = mx.zeros((B, H, W, D), all_k.dtype)
            self.values = mx.zeros((B, H, W, all_v.shape[3]), all_v.dtype)
        n = min(W, all_k.shape[2])
        start = end - n
        tail_k, tail_v = all_k[:, :, -n:], all_v[:, :, -n:]
        if end > W:
            # Position p goes to slot p % W: rotate the ordered tail into place.
            shift = start % W
            tail_k = mx.roll(tail_k, shift, axis=2)
            tail_v = mx.roll(tail_v, shift, axis=2)
            self.keys, self.values = tail_k, tail_v
        else:
            self.keys[:, :, start:end] = tail_k
            self.values[:, :, start:end] = tail_v
        self.offset = end

    def reserve(self, n: int) -> None:
        pass  # a ring never grows

    def snapshot(self) -> tuple:
        if self.keys is None:
            return (0, None, None)
        # Copies: later decode steps write into the ring in place.
        k, v = mx.array(self.keys), mx.array(self.values)
        mx.eval(k, v)
        return (self.offset, k, v)

    def restore(self, snap: tuple) -> None:
        self.offset, k, v = snap
        self.keys = None if k is None else mx.array(k)
        self.values = None if v is None else mx.array(v)

    def trim(self, n: int) -> int:
        """Rewind ``n`` positions. Exact only while nothing needed was overwritten (offset <= window)."""
        n = min(n, self.offset)
        if self.offset > self.window and n > 0:
            raise ValueError("A sliding-window cache past its window cannot be trimmed; restore a snapshot instead.")
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(config) -> list[KVCache]:
    """One cache per KV-producing layer (the KV-shared layers at the end get none)."""
    from .config import SLIDING

    return [
        SlidingCache(config.sliding_window) if t == SLIDING else GlobalCache()
        for t in config.layer_types[: config.first_kv_shared_layer]
    ]


def snapshot(cache: list[KVCache]) -> list:
    return [c.snapshot() for c in cache]


def restore(cache: list[KVCache], snap: list) -> None:
    for c, s in zip(cache, snap):
        c.restore(s)
