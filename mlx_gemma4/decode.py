"""The compiled decode step: one token, or the few tokens of a speculative verify.

Decoding is bound by building the graph (a few hundred small ops per token) rather than by the device, so the step
is traced once with ``mx.compile`` and replayed. To keep shapes fixed, each cache hands its whole buffers to the
step (``hand_over``), the step runs the text model's one forward pass over the caches' step views (which write the
new K/V at slots computed from the traced position and mask what is not visible; cache.py knows where), and the
caches take the buffers back. A full layer's buffer grows outside the step, in steps of 256 slots; each new size
is traced once, as is each number of tokens (a verify of k drafts runs k + 1). Gives the same logits as the
uncompiled path (tests/test_decode.py).
"""

from __future__ import annotations

import mlx.core as mx

from .cache import KVCache

MAX_STEP_TOKENS = 65   # a verify of the most drafts generate() takes (64) and its token; longer runs go uncompiled


def fits_compiled_step(cache: list[KVCache] | None, n: int) -> bool:
    """Whether ``n`` tokens after ``cache`` can run through the compiled step: every cache holds buffers (after a
    prefill) that can take ``n`` tokens in place."""
    return bool(cache) and 1 <= n <= MAX_STEP_TOKENS and all(c.fits_step(n) for c in cache)


class CompiledStep:
    def __init__(self, model, with_hidden: bool = False):
        self.model = model
        self.with_hidden = with_hidden  # also return the final-normed hidden states (a drafter reads them)
        # Empty caches of the model's kinds: inside the trace they say how to write and mask each buffer.
        self._layout = model.make_cache()
        self._step = mx.compile(self._trace)

    def __call__(self, ids: mx.array, token_inputs: mx.array | None, cache: list[KVCache]) -> mx.array:
        """Logits (1, L, vocab) (with ``with_hidden``: and the hidden states (1, L, hidden)) for ``ids`` (1, L),
        already mapped for embedding, and their per-layer embedding rows, which are gathered outside the traced
        step: a memory-mapped table (ple.py) reads them on the host, which a compiled function cannot do. The
        caches must fit the step (``fits_compiled_step``)."""
        n = ids.shape[1]
        pos = mx.array(cache[0].offset, dtype=mx.int32)
        logits, buffers = self._step(ids, token_inputs, pos, [c.hand_over(n) for c in cache])
        for c, (keys, values) in zip(cache, buffers):
            c.take_back(keys, values, n)
        return logits

    def _trace(self, ids, token_inputs, pos, buffers):
        n = ids.shape[1]   # fixed for this trace: each L is traced once
        views = [c.step_view(k, v, pos, n) for c, (k, v) in zip(self._layout, buffers)]
        lm = self.model.language_model
        h = lm(lm.embed(ids), token_inputs, views)
        out = (self.model.logits(h), h) if self.with_hidden else self.model.logits(h)
        return out, [v.buffers for v in views]
