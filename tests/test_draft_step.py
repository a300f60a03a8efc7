"""The compiled drafting step (mlx_gemma4/draft_step.py): the same drafts and hidden states as the drafter run op
by op, across the wrapped sliding rings and the full-attention buffer's growth, and traced rarely."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.generation import generate_step
from mlx_gemma4.speculative import producer_caches, required_max_rewind
from tests import helpers

# The compiled step reads the whole buffers under a mask, in slot order, and fuses element-wise ops, so its float32
# sums round differently: about 1e-6 per step here (fed its own outputs, the random drafter grows that ~4x a step).
HIDDEN_ATOL = 5e-6


def _ids(n: int) -> mx.array:
    return mx.array(helpers.ids_of(n, seed=3).numpy().astype(np.int32))


@pytest.mark.parametrize("family", ["e", "dense"])
def test_compiled_drafts_are_the_drafts_op_by_op(text_pair, drafters, family):
    """At every position from 240 to 272 (the full layers' buffer grows from 256 to 512 slots; the 8-token
    sliding rings have wrapped many times), three drafting steps of both paths, each from the same token and
    hidden state (the uncompiled path's previous outputs)."""
    _, model = text_pair(family)
    ours = drafters(family)
    ours._compiled_draft = None   # count this test's traces only
    ids = _ids(272)
    cache = model.make_cache(max_rewind=required_max_rewind(model, ours, 4))
    _, h = model.prefill({"input_ids": ids[:, :240]}, cache, with_hidden=True)
    hidden = h[:, -1:]
    for p in range(240, 272):
        producers = producer_caches(model, cache)
        compiled, plain = ours.draft_step(model, producers), ours.draft_step(model, producers, compiled=False)
        b = (ids[0, p - 1], hidden)
        for i in range(3):
            a, b = compiled(*b), plain(*b)
            assert a[0].item() == b[0].item(), (p, i)
            np.testing.assert_allclose(np.array(a[1]), np.array(b[1]), atol=HIDDEN_ATOL, err_msg=f"{p}, {i}")
        _, h = model.step_hidden(ids[:, p : p + 1], cache)
        hidden = h[:, -1:]
    assert ours._compiled_draft.traces == 2   # the full buffer at 256 slots, then at 512


def test_a_long_generation_traces_once_per_buffer_size_and_stays_greedy(text_pair, drafters):
    """300 tokens after a 30-token prompt with 3 drafts a round: the full layers' buffer takes two sizes, so the
    drafter's step is traced twice, and the output is plain greedy's."""
    _, model = text_pair("e")
    ours = drafters("e")
    ours._compiled_draft = None   # count this generation's traces only
    inputs = {"input_ids": _ids(30)}
    plain = [t for t, _ in generate_step(model, inputs, max_tokens=300)]
    loop = generate_step(model, inputs, max_tokens=300, assistant=ours, draft_tokens=3)
    assert [t for t, _ in loop] == plain
    assert loop.drafted >= 3 * 100   # at least a hundred rounds replayed the step
    assert ours._compiled_draft.traces == 2
