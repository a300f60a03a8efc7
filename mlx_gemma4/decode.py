"""A compiled single-token decode step.

Decoding is bound by building the graph (a few hundred small ops per token) rather than by the device, so the step
is traced once with ``mx.compile`` and replayed. To keep shapes fixed, the compiled step writes the new K/V at a
slot computed from a traced position (``mx.slice_update``) and attends over whole buffers with a validity mask:
the ring of a sliding layer (slot ``p % window``, valid below ``p + 1``) and the preallocated buffer of a full
layer (valid up to ``p``). A full layer's buffer grows outside the step, in steps of 256 slots; each new size is
traced once. Gives the same logits as the uncompiled path (tests/test_decode.py).
"""

from __future__ import annotations

import mlx.core as mx

from .cache import KVCache, SlidingCache
from .config import FULL, SLIDING
from .text import LayerContext


class _Slot:
    """A cache buffer inside the traced step: written at a traced slot, read whole."""

    def __init__(self, keys: mx.array, values: mx.array, slot: mx.array):
        self.keys, self.values, self.slot = keys, values, slot

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, k, self.slot, axes=[2])
        self.values = mx.slice_update(self.values, v, self.slot, axes=[2])
        return self.keys, self.values


class CompiledDecoder:
    def __init__(self, model):
        self.model = model
        self._sliding = [isinstance(c, SlidingCache) for c in model.make_cache()]
        self._step = mx.compile(self._trace)

    def ready(self, cache: list[KVCache]) -> bool:
        """Whether every buffer exists (they are allocated by the first prefill)."""
        return bool(cache) and all(c.keys is not None for c in cache)

    def __call__(self, ids: mx.array, token_inputs: mx.array | None, cache: list[KVCache]) -> mx.array:
        """One step for ``ids`` (1, 1), already mapped for embedding, and their per-layer embedding rows, which
        are gathered outside the traced step: a memory-mapped table (ple.py) reads them on the host, which a
        compiled function cannot do."""
        pos = cache[0].offset
        for c in cache:
            c.reserve(pos + 1)
        keys, values = [c.keys for c in cache], [c.values for c in cache]
        for c in cache:
            # Only the step may hold the buffers, so MLX can write the new slot in place instead of copying them.
            c.keys = c.values = None
        logits, keys, values = self._step(ids, token_inputs, mx.array(pos, dtype=mx.int32), keys, values)
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values, c.offset = k, v, pos + 1
        return logits

    def _trace(self, ids, token_inputs, pos, keys, values):
        model = self.model
        lm = model.language_model
        window = lm.config.sliding_window
        slots, masks = [], {}
        for sliding, k, v in zip(self._sliding, keys, values):
            slot = (pos % window) if sliding else pos
            slots.append(_Slot(k, v, slot.reshape(1)))
            kind = SLIDING if sliding else FULL
            if kind not in masks:
                masks[kind] = mx.arange(k.shape[2]) <= pos  # ring slots fill from 0, so this holds for both
        ctx = LayerContext(offset=pos, masks=masks, shared_kv={})
        h = lm(lm.embed_tokens(ids), token_inputs, slots, step_context=ctx)
        return model.logits(h), [s.keys for s in slots], [s.values for s in slots]
