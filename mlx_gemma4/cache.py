"""KV caches for the Gemma 4 text decoder; each cache alone knows its layout.

One cache per KV-producing layer; the KV-shared layers at the end own none (they read their producer's K/V in the
same forward pass). Full-attention layers keep every position in a buffer that grows in steps. Sliding layers keep
a ring of ``window - 1 + max_rewind`` slots, position ``p`` in slot ``p % slots``: the ``window - 1`` tokens the
next query needs, plus ``max_rewind`` more so that the last writes can be taken back exactly (speculative decoding
verifies drafted tokens and rewinds the rejected ones) even after the ring has wrapped.

What the rest of the package asks of a cache (the ``KVCache`` protocol):
- ``make_mask(n, vision_blocks)``: the attention mask for ``n`` new tokens over the keys ``update_and_fetch``
  will return for them (asked before the write);
- ``update_and_fetch(keys, values)``: write ``n`` new tokens, return the keys/values they attend to;
- ``hand_over(n)`` / ``take_back(keys, values, n)`` and ``step_view(keys, values, pos, n)``: the buffers for the
  compiled step of ``n`` tokens (decode.py), which writes them in place at a traced position; ``fits_step(n)``
  says whether the buffers can take such a step;
- ``recent(n)``: the last ``n`` positions' keys and values in order (for a drafter); for a compiled drafter
  (draft_step.py), ``read_buffers(n)``: the whole buffers, and ``read_mask(size, pos, n)``: which of their slots
  hold those positions, for a traced ``pos``;
- ``rewind(n)`` / ``rewindable``, ``snapshot()`` / ``restore()``, ``offset``, ``empty``, ``state``, ``nbytes``.
Prompt reuse over a list of caches: ``rewind_to`` (rewind where every layer can, else restore a kept ``Snapshot``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Protocol, Union

import mlx.core as mx

from .errors import CacheError
from .step_slots import StepSlots, query_positions

Mask = Union[None, str, mx.array]   # what mx.fast.scaled_dot_product_attention takes: None, "causal" or bool array

MAX_REWIND = 8  # tokens a sliding ring can always take back after a write (see SlidingCache)


class KVCache(Protocol):
    @property
    def offset(self) -> int: ...
    @property
    def empty(self) -> bool: ...
    def make_mask(self, n: int, vision_blocks: mx.array | None = None) -> Mask: ...
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]: ...
    def fits_step(self, n: int) -> bool: ...
    def hand_over(self, n: int = 1) -> tuple[mx.array, mx.array]: ...
    def take_back(self, keys: mx.array, values: mx.array, n: int = 1) -> None: ...
    def step_view(self, keys: mx.array, values: mx.array, pos: mx.array, n: int = 1) -> StepSlots: ...
    @property
    def rewindable(self) -> int: ...
    def rewind(self, n: int) -> None: ...
    def recent(self, n: int) -> tuple[mx.array, mx.array]: ...
    def read_buffers(self, n: int) -> tuple[mx.array, mx.array]: ...
    def read_mask(self, size: int, pos: mx.array, n: int) -> mx.array: ...
    def snapshot(self) -> Any: ...
    def restore(self, snap: Any) -> None: ...
    @property
    def state(self) -> tuple[mx.array, ...]: ...
    @property
    def nbytes(self) -> int: ...


def window_mask(n: int, offset: int, prev: int, window: int, vision_blocks: mx.array | None = None,
                blocks_in_window: bool = True) -> mx.array:
    """(n, prev + n) bool mask for queries at ``offset ..`` over keys at ``offset - prev ..`` (in order): causal,
    within ``window``, and bidirectional inside a vision block (``vision_blocks`` (n,) gives each new token
    its block id, -1 outside; earlier tokens are never in a new token's block because prefill does not split one).
    ``blocks_in_window=False`` lets a block's tokens see each other however far apart (gemma4_unified)."""
    q_pos = mx.arange(offset, offset + n)[:, None]
    k_pos = mx.arange(offset - prev, offset + n)[None, :]
    in_window = k_pos > q_pos - window
    mask = (k_pos <= q_pos) & in_window
    if vision_blocks is not None:
        k_blocks = mx.concatenate([mx.full((prev,), -1, dtype=vision_blocks.dtype), vision_blocks])
        same = (vision_blocks[:, None] == k_blocks[None, :]) & (vision_blocks[:, None] >= 0)
        mask = mask | ((same & in_window) if blocks_in_window else same)
    return mask


def _ring_mask(pos: int | mx.array, n: int, slots: int, window: int) -> mx.array:
    """(n,) bool mask over the first ``n`` ring slots for a query at ``pos`` whose own token is already written
    (``pos`` (L, 1): (L, n), one row per query): a slot is visible when the token it holds is at most
    ``window - 1`` positions back and not from before 0."""
    back = (pos - mx.arange(n)) % slots   # how many positions back the token in each slot is
    return (back < window) & (back <= pos)


class _Buffers:
    """What both caches share: the buffers, the count of tokens written, and their hand-over to the step."""

    def __init__(self) -> None:
        self._keys: mx.array | None = None
        self._values: mx.array | None = None
        self._offset = 0

    @property
    def offset(self) -> int:
        """Tokens written so far (the absolute position of the next one)."""
        return self._offset

    @property
    def empty(self) -> bool:
        """True until the first write allocates the buffers (the compiled step needs them)."""
        return self._keys is None

    @property
    def state(self) -> tuple[mx.array, ...]:
        """The buffers, to evaluate (``mx.eval(*cache.state)``); read-only."""
        return () if self._keys is None else (self._keys, self._values)

    @property
    def nbytes(self) -> int:
        return 0 if self._keys is None else self._keys.nbytes + self._values.nbytes

    def hand_over(self, n: int = 1) -> tuple[mx.array, mx.array]:
        """Give the buffers to the compiled step, with room for ``n`` more tokens. The cache lets go of them so
        MLX can write the new slots in place instead of copying; ``take_back`` returns them."""
        self._reserve(self._offset + n)
        keys, values = self._keys, self._values
        self._keys = self._values = None
        return keys, values

    def take_back(self, keys: mx.array, values: mx.array, n: int = 1) -> None:
        """Receive the buffers from the compiled step, which wrote ``n`` tokens."""
        self._keys, self._values = keys, values
        self._advance(self._offset + n)

    def read_buffers(self, n: int) -> tuple[mx.array, mx.array]:
        """The whole buffers as they lie, for a compiled reader of the last ``n`` positions (``read_mask`` says
        which slots hold them); raises as ``recent(n)`` does if they are not all held."""
        self._check_held(n)
        return self._keys, self._values

    def _reserve(self, n: int) -> None:
        pass

    def _advance(self, end: int) -> None:
        self._offset = end

    def _check_rewind(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise CacheError(f"rewind takes how many tokens to take back, a whole number >= 0; got {n!r:.40}.")
        if not n <= self.rewindable:
            raise CacheError(
                f"Cannot rewind {n} tokens: this cache can take back at most {self.rewindable} now. "
                "Restore a snapshot instead, or make the cache with a larger max_rewind."
            )


class GlobalCache(_Buffers):
    """Every position, in a buffer that grows ``step`` slots at a time."""

    step = 256

    def make_mask(self, n: int, vision_blocks: mx.array | None = None) -> Mask:
        if vision_blocks is not None:
            # Every key so far: causal except inside a vision block (gemma4_unified's full layers).
            return window_mask(n, self._offset, self._offset, self._offset + n + 1, vision_blocks)
        # The keys are every position up to the new ones; sdpa's "causal" aligns the queries at the end.
        return "causal" if n > 1 else None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = keys.shape  # (B, Hkv, L, D)
        end = self._offset + L
        if self._keys is None:
            self._keys = mx.zeros((B, H, self._rounded(end), D), keys.dtype)
            self._values = mx.zeros((B, H, self._rounded(end), values.shape[3]), values.dtype)
        self._reserve(end)
        self._keys[:, :, self._offset : end] = keys
        self._values[:, :, self._offset : end] = values
        self._offset = end
        return self._keys[:, :, :end], self._values[:, :, :end]

    def fits_step(self, n: int) -> bool:
        """Whether the compiled step can write ``n`` tokens: once the buffers exist (it grows them beforehand)."""
        return self._keys is not None

    def step_view(self, keys: mx.array, values: mx.array, pos: mx.array, n: int = 1) -> StepSlots:
        """The buffers inside the compiled step for ``n`` tokens from traced ``pos``: written at slots
        ``pos ..``; each query sees the slots up to its own."""
        q = query_positions(pos, n)
        return StepSlots(keys, values, pos, pos, lambda: mx.arange(keys.shape[2]) <= q)

    def _reserve(self, n: int) -> None:
        """Make room for ``n`` positions (the compiled step writes in place and cannot grow a buffer)."""
        if self._keys is not None and n > self._keys.shape[2]:
            pad = ((0, 0), (0, 0), (0, self._rounded(n) - self._keys.shape[2]), (0, 0))
            self._keys, self._values = mx.pad(self._keys, pad), mx.pad(self._values, pad)

    def _rounded(self, n: int) -> int:
        return ((n + self.step - 1) // self.step) * self.step

    @property
    def rewindable(self) -> int:
        return self._offset

    def recent(self, n: int) -> tuple[mx.array, mx.array]:
        """The keys and values (B, Hkv, n, D) of the last ``n`` positions, oldest first (a drafter reads them)."""
        self._check_held(n)
        return self._keys[:, :, self._offset - n : self._offset], self._values[:, :, self._offset - n : self._offset]

    def read_mask(self, size: int, pos: mx.array, n: int) -> mx.array:
        """(size,) bool mask over the ``size`` slots of ``read_buffers`` for a reader at traced ``pos`` (not yet
        written): the slots of the last ``n`` positions before it."""
        slot = mx.arange(size)
        return (slot < pos) & (slot >= pos - n)

    def _check_held(self, n: int) -> None:
        if not 0 < n <= self._offset:
            raise CacheError(f"This cache holds {self._offset} positions; {n} were asked for.")

    def rewind(self, n: int) -> None:
        """Take back the last ``n`` tokens (any number: positions are only ever overwritten by later writes)."""
        self._check_rewind(n)
        self._offset -= n

    def snapshot(self) -> int:
        return self._offset

    def restore(self, snap: int) -> None:
        # Positions before `snap` are never rewritten, so going back to the length is enough.
        self._offset = snap


class SlidingCache(_Buffers):
    """A ring of ``window - 1 + max_rewind`` slots; slot ``p % slots`` holds position ``p``.

    A query needs the ``window - 1`` tokens before it; the ring keeps ``max_rewind`` more, so right after any
    write the last ``max_rewind`` tokens (or all of them, before the ring first wraps) can be rewound exactly.
    ``first`` is the oldest position the ring still holds: writes push it forward, a rewind leaves it (the slots of
    the rewound tokens held older positions, now lost), so ``rewindable`` is what keeps ``window - 1`` tokens before
    the new end intact.
    """

    def __init__(self, window: int, max_rewind: int = MAX_REWIND, blocks_in_window: bool = True) -> None:
        super().__init__()
        self.blocks_in_window = blocks_in_window  # see window_mask
        if not isinstance(max_rewind, numbers.Integral) or isinstance(max_rewind, bool) or max_rewind < 1:
            raise CacheError(f"max_rewind must be a whole number of tokens, at least 1; got {max_rewind!r:.40}.")
        self.window = window
        self.slots = window - 1 + max_rewind
        self._first = 0

    def make_mask(self, n: int, vision_blocks: mx.array | None = None) -> Mask:
        if n == 1 and self._keys is not None:
            # One token reads the ring in slot order (see update_and_fetch).
            if self._offset + 1 <= self.window:
                return None
            return _ring_mask(self._offset, min(self._offset + 1, self.slots), self.slots, self.window)
        return window_mask(n, self._offset, self._previous(), self.window, vision_blocks, self.blocks_in_window)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        L = keys.shape[2]  # keys: (B, Hkv, L, D)
        if L == 1 and self._keys is not None:
            # One token: write it to its slot and attend over the ring as it lies (make_mask hides what is too old).
            self._write(keys, values)
            n = min(self._offset, self.slots)
            return self._keys[:, :, :n], self._values[:, :, :n]
        prev = self._previous()
        if prev:
            old_k, old_v = self._ordered(prev)
            all_k = mx.concatenate([old_k, keys], axis=2)    # (B, Hkv, prev + L, D)
            all_v = mx.concatenate([old_v, values], axis=2)
        else:
            all_k, all_v = keys, values
        self._write(keys, values)
        return all_k, all_v

    def fits_step(self, n: int) -> bool:
        """Whether the compiled step can write ``n`` tokens: once the ring exists, and for at most ``max_rewind``
        (``slots - window + 1``) of them. The step's queries read the ring after all ``n`` writes, so a write
        must not land on a slot that an earlier query of the same step still reads (its token ``slots`` positions
        back, within that query's window); up to ``max_rewind`` tokens it cannot, and the ring mask then also
        hides every later token of the step from an earlier query (they look ``window`` or more positions back).
        """
        return self._keys is not None and n <= self.slots - self.window + 1

    def step_view(self, keys: mx.array, values: mx.array, pos: mx.array, n: int = 1) -> StepSlots:
        """The ring inside the compiled step for ``n`` tokens from traced ``pos``: position ``p`` written at slot
        ``p % slots`` (the run may wrap), each query masked as ``_ring_mask`` says."""
        slots = keys.shape[2]
        at = pos % slots if n == 1 else (pos + mx.arange(n)) % slots
        q = query_positions(pos, n)
        return StepSlots(keys, values, pos, at, lambda: _ring_mask(q, slots, slots, self.window))

    def _previous(self) -> int:
        """How many earlier tokens new queries can see: the last ``window - 1``."""
        return min(self._offset, self.window - 1)

    def _ordered(self, n: int) -> tuple[mx.array, mx.array]:
        """The last ``n`` tokens, oldest first."""
        a = (self._offset - n) % self.slots
        b = a + n
        if b <= self.slots:
            return self._keys[:, :, a:b], self._values[:, :, a:b]
        b -= self.slots
        return (mx.concatenate([self._keys[:, :, a:], self._keys[:, :, :b]], axis=2),
                mx.concatenate([self._values[:, :, a:], self._values[:, :, :b]], axis=2))

    def _write(self, keys: mx.array, values: mx.array) -> None:
        """Put the new tokens (B, Hkv, L, D) in their slots; only the last ``slots`` of a long run survive."""
        B, H, L, D = keys.shape
        S = self.slots
        end = self._offset + L
        if L >= S:
            # The run covers the whole ring: position end - S lands in slot end % S.
            shift = end % S
            self._keys = mx.roll(keys[:, :, -S:], shift, axis=2)
            self._values = mx.roll(values[:, :, -S:], shift, axis=2)
        else:
            if self._keys is None:
                self._keys = mx.zeros((B, H, S, D), keys.dtype)
                self._values = mx.zeros((B, H, S, values.shape[3]), values.dtype)
            a = self._offset % S
            n = min(L, S - a)  # the part before the ring's end, then the rest from slot 0
            self._keys[:, :, a : a + n] = keys[:, :, :n]
            self._values[:, :, a : a + n] = values[:, :, :n]
            if n < L:
                self._keys[:, :, : L - n] = keys[:, :, n:]
                self._values[:, :, : L - n] = values[:, :, n:]
        self._advance(end)

    def _advance(self, end: int) -> None:
        self._offset = end
        self._first = max(self._first, end - self.slots)

    def recent(self, n: int) -> tuple[mx.array, mx.array]:
        """The keys and values (B, Hkv, n, D) of the last ``n`` positions, oldest first (a drafter reads them).
        After a rewind the ring holds ``offset - first`` of them; a larger ``max_rewind`` keeps more."""
        self._check_held(n)
        return self._ordered(n)

    def read_mask(self, size: int, pos: mx.array, n: int) -> mx.array:
        """(size,) bool mask over the ring's ``size`` slots (``read_buffers``) for a reader at traced ``pos`` (not
        yet written): the slots of the last ``n`` positions before it, in slot order."""
        return _ring_mask(pos - 1, size, size, n)

    def _check_held(self, n: int) -> None:
        if not 0 < n <= self._offset - self._first:
            raise CacheError(f"This ring holds the last {self._offset - self._first} positions; {n} were asked for. "
                             "Make the cache with a larger max_rewind.")

    @property
    def rewindable(self) -> int:
        if self._first == 0:
            return self._offset
        return self._offset - (self._first + self.window - 1)

    def rewind(self, n: int) -> None:
        """Take back the last ``n`` tokens, exactly (see ``rewindable`` for how many that can be)."""
        self._check_rewind(n)
        self._offset -= n

    def snapshot(self) -> tuple:
        if self._keys is None:
            return (0, 0, None, None)
        # New handles on the same buffers: a later write sees them shared and writes a copy instead of updating
        # in place, so the snapshot needs no copy now (nor a wait for the device).
        return (self._offset, self._first, mx.array(self._keys), mx.array(self._values))

    def restore(self, snap: tuple) -> None:
        self._offset, self._first, k, v = snap
        self._keys = None if k is None else mx.array(k)
        self._values = None if v is None else mx.array(v)


def make_cache(config, max_rewind: int = MAX_REWIND) -> list[KVCache]:
    """One cache per KV-producing layer (the KV-shared layers at the end get none). Sliding rings can rewind
    ``max_rewind`` tokens after any write."""
    from .config import SLIDING

    return [
        SlidingCache(config.sliding_window, max_rewind, config.vision_block_layers != "every") if t == SLIDING
        else GlobalCache()
        for t in config.layer_types[: config.first_kv_shared_layer]
    ]


def snapshot(cache: list[KVCache]) -> list:
    return [c.snapshot() for c in cache]


def restore(cache: list[KVCache], snap: list) -> None:
    for c, s in zip(cache, snap):
        c.restore(s)


def rewind(cache: list[KVCache], n: int) -> None:
    """Take back the last ``n`` tokens from every layer's cache (all or none: checked first)."""
    if cache:
        tightest = min(cache, key=lambda c: c.rewindable)
        tightest.rewind(n)  # raises, having changed nothing, when n is too many for any of them
        for c in cache:
            if c is not tightest:
                c.rewind(n)


@dataclass
class Snapshot:
    """The caches' state at ``n`` tokens (``snapshot(cache)``), and what a caller keeps beside it (a PromptEnd)."""
    n: int
    caches: list
    end: Any = None


def rewind_to(cache: list[KVCache], snapshots: list[Snapshot], have: int, want: int) -> int:
    """Take ``cache`` from ``have`` tokens back to at most ``want``; return how many it holds afterwards.

    Rewind where every layer can (a ring keeps only a few positions it can take back), else restore the newest
    snapshot that is not past ``want``, else 0 (the caller starts a fresh cache). Snapshots past the result are
    dropped: the positions they would restore are about to be overwritten.
    """
    kept = 0
    if want >= have:
        kept = have
    elif all(c.rewindable >= have - want for c in cache):
        for c in cache:
            c.rewind(have - want)
        kept = want
    else:
        usable = [s for s in snapshots if s.n <= want]
        if usable:
            snap = max(usable, key=lambda s: s.n)
            restore(cache, snap.caches)
            kept = snap.n
    snapshots[:] = [s for s in snapshots if s.n <= kept]
    return kept
