"""KV caches, observed only through what the forward pass and the compiled step ask of them.

Keys here encode their position (key = position, value = position + 0.5), so "what a new token attends to" is a
list of positions: the keys whose mask entry is true."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.cache import GlobalCache, SlidingCache, Snapshot, make_cache, restore, rewind, rewind_to, snapshot
from mlx_gemma4.config import TextConfig
from mlx_gemma4.errors import CacheError
from tests.random_checkpoint import E4B_TEXT

W = 8  # sliding window


def test_e4b_cache_has_buffers_for_producers_only():
    cfg = TextConfig.from_dict(E4B_TEXT)
    cache = make_cache(cfg)
    assert len(cache) == 24  # 42 layers, the last 18 share K/V and own nothing
    assert sum(isinstance(c, SlidingCache) for c in cache) == 20
    assert sum(isinstance(c, GlobalCache) for c in cache) == 4


def _kv(L, start=0, H=2, D=4):
    pos = mx.arange(start, start + L, dtype=mx.float32)
    k = mx.broadcast_to(pos[None, None, :, None], (1, H, L, D))
    return k, k + 0.5


def _visible(keys, values, mask, L):
    """Per new token (query), the positions it attends to, checking values travel with their keys."""
    k, v = np.array(keys[0, 0, :, 0]), np.array(values[0, 0, :, 0])
    if mask is None:
        m = np.ones((L, k.size), bool)
    elif isinstance(mask, str):  # "causal", aligned bottom-right
        m = np.tril(np.ones((L, k.size), bool), k.size - L)
    else:
        m = np.broadcast_to(np.array(mask), (L, k.size))
    for row in m:
        np.testing.assert_array_equal(v[row], k[row] + 0.5)
    return [sorted(k[row].tolist()) for row in m]


def _write(c, L, how="plain"):
    """Write the next L tokens the way the forward pass does, or the way the compiled step does; return what each
    new token attends to. The step needs buffers (it follows a prefill) that fit it."""
    start = c.offset
    if how == "step" and not c.empty:
        assert c.fits_step(L)
        view = c.step_view(*c.hand_over(L), mx.array(start, dtype=mx.int32), L)
        mask = view.make_mask(L)
        keys, values = view.update_and_fetch(*_kv(L, start))
        c.take_back(*view.buffers, L)
    else:
        mask = c.make_mask(L)
        keys, values = c.update_and_fetch(*_kv(L, start))
    return _visible(keys, values, mask, L)


def _expected(start, L, window=None):
    lo = (lambda q: max(0, q - window + 1)) if window else (lambda q: 0)
    return [[float(p) for p in range(lo(q), q + 1)] for q in range(start, start + L)]


@pytest.mark.parametrize("how", ["plain", "step"])
def test_each_new_token_sees_its_window(how):
    s, g = SlidingCache(W), GlobalCache()
    for c, window in ((s, W), (g, None)):
        _write(c, 3)
        for t in range(3, 40):  # wraps the ring several times
            assert _write(c, 1, how) == _expected(t, 1, window)
        assert _write(c, 5) == _expected(40, 5, window)


def test_a_step_of_several_tokens_sees_each_window_as_the_ring_wraps_and_rewinds():
    """The compiled verify's write: L tokens at once into a ring (wrapping past its end) or a growing buffer, each
    query seeing its own window only, also right after rewinds."""
    s, g = SlidingCache(W, max_rewind=4), GlobalCache()
    assert not s.fits_step(1) and not g.fits_step(1)   # no buffers before the first write
    for c, window in ((s, W), (g, None)):
        _write(c, 3)
        t = 3
        while t < GlobalCache.step + 20:   # the ring wraps many times; the full buffer grows once
            L = 2 + t % 3
            assert _write(c, L, "step") == _expected(t, L, window)
            back = t % L   # tokens the verify rejects
            c.rewind(back)
            t += L - back
    assert s.fits_step(4) and not s.fits_step(5)   # at most max_rewind tokens: more would overwrite what is read
    assert g.fits_step(GlobalCache.step + 1)


def test_a_compiled_reader_sees_the_positions_recent_gives_as_the_ring_wraps_and_rewinds():
    """A drafter's read: ``read_mask`` over the whole buffers at a traced position keeps exactly the positions
    ``recent(n)`` cuts out, for a ring that wraps and rewinds (it holds at least W after any rewind here) and a
    buffer that grows."""
    for make, n in ((lambda: SlidingCache(W, max_rewind=4), 5), (lambda: SlidingCache(W, max_rewind=4), W),
                    (GlobalCache, None)):
        c = make()
        _write(c, 3)
        t = 3
        while t < GlobalCache.step + 20:
            L = 2 + t % 3
            _write(c, L, "step")
            c.rewind(t % L)
            t += L - t % L
            want = min(n or t, t)
            keys, values = c.read_buffers(want)
            mask = c.read_mask(keys.shape[2], mx.array(t, dtype=mx.int32), want)
            seen = _visible(keys, values, mask, 1)[0]
            assert seen == sorted(np.array(c.recent(want)[0][0, 0, :, 0]).tolist()) == list(range(t - want, t))
    with pytest.raises(CacheError, match="max_rewind"):
        SlidingCache(W, max_rewind=4).read_buffers(1)


@pytest.mark.parametrize("bad", [0, -1, "8", 8.0, True, None])
def test_a_bad_max_rewind_is_a_cache_error(bad):
    """make_cache(max_rewind="8") was a TypeError ('<' between str and int)."""
    with pytest.raises(CacheError, match="max_rewind must be a whole number"):
        SlidingCache(W, max_rewind=bad)
    assert SlidingCache(W, max_rewind=np.int64(3)).slots == W - 1 + 3


def test_sliding_buffer_stays_fixed_however_long_the_prompt():
    sizes = []
    for total in (10, 100, 1000):
        c = SlidingCache(W, max_rewind=4)
        for s in range(0, total, 37):  # chunked prefill
            assert _write(c, min(37, total - s)) == _expected(s, min(37, total - s), W)
        for _ in range(5):
            _write(c, 1, "step")
        sizes.append(c.nbytes)
    assert sizes[1] == sizes[2] == 2 * (1 * 2 * (W - 1 + 4) * 4 * 4)


def test_global_cache_grows_in_steps():
    c = GlobalCache()
    _write(c, 3)
    assert c.state[0].shape[2] == GlobalCache.step
    _write(c, GlobalCache.step)
    assert c.state[0].shape[2] == 2 * GlobalCache.step
    c.hand_over()  # the compiled step gets room for one more token, and the cache lets go of its buffers
    assert c.empty


def _same_as_written_directly(c, kept, make):
    """``c`` behaves exactly as a fresh cache that was given only the ``kept`` tokens."""
    ref = make()
    for s in range(0, kept, 5):
        _write(ref, min(5, kept - s))
    assert c.offset == ref.offset == kept
    for how, L in (("plain", 1), ("step", 1), ("plain", 3)):
        a = snapshot([c, ref])
        assert _write(c, L, how) == _write(ref, L, how)
        restore([c, ref], a)


@pytest.mark.parametrize("max_rewind", [1, 3, 8])
@pytest.mark.parametrize("seed", range(6))
def test_rewind_equals_writing_only_the_kept_tokens(seed, max_rewind):
    rng = random.Random(seed)
    for make in (lambda: SlidingCache(W, max_rewind), GlobalCache):
        c = make()
        for _ in range(60):
            if rng.random() < 0.35 and c.rewindable:
                n = rng.randint(1, c.rewindable)
                c.rewind(n)
                _same_as_written_directly(c, c.offset, make)
            else:
                L = rng.choice([1, 1, 1, 2, 3, 5, 13])
                _write(c, L, rng.choice(["plain", "step"]) if L == 1 else "plain")
        _same_as_written_directly(c, c.offset, make)


def test_sliding_ring_rewinds_max_rewind_after_any_write_and_no_more():
    c = SlidingCache(W, max_rewind=3)
    _write(c, 5)
    assert c.rewindable == 5  # before the ring wraps, everything
    for t in range(5, 30):
        _write(c, 1, "step")
    assert c.rewindable == 3
    c.rewind(2)
    assert c.rewindable == 1
    with pytest.raises(CacheError, match="at most 1"):
        c.rewind(2)
    for bad in (-1, 1.5, True):   # (-1 was "Cannot rewind -1 tokens: ... at most 1")
        with pytest.raises(CacheError, match="a whole number >= 0"):
            c.rewind(bad)
    assert c.offset == 28
    _write(c, 4)
    assert c.rewindable == 3


def test_rewind_of_a_cache_list_is_all_or_nothing():
    caches = [GlobalCache(), SlidingCache(W, max_rewind=2)]
    for c in caches:
        _write(c, 20)
    with pytest.raises(CacheError):
        rewind(caches, 3)
    assert [c.offset for c in caches] == [20, 20]
    rewind(caches, 2)
    assert [c.offset for c in caches] == [18, 18]


def test_snapshot_restore_rewinds_exactly():
    caches = [SlidingCache(W), GlobalCache()]
    for c in caches:
        _write(c, 12)
    snap = snapshot(caches)
    before = [_write(c, 1) for c in caches]
    for t in range(13, 40):  # wrap the ring well past the snapshot
        for c in caches:
            _write(c, 1, "step")
    restore(caches, snap)
    assert [c.offset for c in caches] == [12, 12]
    assert [_write(c, 1) for c in caches] == before


def test_rewind_to_rewinds_where_it_can_else_restores_the_newest_snapshot_not_past_the_target():
    caches = [SlidingCache(W, max_rewind=3), GlobalCache()]
    snaps = []
    for n in (10, 20, 30):
        for c in caches:
            _write(c, 10)
        snaps.append(Snapshot(n, snapshot(caches), end=f"end {n}"))
    assert rewind_to(caches, snaps, 30, 30) == 30 and len(snaps) == 3       # nothing to take back
    assert rewind_to(caches, snaps, 30, 28) == 28 and [s.n for s in snaps] == [10, 20]   # the ring can: rewound
    assert rewind_to(caches, snaps, 28, 25) == 20   # the ring cannot take 3 more back: the snapshot at 20
    assert [c.offset for c in caches] == [20, 20] and [s.end for s in snaps] == ["end 10", "end 20"]
    assert [_write(c, 1) for c in caches] == [[list(range(13, 21))], [list(range(21))]]   # restored exactly
    assert rewind_to(caches, snaps, 21, 5) == 0 and snaps == []   # no snapshot early enough: start afresh
