"""4-bit matmuls of a few rows on MLX's CUDA backend that read each weight once for all of them.

Decoding multiplies one row (a speculative verify: k + 1 rows) by every quantized weight, so a decode step is
bound by how fast those weights stream from memory. MLX 0.32's CUDA backend runs such a matmul with ``qmv``: a warp
per output row, bfloat16 partial sums, and one whole pass over the weight per input row (a verify of 5 tokens reads
each weight 5 times). Two kernels of our own, each accumulating in float32 as ``scale * sum(x * q) + bias * sum(x)``
per group, with nibbles unpacked exactly:

- ``matmul`` (CUDA cores): each warp takes ``ROWS_PER_WARP`` output rows; each lane 32 weights of each (one 16-byte
  load) at a time, unpacking each 32-bit word's eight as it multiplies them with every input row (``2**23 + q``
  built from the bits, minus ``2**23``); the warp's lanes then reduce. Few registers, so many warps in flight: what
  one row (a decode step) wants.
- ``mma_matmul`` (tensor cores, ``mma.sync``): 16 output rows x up to 8 input rows per warp, split over the groups
  of the input width; for 2 to 7 rows (a verify), where it is bound by the weight's bytes whatever the row count.

``mma_matmul`` sums in another order than ``matmul`` and MLX's ``qmv``, so a verify's logits can differ from a
decode step's in the last bits, as MLX's own kernels for one row and for many do.

Only bfloat16 inputs and 4-bit affine weights in groups of 64 (what has run on a device) with an input width
divisible by 32 take them, on 1 to ``MAX_ROWS`` rows; ``fits`` says which, ``choose`` which kernel (or MLX's own)
is fastest. Compiled by MLX (NVRTC) once per row count and input width, and cached on disk by MLX. Reference for
the format: ``mx.quantize`` (affine: ``w = scale * q + bias`` per group, eight 4-bit values per uint32, lowest bits
first).
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

SETTINGS = ("1", "0", "mma")
ENABLED = CANDIDATE = False


def configure(setting: str) -> str:
    """Set which kernels take few-row quantized matmuls; returns the setting it replaces. "1" (the default): this
    module's kernels where ``choose`` says; "0": every quantized matmul left to MLX (to compare); "mma": the
    tensor-core kernel for every projection it fits on 1-8 rows, whatever its size (to compare). Read when
    projections are traced: a compiled step keeps the setting it was traced with. ``MLX_GEMMA4_FEW_ROWS`` sets it
    at import."""
    global ENABLED, CANDIDATE
    if setting not in SETTINGS:
        raise ValueError(f"MLX_GEMMA4_FEW_ROWS={setting!r}: expected one of {', '.join(SETTINGS)}")
    before = "0" if not ENABLED else "mma" if CANDIDATE else "1"
    ENABLED, CANDIDATE = setting != "0", setting == "mma"
    return before


configure(os.environ.get("MLX_GEMMA4_FEW_ROWS", "1"))
MAX_ROWS = 8
ONE_ROW_FROM = 28 << 20    # weight elements from which one row takes the CUDA-core kernel (see ``choose``)
FEW_ROWS_FROM = 2 << 20    # ... and 2 to 7 rows the tensor-core kernel
ROWS_PER_WARP = 4
WARPS_PER_BLOCK = 4
MMA_WARPS = 8              # the tensor-core kernel's warps per block (each a share of every group of 16 rows)


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
    (benchmarks/few_rows.py: bfloat16, 4 bits, groups of 64; the CUDA-core kernel's code is written for float16 /
    float32 and groups of 32 / 128 too, checked on the host only: tests/test_few_rows_host.py)."""
    k = x.shape[-1]
    return (mode == "affine" and bits == 4 and biases is not None and group_size == 64
            and k % 32 == 0 and w.ndim == 2 and w.dtype == mx.uint32 and w.shape[1] * 8 == k
            and x.dtype == mx.bfloat16 and scales.dtype == x.dtype
            and biases.dtype == x.dtype and 1 <= x.size // k <= MAX_ROWS
            and -(-w.shape[0] // (ROWS_PER_WARP * WARPS_PER_BLOCK)) <= 65535)   # CUDA's grid height


@functools.cache
def tensor_cores() -> bool:
    """Whether the CUDA device runs ``mma_matmul`` (bfloat16 ``mma.sync``: compute capability 8.0 and up, Ampere
    on); where MLX does not say, assumed so."""
    try:
        major = mx.device_info().get("compute_capability_major")
    except Exception:
        major = None
    return not isinstance(major, int) or major >= 8


def choose(rows: int, n: int, k: int) -> str | None:
    """Which kernel takes ``rows`` rows of an (n, k) weight in the format ``fits`` takes: "mma" (``mma_matmul``),
    "cores" (``matmul``) or None (MLX's own), from ``python -m benchmarks.few_rows`` on an H100 with weights read
    cold (docs/BENCHMARKS.md). Each custom kernel call cost ~11 us at the least there (timed uncompiled), against
    ~5-7 us for MLX's ``qmv`` on a small weight, so one row takes the CUDA-core kernel only on weights of at least
    ``ONE_ROW_FROM`` elements (E4B's gate/up 25.2 against 32.5 us, the 12B's q/k/v 18.3 against 20.9, E4B's
    262,144-entry head 195 against 365; E4B's down projection, 26M elements, 19.1 against 18.6). 2 to 7 rows (where
    MLX reads the weight once per row) take the tensor-core kernel, which reads it once for all of them, on weights
    of at least ``FEW_ROWS_FROM`` (E4B's q at 5 rows 11.5 against 18.7 us, its k/v, 1.3M, 11.0 against 7.7; E2B's q
    and o, 3.1M, on it: a verify of 5-7 tokens 0.34-0.46 ms faster on an H100, 7.31-7.55 against 7.65-8.01) and an
    input width divisible by 64 on a device with them (``tensor_cores``; else the CUDA-core kernel). From 8 rows
    MLX's tiled kernel takes over. With the "mma" setting (``configure``), the tensor-core kernel wherever it fits."""
    if CANDIDATE:   # MLX_GEMMA4_FEW_ROWS=mma: the tensor-core kernel wherever it fits
        return "mma" if k % 64 == 0 and tensor_cores() else None
    size = n * k
    if rows == 1:
        return "cores" if size >= ONE_ROW_FROM else None
    if 2 <= rows < MAX_ROWS and size >= FEW_ROWS_FROM:
        return "mma" if k % 64 == 0 and tensor_cores() else "cores"
    return None


def matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int,
           rows_per_warp: int = ROWS_PER_WARP, warps_per_block: int = WARPS_PER_BLOCK) -> mx.array:
    """``x @ dequantized(w).T`` for 4-bit affine ``w`` (N, K / 8) on the few rows of ``x`` (..., K) (``fits``), on
    CUDA cores."""
    k = x.shape[-1]
    m = x.size // k
    n = w.shape[0]
    out = _get_kernel("gemma4_few_rows_q4", _SOURCE)(
        inputs=[x.reshape(m, k), w, scales, biases],
        template=[("T", x.dtype), ("M", m), ("K", k), ("G", group_size), ("R", rows_per_warp)],
        grid=(32, -(-n // rows_per_warp), 1), threadgroup=(32, warps_per_block, 1),
        output_shapes=[(m, n)], output_dtypes=[x.dtype])[0]
    return out.reshape(*x.shape[:-1], n)


# The tensor-core kernel (benchmarks/few_rows.py times it as "mmaS": S warps per block share each weight's groups):
# tensor-core matrix multiply-accumulates (mma.sync m16n8k16, bfloat16 in, float32 out) on 16 output rows x up to 8
# input rows per warp. Within each 16-wide k step the tile's k order is relabelled (A and B alike) so that a lane's
# A fragment is the nibbles it loaded itself (two 32-bit words of each of its two rows: 16 consecutive weights) and
# its B fragment the 16 consecutive inputs beside them. Nibbles become bfloat16 exactly (128 + q built from the
# bits, minus 128); a second multiply with an all-ones A gives each group's input sums for the biases: out = sum
# over groups of scale * sum(x * q) + bias * sum(x). Groups of 64 only; bfloat16 only.
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

def mma_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, splits: int = MMA_WARPS
               ) -> mx.array:
    """``x @ dequantized(w).T`` for bfloat16 ``x`` (..., K) of 1-8 rows, 4-bit ``w`` in groups of 64 (K a multiple
    of 64), on tensor cores."""
    k = x.shape[-1]
    m = x.size // k
    n = w.shape[0]
    out = _get_kernel("gemma4_few_rows_mma", _MMA_SOURCE, _MMA_HEADER)(
        inputs=[x.reshape(m, k), w, scales, biases], template=[("M", m), ("K", k), ("S", splits)],
        grid=(32, splits * -(-n // 16), 1), threadgroup=(32, splits, 1),
        output_shapes=[(m, n)], output_dtypes=[x.dtype])[0]
    return out.reshape(*x.shape[:-1], n)
