"""The few-rows 4-bit matmul (mlx_gemma4/few_rows.py) against MLX's own quantized matmul, on CUDA.

For the quantized projections of the real E2B / E4B / 12B sizes (random weights) at 1 to 8 rows: the largest
difference of each from a float32 matmul on the same dequantized weights (checked: ours must be no farther than
MLX's), and the time per call (100 calls queued at once, median of 5), with the weight bytes streamed per second.

    python -m benchmarks.few_rows [--sizes e4b,12b] [--rows 1,2,5,8] [--variants 2x4,mma8,mma4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from mlx_gemma4 import few_rows

# A candidate, timed beside the library's kernel (variants "mmaS": S warps per block share each weight's groups):
# tensor-core matrix multiply-accumulates (mma.sync m16n8k16, bfloat16 in, float32 out) on 16 output rows x up to 8
# input rows per warp. Within each 16-wide k step the tile's k order is relabelled (A and B alike) so that a lane's
# A fragment is the nibbles it loaded itself (two 32-bit words of each of its two rows: 16 consecutive weights) and
# its B fragment the 16 consecutive inputs beside them. Nibbles become bfloat16 exactly (128 + q built from the
# bits, minus 128); a second multiply with an all-ones A gives each group's input sums for the biases:
# out = sum over groups of scale * sum(x * q) + bias * sum(x). Groups of 64 only; bfloat16 only.
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

_mma_kernel = None


def mma_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, splits: int = 8) -> mx.array:
    """The candidate: ``x @ dequantized(w).T`` for bfloat16 ``x`` (..., K) of 1-8 rows, 4-bit ``w`` in groups of
    64 (K a multiple of 64)."""
    global _mma_kernel
    if _mma_kernel is None:
        _mma_kernel = mx.fast.cuda_kernel(name="gemma4_few_rows_mma", input_names=["x", "w", "scales", "biases"],
                                          output_names=["out"], source=_MMA_SOURCE, header=_MMA_HEADER)
    k = x.shape[-1]
    m = x.size // k
    n = w.shape[0]
    out = _mma_kernel(inputs=[x.reshape(m, k), w, scales, biases],
                      template=[("M", m), ("K", k), ("S", splits)],
                      grid=(32, splits * -(-n // 16), 1), threadgroup=(32, splits, 1),
                      output_shapes=[(m, n)], output_dtypes=[x.dtype])[0]
    return out.reshape(*x.shape[:-1], n)


# (name, out, in, uses per decode step)
SHAPES = {
    "e2b": [("gate_up", 12288, 1536, 35), ("down", 1536, 6144, 35), ("q", 2048, 1536, 35), ("o", 1536, 2048, 35),
            ("head", 262144, 1536, 1)],
    "e4b": [("gate_up", 20480, 2560, 42), ("down", 2560, 10240, 42), ("q", 2048, 2560, 42), ("kv", 512, 2560, 24),
            ("o", 2560, 2048, 42), ("head", 262144, 2560, 1)],
    "12b": [("gate_up", 30720, 3840, 48), ("down", 3840, 15360, 48), ("qkv", 8192, 3840, 48), ("o", 3840, 4096, 48),
            ("head", 262144, 3840, 1)],
}


def timed(fn, x, calls: int = 100, runs: int = 5) -> float:
    for _ in range(2):
        mx.eval([fn(x) for _ in range(10)])
    times = []
    for _ in range(runs):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval([fn(x) for _ in range(calls)])
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="e4b,12b,e2b")
    ap.add_argument("--rows", default="1,2,4,5,8")
    ap.add_argument("--variants", default="2x4,mma8,mma4",
                    help="the library kernel's rows per warp x warps per block, or mmaS (the tensor-core candidate "
                         "with S warps per block), comma-separated")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args(argv)
    cuda = getattr(mx, "cuda", None)
    if not (mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()):
        raise SystemExit("benchmarks.few_rows times CUDA kernels: it needs MLX's CUDA backend (mlx[cuda]) and a GPU.")
    dtype = getattr(mx, args.dtype)
    rows = [int(r) for r in args.rows.split(",")]
    variants = [("mma", int(s[3:])) if s.startswith("mma") else tuple(int(v) for v in s.split("x"))
                for s in args.variants.split(",")]
    print(json.dumps({"device": str(mx.default_device()), "mlx": mx.__version__, "dtype": args.dtype}), flush=True)
    total: dict[str, dict[int, float]] = {}
    for size in args.sizes.split(","):
        for name, n, k, uses in SHAPES[size]:
            mx.random.seed(0)
            w32 = (mx.random.normal((n, k)) * 0.02).astype(dtype)
            w, scales, biases = mx.quantize(w32, group_size=args.group_size, bits=4)
            dense = mx.dequantize(w, scales, biases, group_size=args.group_size, bits=4).astype(mx.float32)
            nbytes = w.nbytes + scales.nbytes + biases.nbytes
            for m in rows:
                x = mx.random.normal((1, m, k)).astype(dtype)
                ref = x.astype(mx.float32) @ dense.T
                scale = mx.max(mx.abs(ref)).item()

                def theirs(x):
                    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=args.group_size,
                                               bits=4)

                row = {"size": size, "proj": name, "n": n, "k": k, "rows": m}
                err_theirs = mx.max(mx.abs(theirs(x).astype(mx.float32) - ref)).item() / scale
                t_theirs = timed(theirs, x)
                row["mlx_us"] = round(t_theirs * 1e6, 1)
                row["mlx_tb_s"] = round(nbytes / t_theirs / 1e12, 2)
                row["mlx_err"] = float(f"{err_theirs:.2e}")
                total.setdefault(f"{size}/mlx", {}).setdefault(m, 0.0)
                total[f"{size}/mlx"][m] += t_theirs * uses
                for variant in variants:
                    if variant[0] == "mma":
                        if args.group_size != 64 or dtype != mx.bfloat16:
                            continue
                        r, warps = "mma", variant[1]

                        def ours(x, warps=warps):
                            return mma_matmul(x, w, scales, biases, warps)
                    else:
                        r, warps = variant

                        def ours(x, r=r, warps=warps):
                            return few_rows.matmul(x, w, scales, biases, args.group_size, r, warps)
                    try:
                        out = ours(x)
                        err = mx.max(mx.abs(out.astype(mx.float32) - ref)).item() / scale
                        compiled = mx.compile(ours)(x)
                        same = mx.array_equal(compiled, out).item()
                        t = timed(ours, x)
                    except Exception as e:   # a variant that does not build: say so and go on
                        row[f"{r}x{warps}"] = f"error: {e}"[:300]
                        continue
                    row[f"{r}x{warps}_us"] = round(t * 1e6, 1)
                    row[f"{r}x{warps}_tb_s"] = round(nbytes / t / 1e12, 2)
                    row[f"{r}x{warps}_err"] = float(f"{err:.2e}")
                    row[f"{r}x{warps}_compiled_same"] = same
                    total.setdefault(f"{size}/{r}x{warps}", {}).setdefault(m, 0.0)
                    total[f"{size}/{r}x{warps}"][m] += t * uses
                print(json.dumps(row), flush=True)
    print(json.dumps({"per_step_ms": {k: {m: round(v * 1e3, 3) for m, v in d.items()} for k, d in total.items()}}),
          flush=True)


if __name__ == "__main__":
    main()
