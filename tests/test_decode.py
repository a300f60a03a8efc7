"""The compiled step gives the uncompiled path's logits, across ring wrap-around, buffer growth and rewinds."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.cache import GlobalCache, rewind
from tests.helpers import TEXT_ATOL, ids_of


@pytest.mark.parametrize("family", ["e", "dense", "moe"])
def test_compiled_steps_match_full_forward(family, text_pair):
    hf, model = text_pair(family)
    n = GlobalCache.step + 20  # the full layers' buffers grow once on the way; the window (8) wraps many times
    ids = mx.array(ids_of(n, seed=4).numpy().astype(np.int32))
    full = np.array(model(ids))
    cache = model.make_cache()
    outs = [model(ids[:, :5], cache=cache)]
    outs += [model.step(ids[:, t : t + 1], cache) for t in range(5, n)]
    np.testing.assert_allclose(np.array(mx.concatenate(outs, axis=1)), full, atol=TEXT_ATOL, rtol=0)
    assert cache[0].offset == n


@pytest.mark.parametrize("family", ["e", "dense"])
def test_compiled_steps_after_rewinds_match_fresh_forward(family, text_pair):
    """Draft-and-verify shaped: step tokens, take some back, step others; past the window many times."""
    hf, model = text_pair(family)
    ids = mx.array(ids_of(60, seed=5).numpy().astype(np.int32))
    junk = mx.array(ids_of(4, seed=6).numpy().astype(np.int32))
    cache = model.make_cache(max_rewind=4)
    outs = [model.prefill({"input_ids": ids[:, :6]}, cache, chunk_size=4)[None, None]]
    for t in range(6, 60):
        if t % 5 == 0:
            for j in range(t % 4 + 1):  # tokens that get rejected
                model.step(junk[:, j : j + 1], cache)
            rewind(cache, t % 4 + 1)
        outs.append(model.step(ids[:, t : t + 1], cache))
    full = np.array(model(ids))[:, 5:]
    np.testing.assert_allclose(np.array(mx.concatenate(outs, axis=1)), full, atol=TEXT_ATOL, rtol=0)


def test_step_from_an_empty_cache_falls_back(text_pair):
    hf, model = text_pair("e")
    cache = model.make_cache()
    ids = mx.array([[5, 6]], dtype=mx.int32)
    first = model.step(ids[:, :1], cache)
    np.testing.assert_allclose(np.array(first)[0, 0], np.array(model(ids))[0, 0], atol=TEXT_ATOL, rtol=0)


def test_placeholder_ids_embed_as_pad_when_stepping(text_pair):
    hf, model = text_pair("e")
    cfg = model.config
    prompt = mx.array([[2, 7, 9]], dtype=mx.int32)
    a, b = model.make_cache(), model.make_cache()
    model(prompt, cache=a)
    model(prompt, cache=b)
    got = model.step(mx.array([[cfg.image_token_id]], dtype=mx.int32), a)
    want = model.step(mx.array([[cfg.text_config.pad_token_id]], dtype=mx.int32), b)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6, rtol=0)
