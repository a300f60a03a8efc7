"""A cache as the compiled step (decode.py) sees it: whole buffers written at traced slots, with a traced mask.

Which slots and which mask is each cache's own business (cache.py ``step_view``); this holds the write.
"""

from __future__ import annotations

import mlx.core as mx


def query_positions(pos: mx.array, n: int) -> mx.array:
    """The traced positions of ``n`` new tokens from ``pos``: ``pos`` itself for one, (n, 1) for more (so a mask
    built from them has one row per query)."""
    return pos if n == 1 else pos + mx.arange(n)[:, None]


class StepSlots:
    """A cache inside the compiled step: whole buffers written at traced slots, with a traced mask.

    It answers the same calls the forward pass makes on a cache (``offset``, ``make_mask``, ``update_and_fetch``),
    so the step runs the one forward pass of text.py over it. ``at`` is where the new tokens go: a 0-d start of a
    run of consecutive slots, or (L,) one slot per token (a ring's run may wrap past its end)."""

    def __init__(self, keys: mx.array, values: mx.array, pos: mx.array, at: mx.array, mask):
        self.keys, self.values, self.offset = keys, values, pos
        self._at, self._mask = at, mask

    def make_mask(self, n: int, vision_blocks: mx.array | None = None) -> mx.array:
        return self._mask()

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = self._put(self.keys, keys), self._put(self.values, values)
        return self.keys, self.values

    def _put(self, buffer: mx.array, new: mx.array) -> mx.array:
        if self._at.ndim == 0:
            return mx.slice_update(buffer, new, self._at.reshape(1), axes=[2])
        return mx.put_along_axis(buffer, self._at[None, None, :, None], new, axis=2)   # index (1, 1, L, 1)

    @property
    def buffers(self) -> tuple[mx.array, mx.array]:
        return self.keys, self.values
