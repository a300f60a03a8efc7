"""The compiled drafting step: one greedy draft of an assistant (assistant.py), traced once and replayed.

A drafter step is a few hundred small ops (the target's embedding of the last token, the drafter's layers, the
centroid-masked head's greedy pick). Where decoding is bound by building the graph (MLX's GPU backends at batch 1)
building them costs more than running them, so the step is traced with ``mx.compile``, as the target's own step is
(decode.py). Its shapes must stay fixed while positions move on, so it reads the target's K/V the way that step
does: the whole buffers of the target's last producer layer of each type (a sliding ring's slots; a full layer's
buffer at its current size, which grows in steps of 256 slots), with a mask built inside the trace from the
traced position (cache.py ``read_mask``: which slots hold the positions the drafter sees). All drafts of a round
share that position. So the step is traced once per size of the full-attention buffer (and per dtype of the
hidden state it is given); every draft until the buffer grows replays it. Gives the same drafts and hidden states
as the uncompiled path (tests/test_draft_step.py).
"""

from __future__ import annotations

import weakref
from typing import Callable

import mlx.core as mx

from .cache import KVCache
from .speculative import producer_caches

DraftFn = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]


def fits_compiled_draft(producers: dict[str, KVCache]) -> bool:
    """Whether a drafter can read ``producers`` (layer type -> the target's cache it reads) through the compiled
    step: every one holds buffers and at least one position."""
    return bool(producers) and all(not c.empty and c.offset > 0 for c in producers.values())


class CompiledDraft:
    """The compiled drafting step of one drafter for one target. ``traces`` counts how often it was traced."""

    def __init__(self, target, assistant):
        # The target is held weakly: a drafter keeps this step, and must not keep a target its user let go of.
        self.target = weakref.ref(target)
        self.assistant = assistant
        # Empty caches of the kinds the drafter reads: inside the trace they say which slots it sees.
        self._layout = producer_caches(target, target.make_cache())
        self.traces = 0
        self._step = mx.compile(self._trace)

    def bind(self, producers: dict[str, KVCache], at: mx.array | None = None) -> DraftFn:
        """The step for one round after what ``producers`` hold: ``step(token, hidden) -> (draft, hidden)``, as
        ``Assistant.draft_token`` gives them after the target's embedding of ``token``. The buffers are read when
        the round is built (a round is built before the verification writes to them). ``at`` (an int32 scalar
        array, not yet known on the host): the drafts' position, at most the caches' offset, where the caches
        hold positions past it that a rewind is about to take back (speculative.py drafts the next round before
        it reads how much of this one is kept); the mask hides them, as it hides rewound slots."""
        position = next(iter(producers.values())).offset
        pos = mx.array(position, dtype=mx.int32) if at is None else at
        buffers = {t: c.read_buffers(self.assistant.visible(t, position)) for t, c in producers.items()}

        def step(token: mx.array, hidden: mx.array) -> tuple[mx.array, mx.array]:
            if token.ndim or token.dtype != mx.int32:   # a sampler's pick: (1,) uint32; the step's own: () int32
                token = token.reshape(()).astype(mx.int32)
            return self._step(token, hidden, pos, buffers)

        return step

    def _trace(self, token: mx.array, hidden: mx.array, pos: mx.array, buffers: dict[str, tuple[mx.array, mx.array]]):
        self.traces += 1   # runs only while tracing
        a = self.assistant
        masks = {}
        for t, (keys, _) in buffers.items():
            size = keys.shape[2]   # (1, Hkv, slots, D): fixed for this trace
            masks[t] = self._layout[t].read_mask(size, pos, a.visible(t, size))
        embed = self.target().language_model.embed(token.reshape(1, 1))
        draft, hidden = a.draft_token(embed, hidden, pos, buffers, masks)
        return draft.astype(mx.int32), hidden
