"""The compiled step gives the uncompiled path's logits, across ring wrap-around, buffer growth and rewinds."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.cache import GlobalCache, rewind
from mlx_gemma4.decode import fits_compiled_step
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


@pytest.mark.parametrize("start", [5, GlobalCache.step - 6])   # (the second crosses the full buffers' growth)
@pytest.mark.parametrize("family", ["e", "dense"])
def test_compiled_verify_steps_match_the_uncompiled_path(family, start, text_pair):
    """A speculative verify's shape at every offset over several window wraps: L = 2..4 tokens at once through the
    compiled step, the rejected ones rewound, on; the same calls on a second cache run uncompiled."""
    hf, model = text_pair(family)
    n = start + 40   # the window (8) wraps five times
    ids = mx.array(ids_of(n + 4, seed=7).numpy().astype(np.int32))
    junk = mx.array(ids_of(4, seed=8).numpy().astype(np.int32))
    compiled, plain = model.make_cache(max_rewind=4), model.make_cache(max_rewind=4)
    for c in (compiled, plain):
        model.prefill({"input_ids": ids[:, :start]}, c, chunk_size=64)
    kept = [ids[:, :start]]
    for t in range(start, n):
        L = 2 + t % 3
        x = mx.concatenate([ids[:, t : t + 1], junk[:, : L - 1]], axis=1) if t % 2 else ids[:, t : t + L]
        assert fits_compiled_step(compiled, L)
        if t % 4 < 2:
            got = model.step(x, compiled)
        else:
            got, hidden = model.step_hidden(x, compiled)
            np.testing.assert_allclose(np.array(model.logits(hidden)), np.array(got), atol=1e-5, rtol=0)
        want = model(x, cache=plain)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=TEXT_ATOL, rtol=0)
        back = L - 1 - t % 2   # keep one token or two (then a draft was accepted)
        rewind(compiled, back)
        rewind(plain, back)
        kept.append(x[:, : L - back])
    seq = mx.concatenate(kept, axis=1)
    assert compiled[0].offset == plain[0].offset == seq.shape[1]
    # And against the full forward of what the caches kept, with three more tokens.
    tail = ids[:, n : n + 3]
    got = model.step(tail, compiled)
    full = model(mx.concatenate([seq, tail], axis=1))
    np.testing.assert_allclose(np.array(got), np.array(full)[:, -3:], atol=TEXT_ATOL, rtol=0)


def test_a_step_longer_than_the_rings_can_take_runs_uncompiled(text_pair):
    hf, model = text_pair("e")
    ids = mx.array(ids_of(30, seed=9).numpy().astype(np.int32))
    cache = model.make_cache(max_rewind=2)
    model.prefill({"input_ids": ids[:, :20]}, cache)
    assert fits_compiled_step(cache, 2) and not fits_compiled_step(cache, 3)
    got = model.step(ids[:, 20:30], cache)
    np.testing.assert_allclose(np.array(got), np.array(model(ids))[:, 20:], atol=TEXT_ATOL, rtol=0)
