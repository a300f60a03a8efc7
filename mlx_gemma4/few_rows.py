"""A 4-bit matmul of a few rows on MLX's CUDA backend that reads each weight once for all of them.

Decoding multiplies one row (a speculative verify: k + 1 rows) by every quantized weight, so a decode step is
bound by how fast those weights stream from memory. MLX 0.32's CUDA backend runs such a matmul with ``qmv``: a warp
per output row, bfloat16 partial sums, and one whole pass over the weight per input row (a verify of 5 tokens reads
each weight 5 times). This kernel gives each warp ``R`` output rows; each lane takes 32 weights (one 16-byte load)
at a time, unpacks them exactly to float (``2**23 + q`` built from the bits, minus ``2**23``), and multiplies them
with every input row, accumulating in float32 as ``scale * sum(x * q) + bias * sum(x)`` per group; a warp's lanes
then reduce. Each output row's arithmetic does not depend on how many input rows come with it, so a verify's row
is computed exactly as the same token's decode step computes it.

Only bfloat16 inputs and 4-bit affine weights in groups of 64 (what has run on a device; the source is written for
float16 / float32 and groups of 32 / 128 too) with an input width divisible by 32 take it, on 1 to ``MAX_ROWS``
rows; ``fits`` says which, ``faster`` where it beats MLX's own. Compiled by MLX (NVRTC) once per row count and
input width, and cached on disk by MLX. Reference for the format: ``mx.quantize`` (affine: ``w = scale * q +
bias`` per group, eight 4-bit values per uint32, lowest bits first).
"""

from __future__ import annotations

import os

import mlx.core as mx

SETTINGS = ("1", "0", "inline", "mma")
ENABLED = CANDIDATE = INLINE = False


def configure(setting: str) -> str:
    """Set which kernel takes few-row quantized matmuls; returns the setting it replaces. "1" (the default): this
    module's kernel where ``faster`` says; "0": every quantized matmul left to MLX (to compare); "inline": the
    inline-unpacking candidate in the kernel's place; "mma": the tensor-core candidate for every projection it
    fits on 1-8 rows. Read when projections are traced: a compiled step keeps the setting it was traced with.
    ``MLX_GEMMA4_FEW_ROWS`` sets it at import."""
    global ENABLED, CANDIDATE, INLINE
    if setting not in SETTINGS:
        raise ValueError(f"MLX_GEMMA4_FEW_ROWS={setting!r}: expected one of {', '.join(SETTINGS)}")
    before = "0" if not ENABLED else "mma" if CANDIDATE else "inline" if INLINE else "1"
    ENABLED, CANDIDATE, INLINE = setting != "0", setting == "mma", setting == "inline"
    return before


configure(os.environ.get("MLX_GEMMA4_FEW_ROWS", "1"))
MAX_ROWS = 8
ONE_ROW_FROM = 32 << 20    # weight elements from which one row takes the kernel (see ``faster``)
FEW_ROWS_FROM = 8 << 20    # ... and 2 or 3 rows (4 to 7: half of it)
ROWS_PER_WARP = 2
WARPS_PER_BLOCK = 4

_SOURCE = r"""
    const int N = w_shape[0];
    const int lane = threadIdx.x;
    const int row0 = (blockIdx.y * blockDim.y + threadIdx.y) * R;
    if (row0 >= N) return;
    constexpr int CHUNKS = K / 32;
    constexpr int GPR = K / G;
    constexpr int PER = 16 / sizeof(T);
    const bool aligned =
        ((reinterpret_cast<unsigned long long>(x) | reinterpret_cast<unsigned long long>(w)) & 15ull) == 0;
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    for (int c = lane; c < CHUNKS; c += 32) {
        float wq[R][32];
        float s[R], b[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int row = min(row0 + r, N - 1);
            const uint32_t* wp = w + (size_t)row * (K / 8) + c * 4;
            uint32_t q[4];
            if (aligned) {
                const uint4 v = *reinterpret_cast<const uint4*>(wp);
                q[0] = v.x; q[1] = v.y; q[2] = v.z; q[3] = v.w;
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i) q[i] = wp[i];
            }
            const size_t g = (size_t)row * GPR + (c * 32) / G;
            s[r] = static_cast<float>(scales[g]);
            b[r] = static_cast<float>(biases[g]);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    wq[r][i * 8 + j] = __int_as_float(0x4B000000u | ((q[i] >> (4 * j)) & 0xFu)) - 8388608.f;
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const T* xp = x + (size_t)m * K + c * 32;
            float dot[R];
#pragma unroll
            for (int r = 0; r < R; ++r) dot[r] = 0.f;
            float sx = 0.f;
#pragma unroll
            for (int v = 0; v < 32 / PER; ++v) {
                uint4 u;
                const T* e = reinterpret_cast<const T*>(&u);
                if (aligned) {
                    u = reinterpret_cast<const uint4*>(xp)[v];
                } else {
                    T* d = reinterpret_cast<T*>(&u);
#pragma unroll
                    for (int i = 0; i < PER; ++i) d[i] = xp[v * PER + i];
                }
#pragma unroll
                for (int i = 0; i < PER; ++i) {
                    const float xv = static_cast<float>(e[i]);
                    sx += xv;
#pragma unroll
                    for (int r = 0; r < R; ++r) dot[r] = fmaf(xv, wq[r][v * PER + i], dot[r]);
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][m] += s[r] * dot[r] + b[r] * sx;
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (row0 + r < N)
#pragma unroll
                for (int m = 0; m < M; ++m) out[(size_t)m * N + row0 + r] = static_cast<T>(acc[r][m]);
    }
"""

