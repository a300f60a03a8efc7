"""Attention of a few queries (a decode step, a speculative verify) on MLX's CUDA backend, in two kernels.

MLX 0.32's CUDA attention has a fused kernel for few queries only at head sizes 64, 96 and 128 and without a mask
array; Gemma 4's heads are 256 (sliding layers) and 512 wide (full ones), and its compiled decode step masks the
cache buffers' unused slots, so each layer's attention there runs MLX's fallback: a matmul for the scores, a
select for the mask, a softmax, a matmul with the values, and the views between them, ~11 graph nodes that the
host dispatches one by one (a decode step of E4B is bound by that dispatch: 1,830 nodes, 6.2 ms of host time a
step on an H100's host). Here the same softmax(q k^T, masked) v is two nodes, split over the keys as
flash-decoding does:

- ``_PARTS``: one block of ``WARPS`` warps per (query head, query row, slice of the keys); each warp takes every
  ``WARPS``-th key of the slice, a lane ``D / 32`` of each head's values: the score (a warp sum), then the running
  softmax (max, sum of exponentials, weighted sum of the values) in float32; the warps' running sums are then
  joined, and each block writes its slice's max, sum and weighted values.
- ``_JOIN``: one warp per (query head, query row) joins the slices' sums and writes the output.

Scale 1 (Gemma 4's q/k norms replace 1/sqrt(d)), everything in float32 from the inputs' values, rounded once at
the end: within rounding of MLX's fallback (which rounds the scores and the probabilities to the input dtype).
``fits`` says what it takes; tests/test_decode_attention.py runs both kernels on the host against NumPy.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

from .projection import on_cuda


def _setting(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"MLX_GEMMA4_DECODE_ATTENTION={value!r}: expected 1 (the kernels, the default) or 0 "
                         "(MLX's own)")
    return value == "1"


ENABLED = _setting(os.environ.get("MLX_GEMMA4_DECODE_ATTENTION", "1"))   # read when a step is traced
MAX_QUERIES = 8        # a verify of up to 7 drafts; more queries go to MLX (prefill)
WARPS = 4              # warps per block of _PARTS
KEYS_PER_SLICE = 64    # about how many keys one block of _PARTS takes ...
MAX_SLICES = 256       # ... up to this many slices (partial sums <= 0.5 MB per query head and row at 512 wide)

_PARTS = r"""
    constexpr int PER = D / 32;
    const int lane = threadIdx.x, warp = threadIdx.y;
    const int s = blockIdx.y, row = blockIdx.z;             // row = head * L + query
    const int S = gridDim.y;
    const int h = row / L, l = row % L, hk = h / REP;
    const int N = k_shape[2];
    const int per = (N + S - 1) / S;
    const int j0 = s * per, j1 = min(N, j0 + per);
    float qv[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) qv[i] = static_cast<float>(q[(size_t)row * D + lane * PER + i]);
    const T* kb = k + (size_t)hk * N * D + lane * PER;
    const T* vb = v + (size_t)hk * N * D + lane * PER;
    float m = -INFINITY, sum = 0.f, acc[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) acc[i] = 0.f;
    for (int j = j0 + warp; j < j1; j += W) {
        if (MASKED && !mask[(size_t)l * N + j]) continue;   // the same j for the whole warp
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < PER; ++i) dot += qv[i] * static_cast<float>(kb[(size_t)j * D + i]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const float top = fmaxf(m, dot);
        const float fade = expf(m - top), p = expf(dot - top);
        sum = sum * fade + p;
#pragma unroll
        for (int i = 0; i < PER; ++i) acc[i] = acc[i] * fade + p * static_cast<float>(vb[(size_t)j * D + i]);
        m = top;
    }
    __shared__ float warp_m[W], warp_sum[W];
    __shared__ float warp_acc[W][D];
    if (lane == 0) { warp_m[warp] = m; warp_sum[warp] = sum; }
#pragma unroll
    for (int i = 0; i < PER; ++i) warp_acc[warp][lane * PER + i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float top = -INFINITY;
        for (int w = 0; w < W; ++w) top = fmaxf(top, warp_m[w]);
        float total = 0.f, o[PER];
#pragma unroll
        for (int i = 0; i < PER; ++i) o[i] = 0.f;
        for (int w = 0; w < W; ++w) {
            if (warp_m[w] == -INFINITY) continue;              // no visible key in that warp's share
            const float c = expf(warp_m[w] - top);
            total += c * warp_sum[w];
#pragma unroll
            for (int i = 0; i < PER; ++i) o[i] += c * warp_acc[w][lane * PER + i];
        }
        const size_t at = (size_t)row * S + s;
#pragma unroll
        for (int i = 0; i < PER; ++i) part_o[at * D + lane * PER + i] = o[i];
        if (lane == 0) { part_m[at] = top; part_sum[at] = total; }
    }
