from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_gemma4.cache import GlobalCache, SlidingCache, make_cache, restore, snapshot
from mlx_gemma4.config import TextConfig
from tests.test_config import E4B_TEXT


def test_e4b_cache_has_buffers_for_producers_only():
    cfg = TextConfig.from_dict(E4B_TEXT)
    cache = make_cache(cfg)
    assert len(cache) == 24  # 42 layers, the last 18 share K/V and own nothing
    assert sum(isinstance(c, SlidingCache) for c in cache) == 20
    assert sum(isinstance(c, GlobalCache) for c in cache) == 4


def _kv(L, H=2, D=4, start=0):
    pos = mx.arange(start, start + L, dtype=mx.float32)
    k = mx.broadcast_to(pos[None, None, :, None], (1, H, L, D))
    return k, k + 0.5


def test_sliding_buffer_stays_fixed_however_long_the_prompt():
    W = 16
    sizes = []
    for total in (10, 100, 1000):
        c = SlidingCache(W)
        for s in range(0, total, 37):  # chunked prefill
            n = min(37, total - s)
            c.update_and_fetch(*_kv(n, start=s))
        for t in range(total, total + 5):  # then decode
            c.update_and_fetch(*_kv(1, start=t))
        mx.eval(c.keys)
        sizes.append(c.nbytes)
        # The ring holds exactly the last W positions, position p in slot p % W.
        keys = np.array(c.keys[0, 0, :, 0])
        end = total + 5
        expect = {p % W: p for p in range(max(0, end - W), end)}
        for slot, p in expect.items():
            assert keys[slot] == p
    assert sizes[1] == sizes[2] == 2 * (1 * 2 * W * 4 * 4)


def test_sliding_prefill_returns_previous_window_minus_one_in_order():
    W = 8
    c = SlidingCache(W)
    c.update_and_fetch(*_kv(20))
    k, _ = c.update_and_fetch(*_kv(5, start=20))
    assert np.array(k[0, 0, :, 0]).tolist() == list(range(13, 25))


def test_global_cache_grows_in_steps():
    c = GlobalCache()
    c.update_and_fetch(*_kv(3))
    assert c.keys.shape[2] == GlobalCache.step
    k, _ = c.update_and_fetch(*_kv(GlobalCache.step, start=3))
    assert k.shape[2] == GlobalCache.step + 3 and c.keys.shape[2] == 2 * GlobalCache.step


def test_snapshot_restore_rewinds_exactly():
    W = 8
    caches = [SlidingCache(W), GlobalCache()]
    for c in caches:
        c.update_and_fetch(*_kv(12))
    snap = snapshot(caches)
    before = [np.array(c.update_and_fetch(*_kv(1, start=12))[0]) for c in caches]
    for t in range(13, 30):  # wrap the ring well past the snapshot
        for c in caches:
            c.update_and_fetch(*_kv(1, start=t) if True else None)
    restore(caches, snap)
    assert [c.offset for c in caches] == [12, 12]
    after = [np.array(c.update_and_fetch(*_kv(1, start=12))[0]) for c in caches]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