# A candidate (benchmarks/few_rows.py times it as "RxWi"): the same work as _SOURCE, but each packed word's eight
# weights are unpacked as they are used, against eight inputs of every row at once, instead of all 32 of a
# chunk ahead into registers: about half the registers a lane holds at one row, so more warps fit on a
# multiprocessor and more weight loads are in flight.
_INLINE_SOURCE = r"""
    const int N = w_shape[0];
    const int lane = threadIdx.x;
    const int row0 = (blockIdx.y * blockDim.y + threadIdx.y) * R;
    if (row0 >= N) return;
    constexpr int CHUNKS = K / 32;
    constexpr int GPR = K / G;
    constexpr int PER = 16 / sizeof(T);
    const bool aligned =
        ((reinterpret_cast<unsigned long long>(x) | reinterpret_cast<unsigned long long>(w)) & 15ull) == 0;
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    for (int c = lane; c < CHUNKS; c += 32) {
        uint32_t q[R][4];
        float s[R], b[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int row = min(row0 + r, N - 1);
            const uint32_t* wp = w + (size_t)row * (K / 8) + c * 4;
            if (aligned) {
                const uint4 v = *reinterpret_cast<const uint4*>(wp);
                q[r][0] = v.x; q[r][1] = v.y; q[r][2] = v.z; q[r][3] = v.w;
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i) q[r][i] = wp[i];
            }
            const size_t g = (size_t)row * GPR + (c * 32) / G;
            s[r] = static_cast<float>(scales[g]);
            b[r] = static_cast<float>(biases[g]);
        }
        float dot[R][M], sx[M];
#pragma unroll
        for (int m = 0; m < M; ++m) {
            sx[m] = 0.f;
#pragma unroll
            for (int r = 0; r < R; ++r) dot[r][m] = 0.f;
        }
#pragma unroll
        for (int word = 0; word < 4; ++word) {
            float xv[M][8];
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const T* xp = x + (size_t)m * K + c * 32 + word * 8;
#pragma unroll
                for (int h = 0; h < 8 / PER; ++h) {
                    uint4 u;
                    if (aligned) {
                        u = reinterpret_cast<const uint4*>(xp)[h];
                    } else {
                        T* d = reinterpret_cast<T*>(&u);
#pragma unroll
                        for (int i = 0; i < PER; ++i) d[i] = xp[h * PER + i];
                    }
                    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
                    for (int i = 0; i < PER; ++i) {
                        xv[m][h * PER + i] = static_cast<float>(e[i]);
                        sx[m] += xv[m][h * PER + i];
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float wv = __int_as_float(0x4B000000u | ((q[r][word] >> (4 * i)) & 0xFu)) - 8388608.f;
#pragma unroll
                    for (int m = 0; m < M; ++m) dot[r][m] = fmaf(xv[m][i], wv, dot[r][m]);
                }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int m = 0; m < M; ++m) acc[r][m] += s[r] * dot[r][m] + b[r] * sx[m];
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (row0 + r < N)
#pragma unroll
                for (int m = 0; m < M; ++m) out[(size_t)m * N + row0 + r] = static_cast<T>(acc[r][m]);
    }
"""

_kernels: dict[str, object] = {}


def _get_kernel(name: str, source: str, header: str = ""):
    """The custom kernel ``name`` (inputs x, w, scales, biases; output out), made on first use."""
    if name not in _kernels:
        _kernels[name] = mx.fast.cuda_kernel(name=name, input_names=["x", "w", "scales", "biases"],
                                             output_names=["out"], source=source, header=header)
    return _kernels[name]


