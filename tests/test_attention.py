"""text.attention: where MLX has no fused kernel it writes the fallback's math out; the numbers must be the
fallback's, for every mask the caches hand out and for grouped heads."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_gemma4.cache import window_mask
from mlx_gemma4.text import attention


def _qkv(H, Hkv, L, N, D, dtype, seed=0):
    mx.random.seed(seed)
    q, k, v = (mx.random.normal(s).astype(dtype) for s in ((1, H, L, D), (1, Hkv, N, D), (1, Hkv, N, D)))
    return q, k, v


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("H,Hkv,L,N", [(8, 2, 1, 37), (8, 2, 5, 40), (4, 4, 12, 12), (6, 1, 9, 30), (2, 1, 1, 1)])
@pytest.mark.parametrize("mask_kind", [None, "causal", "window", "one row"])
def test_written_out_attention_is_the_fallbacks_math(dtype, H, Hkv, L, N, mask_kind):
    D = 256  # a head size without a fused kernel on the CPU backend: mx.fast runs its fallback
    q, k, v = _qkv(H, Hkv, L, N, D, dtype)
    if mask_kind == "causal" and L > N:
        pytest.skip("a causal mask needs the queries among the keys")
    mask = {None: None, "causal": "causal",
            "window": window_mask(L, N - L, N - L, 7),
            "one row": mx.arange(N) <= N - 3}[mask_kind]
    with mx.stream(mx.cpu):
        ours = attention(q, k, v, mask)
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    assert ours.shape == ref.shape == (1, H, L, D) and ours.dtype == ref.dtype
    assert mx.array_equal(ours, ref).item()


def test_a_fully_masked_row_averages_like_the_fallback():
    q, k, v = _qkv(4, 2, 3, 6, 256, mx.float32)
    mask = mx.array([[False] * 6, [True] * 6, [True, False] * 3])
    assert mx.array_equal(attention(q, k, v, mask),
                          mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)).item()
