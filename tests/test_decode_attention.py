"""mlx_gemma4/decode_attention.py. Its kernels' sources (``_PARTS`` and ``_JOIN``) run on the host: each block's
threads as threads, the CUDA built-ins they use written in C++ (a warp shuffle is a barrier-synchronised exchange
among a warp's lanes, ``__syncthreads`` a barrier of the block, ``__shared__`` storage one per block as the blocks
run one after another), so their arithmetic, masks, slices and tails are checked against NumPy before a GPU runs
them: bfloat16 and float32, one query and a verify's few, groups of query heads per key/value head, slices of keys
that the mask hides entirely, both output layouts. Then what takes them (``fits``) and how a layer reads them."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_gemma4 import decode_attention
from tests import host_cuda

HARNESS = r"""
#define __shared__ static
typedef @TYPE@ T;
constexpr int D = @D@, L = @L@, REP = @REP@, W = @W@;
constexpr bool MASKED = @MASKED@, HEADS_LAST = @HEADS_LAST@;
static thread_local dim3 threadIdx, blockIdx;
static dim3 gridDim;
static float slots[W][32];
static std::barrier<>* warp_barriers[W];
static std::barrier<>* block_barrier;
inline float __shfl_xor_sync(unsigned, float v, int off) {
    const int w = threadIdx.y;
    slots[w][threadIdx.x] = v;
    warp_barriers[w]->arrive_and_wait();
    const float r = slots[w][threadIdx.x ^ off];
    warp_barriers[w]->arrive_and_wait();
    return r;
}
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
static int k_shape[4], part_m_shape[2];
void parts(const T* q, const T* k, const T* v, const bool* mask, float* part_o, float* part_m, float* part_sum) {
@PARTS@
}
void join(const float* part_o, const float* part_m, const float* part_sum, T* out) {
@JOIN@
}
template <typename U> std::vector<U> read(const char* path, size_t n) {
    std::vector<U> v(n);
    FILE* f = std::fopen(path, "rb");
    if (n && (!f || std::fread(v.data(), sizeof(U), n, f) != n)) { std::perror(path); std::exit(2); }
    if (f) std::fclose(f);
    return v;
}
template <typename F> void launch(dim3 grid, int warps, F body) {
    gridDim = grid;
    for (int bz = 0; bz < grid.z; ++bz)
        for (int by = 0; by < grid.y; ++by) {
            std::barrier<> block(32 * warps);
            block_barrier = &block;
            std::vector<std::barrier<>*> bars;
            for (int w = 0; w < warps; ++w) warp_barriers[w] = new std::barrier<>(32);
            std::vector<std::thread> threads;
            for (int w = 0; w < warps; ++w)
                for (int lane = 0; lane < 32; ++lane)
                    threads.emplace_back([&, lane, w, by, bz] {
                        threadIdx = {lane, w, 0};
                        blockIdx = {0, by, bz};
                        body();
                    });
            for (auto& t : threads) t.join();
            for (int w = 0; w < warps; ++w) delete warp_barriers[w];
        }
}
int main(int argc, char** argv) {
    const int H = std::atoi(argv[1]), N = std::atoi(argv[2]), S = std::atoi(argv[3]);
    const int Hkv = H / REP;
    k_shape[0] = 1; k_shape[1] = Hkv; k_shape[2] = N; k_shape[3] = D;
    part_m_shape[0] = H * L; part_m_shape[1] = S;
    auto q = read<T>("q.bin", (size_t)H * L * D);
    auto k = read<T>("k.bin", (size_t)Hkv * N * D);
    auto v = read<T>("v.bin", (size_t)Hkv * N * D);
    auto m8 = read<uint8_t>("mask.bin", MASKED ? (size_t)L * N : 0);
    std::vector<char> mask_bytes(m8.begin(), m8.end());
    mask_bytes.push_back(0);
    const bool* mask = reinterpret_cast<const bool*>(mask_bytes.data());
    std::vector<float> po((size_t)H * L * S * D, NAN), pm((size_t)H * L * S, NAN), ps((size_t)H * L * S, NAN);
    launch({1, S, H * L}, W, [&] { parts(q.data(), k.data(), v.data(), mask, po.data(), pm.data(), ps.data()); });
    std::vector<T> out((size_t)H * L * D, T(NAN));
    launch({1, H * L, 1}, 1, [&] { join(po.data(), pm.data(), ps.data(), out.data()); });
    std::vector<float> o(out.begin(), out.end());
    FILE* f = std::fopen("out.bin", "wb");
    std::fwrite(o.data(), sizeof(float), o.size(), f);
    std::fclose(f);
}
"""


def _run(tmp_path, dtype: str, H: int, Hkv: int, L: int, D: int, N: int, mask: np.ndarray | None,
         heads_last: bool) -> None:
    rng = np.random.default_rng(H * 100 + L * 10 + D + N)
    q = rng.normal(size=(H, L, D)).astype(np.float32) * 0.15
    k = rng.normal(size=(Hkv, N, D)).astype(np.float32) * 0.15
    v = rng.normal(size=(Hkv, N, D)).astype(np.float32)
    if dtype == "bf16":   # what the kernels see: the inputs rounded to bfloat16
        q, k, v = (host_cuda.from_bf16(host_cuda.bf16(a)) for a in (q, k, v))
    as_type = host_cuda.bf16 if dtype == "bf16" else (lambda a: a.astype(np.float32))
    for name, a in (("q", q), ("k", k), ("v", v)):
        as_type(a).tofile(tmp_path / f"{name}.bin")
    if mask is not None:
        mask.astype(np.uint8).tofile(tmp_path / "mask.bin")
    S = decode_attention.slices(N)
    code = HARNESS
    for name, value in (("PARTS", decode_attention._PARTS), ("JOIN", decode_attention._JOIN),
                        ("TYPE", "bf16" if dtype == "bf16" else "float"), ("D", D), ("L", L), ("REP", H // Hkv),
                        ("W", decode_attention.WARPS), ("MASKED", str(mask is not None).lower()),
                        ("HEADS_LAST", str(heads_last).lower())):
        code = code.replace(f"@{name}@", str(value))
    out = host_cuda.run(tmp_path, code, H, N, S)
    out = out.reshape(L, H, D).transpose(1, 0, 2) if heads_last else out.reshape(H, L, D)

    kk = np.repeat(k, H // Hkv, axis=0).astype(np.float64)                       # (H, N, D)
    vv = np.repeat(v, H // Hkv, axis=0).astype(np.float64)
    scores = q.astype(np.float64) @ kk.transpose(0, 2, 1)                          # (H, L, N)
    if mask is not None:
        scores = np.where(mask.reshape(1, L, N), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ vv
    tol = 2.0 ** -8 * np.abs(ref).max() if dtype == "bf16" else 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


def _ring(L: int, N: int, visible: int, seed: int) -> np.ndarray:
    """A mask with ``visible`` keys per query at scattered places (a ring's slots), each query seeing one more."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(N)
    mask = np.zeros((L, N), dtype=bool)
    for i in range(L):
        mask[i, order[: visible + i]] = True
    return mask


@pytest.mark.skipif(host_cuda.CXX is None, reason="needs a C++20 compiler (g++ or clang++) to build the host replay")
@pytest.mark.parametrize(("dtype", "H", "Hkv", "L", "D", "N", "mask", "heads_last"), [
    ("bf16", 8, 2, 1, 256, 1059, "ring", True),   # E4B's sliding layer at one query: 17 slices of keys, the last short
    ("bf16", 4, 1, 5, 512, 300, "causal", True),  # a verify of 4 drafts on a full layer's 512-wide heads
    ("bf16", 3, 1, 4, 256, 90, "causal", False),  # the (1, H, L, D) layout
    ("bf16", 2, 2, 1, 256, 200, "first", True),   # only the first 30 keys visible: whole slices hidden
    ("float", 2, 1, 3, 64, 70, None, False),      # float32, no mask
    ("bf16", 2, 1, 2, 256, 700, "few slices", True),   # more keys than MAX_SLICES slices of 64 (here 3)
])
def test_kernel_sources_match_numpy_on_the_host(tmp_path, monkeypatch, dtype, H, Hkv, L, D, N, mask, heads_last):
    if mask == "ring":
        mask = _ring(L, N, 900, N)
    elif mask == "causal":   # the queries are the last L positions
        mask = np.arange(N)[None, :] <= (N - L + np.arange(L))[:, None]
    elif mask == "few slices":
        monkeypatch.setattr(decode_attention, "MAX_SLICES", 3)
        mask = np.arange(N)[None, :] <= (N - L + np.arange(L))[:, None]
    elif mask == "first":
        mask = np.zeros((L, N), dtype=bool)
        mask[:, :30] = True
    _run(tmp_path, dtype, H, Hkv, L, D, N, mask, heads_last)


def test_fits_takes_decode_shapes_only_on_cuda(monkeypatch):
    import mlx.core as mx

    q, kv = mx.zeros((1, 8, 1, 256), mx.bfloat16), mx.zeros((1, 2, 64, 256), mx.bfloat16)
    # This machine's MLX has no CUDA device: nothing is taken, whatever the shapes.
    assert not decode_attention.fits(q, kv, kv, None)
    monkeypatch.setattr(decode_attention, "on_cuda", lambda: True)
    ring = mx.ones((64,), mx.bool_)
    assert decode_attention.fits(q, kv, kv, None) and decode_attention.fits(q, kv, kv, ring)
    q5 = mx.zeros((1, 8, 5, 256), mx.bfloat16)
    assert decode_attention.fits(q5, kv, kv, mx.ones((5, 64), mx.bool_))
    refused = [
        (mx.zeros((1, 8, 9, 256), mx.bfloat16), kv, None),                     # more queries than a verify's
        (mx.zeros((2, 8, 1, 256), mx.bfloat16), mx.zeros((2, 2, 64, 256), mx.bfloat16), None),   # a batch
        (mx.zeros((1, 8, 1, 48), mx.bfloat16), mx.zeros((1, 2, 64, 48), mx.bfloat16), None),     # head not /32
        (mx.zeros((1, 8, 1, 1024), mx.bfloat16), mx.zeros((1, 2, 64, 1024), mx.bfloat16), None),  # too wide
        (mx.zeros((1, 6, 1, 256), mx.bfloat16), mx.zeros((1, 4, 64, 256), mx.bfloat16), None),   # uneven groups
        (q, kv.astype(mx.float16), None),                                         # mixed dtypes
        (q, kv, mx.zeros((64,), mx.bfloat16)),                                   # an additive mask
        (q, kv, "causal"),
        (q5, kv, ring),                                                          # one mask row for 5 queries
    ]
    for qq, kk, mask in refused:
        assert not decode_attention.fits(qq, kk, kk, mask), (qq.shape, kk.shape, mask)
    monkeypatch.setattr(decode_attention, "ENABLED", False)
    assert not decode_attention.fits(q, kv, kv, None)


def test_a_layer_reads_the_kernels_output_layout(monkeypatch):
    """Where the kernels take a layer's attention (stood in for here by the same math laid out as they lay it out:
    (1, L, H * D)), the layer's output is what it is without them."""
    import mlx.core as mx

    from mlx_gemma4 import text
    from mlx_gemma4.config import TextConfig
    from tests.random_checkpoint import SMALL_TEXT

    cfg = TextConfig.from_dict(dict(SMALL_TEXT, vocab_size=64, vocab_size_per_layer_input=64))
    layer = text.Attention(cfg, 0)
    mx.eval(layer.parameters())
    x = mx.random.normal((1, 3, cfg.hidden_size))
    mask = mx.ones((3, 3), mx.bool_)
    expected, _ = layer(x, 0, mask)
    calls = []

    def attend(q, k, v, m, heads_last=False):
        calls.append(heads_last)
        out = text._attention(q, k, v, m)
        return out.transpose(0, 2, 1, 3).reshape(1, q.shape[2], -1) if heads_last else out

    monkeypatch.setattr(decode_attention, "fits", lambda *a: True)
    monkeypatch.setattr(decode_attention, "attend", attend)
    got, _ = layer(x, 0, mask)
    assert calls == [True]
    assert mx.allclose(got, expected, atol=1e-6).item()