"""

_JOIN = r"""
    constexpr int PER = D / 32;
    const int lane = threadIdx.x, row = blockIdx.y;
    const int S = part_m_shape[1];
    float top = -INFINITY;
    for (int s = 0; s < S; ++s) top = fmaxf(top, part_m[(size_t)row * S + s]);
    float total = 0.f, o[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) o[i] = 0.f;
    for (int s = 0; s < S; ++s) {
        const size_t at = (size_t)row * S + s;
        if (part_m[at] == -INFINITY) continue;                // no visible key in that slice
        const float c = expf(part_m[at] - top);
        total += c * part_sum[at];
#pragma unroll
        for (int i = 0; i < PER; ++i) o[i] += c * part_o[at * D + lane * PER + i];
    }
    // row = head * L + query; with HEADS_LAST the output is (1, L, H * D): (query * H + head) * D
    const int H = gridDim.y / L;
    const size_t to = HEADS_LAST ? ((size_t)(row % L) * H + row / L) * D : (size_t)row * D;
#pragma unroll
    for (int i = 0; i < PER; ++i) out[to + lane * PER + i] = static_cast<T>(o[i] / total);
"""

@functools.cache
def _kernel(name: str):
    """The kernel ``name`` ("parts" or "join"), made on first use."""
    if name == "parts":
        return mx.fast.cuda_kernel(name="gemma4_decode_attention_parts", input_names=["q", "k", "v", "mask"],
                                   output_names=["part_o", "part_m", "part_sum"], source=_PARTS)
    return mx.fast.cuda_kernel(name="gemma4_decode_attention_join", input_names=["part_o", "part_m", "part_sum"],
                               output_names=["out"], source=_JOIN)


@functools.cache
def _no_mask() -> mx.array:
    """One made-once boolean array to stand in the mask's place when there is none (a constant: no graph node)."""
    blank = mx.zeros((1,), mx.bool_)
    mx.eval(blank)
    return blank


def fits(q: mx.array, k: mx.array, v: mx.array, mask) -> bool:
    """Whether ``attend`` takes this attention: on CUDA, a batch of one, 1 to ``MAX_QUERIES`` queries, equal
    query, key and value head sizes divisible by 32 up to 512, whole groups of query heads per key/value head,
    floating inputs of one dtype, and no mask or a boolean one with a row per query (or one row for a single
    query) over the keys."""
    if not (ENABLED and on_cuda()) or q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        return False
    B, H, L, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if not (B == 1 and k.shape[0] == 1 and 1 <= L <= MAX_QUERIES and D % 32 == 0 and D <= 512
            and k.shape[3] == D and Hkv >= 1 and H % Hkv == 0 and N >= 1
            and q.dtype == k.dtype == v.dtype and q.dtype in (mx.bfloat16, mx.float16, mx.float32)):
        return False
    if mask is None:
        return True
    return (isinstance(mask, mx.array) and mask.dtype == mx.bool_ and mask.size == L * N
            and mask.shape[-1] == N and (mask.ndim == 1 or mask.shape[-2] == L))


def slices(n: int) -> int:
    """How many slices of the keys ``_PARTS`` splits ``n`` keys into."""
    return max(1, min(MAX_SLICES, -(-n // KEYS_PER_SLICE)))


def attend(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, heads_last: bool = False) -> mx.array:
    """softmax(q k^T, masked) v for q (1, H, L, D) and k, v (1, Hkv, N, D) with scale 1, in the form ``fits``
    takes; (1, H, L, D) in q's dtype, or with ``heads_last`` (1, L, H * D) (what an output projection reads)."""
    _, H, L, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    S = slices(N)
    masked = mask is not None
    if not masked:   # the kernel does not read it, but takes an input there
        mask = _no_mask()
    part_o, part_m, part_sum = _kernel("parts")(
        inputs=[q, k, v, mask],
        template=[("T", q.dtype), ("D", D), ("L", L), ("REP", H // Hkv), ("W", WARPS), ("MASKED", masked)],
        grid=(32, WARPS * S, H * L), threadgroup=(32, WARPS, 1),
        output_shapes=[(H * L, S, D), (H * L, S), (H * L, S)],
        output_dtypes=[mx.float32, mx.float32, mx.float32])
    shape = (1, L, H * D) if heads_last else (1, H, L, D)
    return _kernel("join")(
        inputs=[part_o, part_m, part_sum], template=[("T", q.dtype), ("D", D), ("L", L), ("HEADS_LAST", heads_last)],
        grid=(32, H * L, 1), threadgroup=(32, 1, 1), output_shapes=[shape], output_dtypes=[q.dtype])[0]
