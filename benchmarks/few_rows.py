"""The few-rows 4-bit matmul (mlx_gemma4/few_rows.py) against MLX's own quantized matmul, on CUDA.

For the quantized projections of the real E2B / E4B / 12B sizes (random weights) at 1 to 8 rows: the largest
difference of each from a float32 matmul on the same dequantized weights (checked: ours must be no farther than
MLX's), and the time per call, compiled as a decode step runs it (100 calls queued at once, median of 5), with
the weight bytes streamed per second.
The calls cycle through copies of the weight that together exceed the device's last-level cache (``--cold-mb``),
as a decode step reads each weight once: a weight small enough to stay cached would otherwise time too fast.

    python -m benchmarks.few_rows [--sizes e4b,12b] [--rows 1,2,5,8] [--variants 4x4,2x4,mma8,mma4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from mlx_gemma4 import few_rows, projection

# (name, out, in, uses per decode step)
SHAPES = {
    "e2b": [("gate_up", 12288, 1536, 35), ("down", 1536, 6144, 35), ("q", 2048, 1536, 35), ("o", 1536, 2048, 35),
            ("head", 262144, 1536, 1)],
    "e4b": [("gate_up", 20480, 2560, 42), ("down", 2560, 10240, 42), ("q", 2048, 2560, 42), ("kv", 512, 2560, 24),
            ("o", 2560, 2048, 42), ("head", 262144, 2560, 1)],
    "12b": [("gate_up", 30720, 3840, 48), ("down", 3840, 15360, 48), ("qkv", 8192, 3840, 48), ("o", 3840, 4096, 48),
            ("head", 262144, 3840, 1)],
}


def timed(fn, x, copies: list, calls: int = 100, runs: int = 5) -> float:
    """Seconds per call of ``fn(x, *copy)`` compiled (as a decode step calls it: MLX does the work of building each
    call's graph once, where an uncompiled custom kernel, for one, assembles its source again on every call), the
    calls cycling through ``copies`` of the weight."""
    fn = mx.compile(fn)
    for _ in range(2):
        mx.eval([fn(x, *copies[i % len(copies)]) for i in range(10)])
    times = []
    for _ in range(runs):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval([fn(x, *copies[i % len(copies)]) for i in range(calls)])
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="e4b,12b,e2b")
    ap.add_argument("--rows", default="1,2,4,5,8")
    ap.add_argument("--variants", default="4x4,mma8",
                    help="the CUDA-core kernel's rows per warp x warps per block, or mmaS (the tensor-core kernel "
                         "with S warps per block), comma-separated")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--cold-mb", type=int, default=256,
                    help="the copies of each weight the calls cycle through add up to at least this (0: one copy)")
    args = ap.parse_args(argv)
    if not projection.on_cuda():
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
            extra = min(31, max(0, -(-args.cold_mb * 2**20 // nbytes) - 1))
            copies = [(w, scales, biases)] + [(w ^ 0, scales + 0, biases + 0) for _ in range(extra)]  # own buffers
            mx.eval(copies)
            for m in rows:
                x = mx.random.normal((1, m, k)).astype(dtype)
                ref = x.astype(mx.float32) @ dense.T
                scale = mx.max(mx.abs(ref)).item()

                def theirs(x, w, scales, biases):
                    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=args.group_size,
                                               bits=4)

                row = {"size": size, "proj": name, "n": n, "k": k, "rows": m, "copies": len(copies)}
                err_theirs = mx.max(mx.abs(theirs(x, w, scales, biases).astype(mx.float32) - ref)).item() / scale
                t_theirs = timed(theirs, x, copies)
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

                        def ours(x, w, scales, biases, warps=warps):
                            return few_rows.mma_matmul(x, w, scales, biases, warps)
                    else:
                        r, warps = variant

                        def ours(x, w, scales, biases, r=r, warps=warps):
                            return few_rows.matmul(x, w, scales, biases, args.group_size, r, warps)
                    try:
                        out = ours(x, w, scales, biases)
                        err = mx.max(mx.abs(out.astype(mx.float32) - ref)).item() / scale
                        compiled = mx.compile(ours)(x, w, scales, biases)
                        same = mx.array_equal(compiled, out).item()
                        t = timed(ours, x, copies)
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