def fits(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
         mode: str = "affine") -> bool:
    """Whether ``matmul`` takes this quantized matmul (``x @ dequantized(w).T``): what was checked on the device
    (benchmarks/few_rows.py: bfloat16, 4 bits, groups of 64; the kernel's code is written for float16 / float32
    and groups of 32 / 128 too, not yet run there)."""
    k = x.shape[-1]
    return (mode == "affine" and bits == 4 and biases is not None and group_size == 64
            and k % 32 == 0 and w.ndim == 2 and w.dtype == mx.uint32 and w.shape[1] * 8 == k
            and x.dtype == mx.bfloat16 and scales.dtype == x.dtype
            and biases.dtype == x.dtype and 1 <= x.size // k <= MAX_ROWS
            and -(-w.shape[0] // (ROWS_PER_WARP * WARPS_PER_BLOCK)) <= 65535)   # CUDA's grid height


def faster(rows: int, n: int, k: int) -> bool:
    """Whether the kernel beats MLX's own quantized matmul for ``rows`` rows of an (n, k) weight, from
    ``python -m benchmarks.few_rows`` on an H100 (docs/BENCHMARKS.md): each call costs ~10 us at the least, against
    ~4-6 us for MLX's ``qmv`` on a small weight, so one row takes it only on weights of at least ``ONE_ROW_FROM``
    elements (E4B's gate/up 28.5 against 31.9 us, the 262,144-entry head 256 against 365 us; E4B's down
    projection, 26M, 18.2 against 17.3), and 2 to 7 rows (where MLX reads the weight once per row) on weights of
    at least ``FEW_ROWS_FROM``, or half that from 4 rows (E4B's q projection, 5.2M: 12.3 against 9.3 us at 2
    rows, 14.5 against 18.3 at 5). From 8 rows MLX's tiled kernel is faster (gate/up 25.0 us at 8 rows)."""
    size = n * k
    if rows == 1:
        return size >= ONE_ROW_FROM
    if rows < 4:
        return 2 <= rows and size >= FEW_ROWS_FROM
    return rows <= MAX_ROWS - 1 and size >= FEW_ROWS_FROM // 2


def fits_candidate(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                   mode: str = "affine") -> bool:
    """Whether ``mma_matmul`` takes this quantized matmul: ``fits``, with an input width divisible by 64."""
    return fits(x, w, scales, biases, group_size, bits, mode) and x.shape[-1] % 64 == 0


def matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int,
           rows_per_warp: int | None = None, warps_per_block: int | None = None, inline: bool | None = None
           ) -> mx.array:
    """``x @ dequantized(w).T`` for 4-bit affine ``w`` (N, K / 8) on the few rows of ``x`` (..., K) (``fits``).
    ``inline``: the candidate that unpacks each word as it is used (``_INLINE_SOURCE``; default: ``INLINE``)."""
    k = x.shape[-1]
    m = x.size // k
    n = w.shape[0]
    r = rows_per_warp or ROWS_PER_WARP
    warps = -(-n // r)
    inline = INLINE if inline is None else inline
    name, source = ("gemma4_few_rows_q4_inline", _INLINE_SOURCE) if inline else ("gemma4_few_rows_q4", _SOURCE)
    out = _get_kernel(name, source)(
        inputs=[x.reshape(m, k), w, scales, biases],
        template=[("T", x.dtype), ("M", m), ("K", k), ("G", group_size), ("R", r)],
        grid=(32, warps, 1), threadgroup=(32, warps_per_block or WARPS_PER_BLOCK, 1),
        output_shapes=[(m, n)], output_dtypes=[x.dtype])[0]
    return out.reshape(*x.shape[:-1], n)


# A candidate, not yet run on a device (``MLX_GEMMA4_FEW_ROWS=mma`` opts in; benchmarks/few_rows.py times it as
# "mmaS": S warps per block share each weight's groups): tensor-core matrix multiply-accumulates (mma.sync
# m16n8k16, bfloat16 in, float32 out) on 16 output rows x up to 8 input rows per warp. Within each 16-wide k step
# the tile's k order is relabelled (A and B alike) so that a lane's A fragment is the nibbles it loaded itself (two
# 32-bit words of each of its two rows: 16 consecutive weights) and its B fragment the 16 consecutive inputs beside
# them. Nibbles become bfloat16 exactly (128 + q built from the bits, minus 128); a second multiply with an all-ones
# A gives each group's input sums for the biases: out = sum over groups of scale * sum(x * q) + bias * sum(x).
# Groups of 64 only; bfloat16 only.
_MMA_HEADER = r"""
__device__ __forceinline__ uint32_t gemma4_pair(uint32_t u) {
    uint32_t v = (u & 0xFu) | ((u & 0xF0u) << 12) | 0x43004300u;
    __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&v);
    h = __hsub2(h, __floats2bfloat162_rn(128.f, 128.f));
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ void gemma4_mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                           uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
"""

_MMA_SOURCE = r"""
    constexpr int G = 64;
    constexpr int GROUPS = K / G;
    const int N = w_shape[0];
    const int lane = threadIdx.x, warp = threadIdx.y;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.y * 16;
    const int ra = min(n0 + g, N - 1), rb = min(n0 + g + 8, N - 1);
    const uint32_t* wa = w + (size_t)ra * (K / 8);
    const uint32_t* wb = w + (size_t)rb * (K / 8);
    const bool has_x = g < M;
    const __nv_bfloat16* xr = x + (size_t)(has_x ? g : 0) * K;
    const uint32_t ONES = 0x3F803F80u;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int grp = warp; grp < GROUPS; grp += S) {
        const int base = grp * G + 16 * t;
        const uint2 qa = *reinterpret_cast<const uint2*>(wa + base / 8);
        const uint2 qb = *reinterpret_cast<const uint2*>(wb + base / 8);
        uint4 x0 = make_uint4(0u, 0u, 0u, 0u), x1 = make_uint4(0u, 0u, 0u, 0u);
        if (has_x) {
            x0 = *reinterpret_cast<const uint4*>(xr + base);
            x1 = *reinterpret_cast<const uint4*>(xr + base + 8);
        }
        const uint32_t xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        const uint32_t ua2[2] = {qa.x, qa.y}, ub2[2] = {qb.x, qb.y};
        float d[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int sh = (j & 1) * 16;
            const uint32_t ua = ua2[j >> 1] >> sh, ub = ub2[j >> 1] >> sh;
            gemma4_mma(d, gemma4_pair(ua), gemma4_pair(ub), gemma4_pair(ua >> 8), gemma4_pair(ub >> 8),
                       xw[2 * j], xw[2 * j + 1]);
            gemma4_mma(e, ONES, ONES, ONES, ONES, xw[2 * j], xw[2 * j + 1]);
        }
        const float sa = static_cast<float>(scales[(size_t)ra * GROUPS + grp]);
        const float sb = static_cast<float>(scales[(size_t)rb * GROUPS + grp]);
        const float ba = static_cast<float>(biases[(size_t)ra * GROUPS + grp]);
        const float bb = static_cast<float>(biases[(size_t)rb * GROUPS + grp]);
        acc[0] += sa * d[0] + ba * e[0];
        acc[1] += sa * d[1] + ba * e[1];
        acc[2] += sb * d[2] + bb * e[2];
        acc[3] += sb * d[3] + bb * e[3];
    }
    __shared__ float red[S][32][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][lane][i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float r[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int v = 0; v < S; ++v)
#pragma unroll
            for (int i = 0; i < 4; ++i) r[i] += red[v][lane][i];
        const int m0 = 2 * t, m1 = 2 * t + 1;
        if (n0 + g < N) {
            if (m0 < M) out[(size_t)m0 * N + n0 + g] = __float2bfloat16(r[0]);
            if (m1 < M) out[(size_t)m1 * N + n0 + g] = __float2bfloat16(r[1]);
        }
        if (n0 + g + 8 < N) {
            if (m0 < M) out[(size_t)m0 * N + n0 + g + 8] = __float2bfloat16(r[2]);
            if (m1 < M) out[(size_t)m1 * N + n0 + g + 8] = __float2bfloat16(r[3]);
        }
    }
"""

def mma_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, splits: int = 8) -> mx.array:
    """The candidate: ``x @ dequantized(w).T`` for bfloat16 ``x`` (..., K) of 1-8 rows, 4-bit ``w`` in groups of
    64 (K a multiple of 64)."""
    k = x.shape[-1]
    m = x.size // k
    n = w.shape[0]
    out = _get_kernel("gemma4_few_rows_mma", _MMA_SOURCE, _MMA_HEADER)(
        inputs=[x.reshape(m, k), w, scales, biases], template=[("M", m), ("K", k), ("S", splits)],
        grid=(32, splits * -(-n // 16), 1), threadgroup=(32, splits, 1),
        output_shapes=[(m, n)], output_dtypes=[x.dtype])[0]
    return out.reshape(*x.shape[:-1], n)
