"""The tensor-core kernel's index arithmetic (mlx_gemma4/few_rows.py, ``_MMA_SOURCE``), replayed in NumPy.

The kernel itself runs only on CUDA. What can go wrong without a GPU is the bookkeeping: which nibbles each lane
unpacks into its A fragment, which inputs it puts in its B fragment, and the k order both must share within an
``mma.sync.m16n8k16`` (PTX's fragment layouts: A a0..a7 at rows g, g+8 and columns 2t, 2t+1 (+8); B b0..b3 at rows
2t, 2t+1 (+8) and column g; D at rows g, g+8 and columns 2t, 2t+1). This replays the kernel's per-lane steps for a
whole warp and group, line by line, with the multiply done as the instruction defines it, against a plain matmul.
"""

import numpy as np
import pytest


def pack(q: np.ndarray) -> np.ndarray:
    """MLX's 4-bit layout: eight values per uint32, lowest bits first."""
    q = q.astype(np.uint32).reshape(q.shape[0], -1, 8)
    return sum(q[..., i] << np.uint32(4 * i) for i in range(8)).astype(np.uint32)


def pair(u: int) -> tuple[float, float]:
    """gemma4_pair: the low byte's two nibbles, as the bfloat16 pair (128 + q) - 128."""
    v = (u & 0xF) | ((u & 0xF0) << 12) | 0x43004300
    lo, hi = v & 0xFFFF, v >> 16
    as_float = lambda h: np.frombuffer(np.uint32(h << 16).tobytes(), dtype=np.float32)[0]   # noqa: E731
    return as_float(lo) - 128.0, as_float(hi) - 128.0


def mma(frags_a, frags_b) -> np.ndarray:
    """mma.sync m16n8k16 as PTX defines it: gather A (16x16) and B (16x8) from the lanes' fragments."""
    a, b = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        (a0, a1, a2, a3), (b0, b1) = frags_a[lane], frags_b[lane]
        for i in range(2):
            a[g, 2 * t + i], a[g + 8, 2 * t + i] = a0[i], a1[i]
            a[g, 2 * t + 8 + i], a[g + 8, 2 * t + 8 + i] = a2[i], a3[i]
            b[2 * t + i, g], b[2 * t + 8 + i, g] = b0[i], b1[i]
    return a @ b


@pytest.mark.parametrize("m", range(1, 9))
def test_the_mma_kernels_fragments_give_the_matmul(m):
    rng = np.random.default_rng(m)
    n, k, groups = 16, 128, 2
    q = rng.integers(0, 16, (n, k))
    scales, biases = rng.normal(size=(n, groups)), rng.normal(size=(n, groups))
    x = rng.normal(size=(m, k))
    w = pack(q)
    ones = (1.0, 1.0)
    acc = np.zeros((32, 4))
    for grp in range(groups):
        d, e = np.zeros((16, 8)), np.zeros((16, 8))
        frags = []
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            base = grp * 64 + 16 * t
            ua2 = [int(w[g, base // 8]), int(w[g, base // 8 + 1])]
            ub2 = [int(w[g + 8, base // 8]), int(w[g + 8, base // 8 + 1])]
            xs = x[g, base:base + 16] if g < m else np.zeros(16)
            xw = [(xs[2 * i], xs[2 * i + 1]) for i in range(8)]
            frags.append((ua2, ub2, xw))
        for j in range(4):
            sh = (j & 1) * 16
            fa, fb, fo = [], [], []
            for ua2, ub2, xw in frags:
                ua, ub = ua2[j >> 1] >> sh, ub2[j >> 1] >> sh
                fa.append((pair(ua), pair(ub), pair(ua >> 8), pair(ub >> 8)))
                fb.append((xw[2 * j], xw[2 * j + 1]))
                fo.append((ones, ones, ones, ones))
            d += mma(fa, fb)
            e += mma(fo, fb)
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for i, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
                acc[lane, i] += scales[row, grp] * d[row, col] + biases[row, grp] * e[row, col]
    out = np.zeros((m, n))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            if col < m:
                out[col, row] = acc[lane, i]
    dense = scales.repeat(64, axis=1) * q + biases.repeat(64, axis=1)
    assert np.allclose(out, x @ dense.T, atol=1e-9)


def test_the_mma_kernel_source_matches_this_replay():
    """The replay above follows the source: the same shifts, masks and fragment order."""
    from mlx_gemma4 import few_rows

    src = few_rows._MMA_SOURCE + few_rows._MMA_HEADER
    for piece in ("(u & 0xFu) | ((u & 0xF0u) << 12) | 0x43004300u", "const int sh = (j & 1) * 16;",
                  "const uint32_t ua = ua2[j >> 1] >> sh, ub = ub2[j >> 1] >> sh;",
                  "gemma4_pair(ua), gemma4_pair(ub), gemma4_pair(ua >> 8), gemma4_pair(ub >> 8)",
                  "xw[2 * j], xw[2 * j + 1]", "const int base = grp * G + 16 * t;",
                  "wa + base / 8", "xr + base", "xr + base + 8"):
        assert piece in src, piece
