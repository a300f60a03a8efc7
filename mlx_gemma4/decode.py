"""The compiled one-token step.

Decoding is bound by building the graph (a few hundred small ops per token) rather than by the device, so the step
is traced once with ``mx.compile`` and replayed. To keep shapes fixed, each cache hands its whole buffers to the
step (``hand_over``), the step runs the text model's one forward pass over the caches' step views (which write the
new K/V at a slot computed from the traced position and mask what is not visible; cache.py knows where), and the
caches take the buffers back. A full layer's buffer grows outside the step, in steps of 256 slots; each new size
is traced once. Gives the same logits as the uncompiled path (tests/test_decode.py).
"""

from __future__ import annotations

import mlx.core as mx

from .cache import KVCache


class CompiledStep:
    def __init__(self, model, with_hidden: bool = False):
        self.model = model
        self.with_hidden = with_hidden  # also return the final-normed hidden state (a drafter reads it)
        # Empty caches of the model's kinds: inside the trace they say how to write and mask each buffer.
        self._layout = model.make_cache()
        self._step = mx.compile(self._trace)

    def __call__(self, ids: mx.array, token_inputs: mx.array | None, cache: list[KVCache]) -> mx.array:
        """Logits (1, 1, vocab) (with ``with_hidden``: and the hidden state (1, 1, hidden)) for ``ids`` (1, 1),
        already mapped for embedding, and their per-layer embedding rows, which are gathered outside the traced
        step: a memory-mapped table (ple.py) reads them on the host, which a compiled function cannot do. Every
        cache must hold buffers (after a prefill)."""
        pos = mx.array(cache[0].offset, dtype=mx.int32)
        logits, buffers = self._step(ids, token_inputs, pos, [c.hand_over() for c in cache])
        for c, (keys, values) in zip(cache, buffers):
            c.take_back(keys, values)
        return logits

    def _trace(self, ids, token_inputs, pos, buffers):
        views = [c.step_view(k, v, pos) for c, (k, v) in zip(self._layout, buffers)]
        lm = self.model.language_model
        h = lm(lm.embed(ids), token_inputs, views)
        out = (self.model.logits(h), h) if self.with_hidden else self.model.logits(h)
        return out, [v.buffers for v in views]
