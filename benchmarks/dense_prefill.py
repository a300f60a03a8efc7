"""Prefill on dequantized weights (mlx_gemma4/projection.py) against quantized matmuls, and its settings, on a
model of a size's real widths with a few layers built in memory (no checkpoint): prefill ms and peak per setting.

    python -m benchmarks.dense_prefill --size 12b --layers 12 --tokens 1059

Settings: quantized matmuls; dequantized in slices of SLICE_BYTES with QUEUED_SLICES queued; whole weights with
waits per projection; whole weights with no waits of their own (the layer-level waits only). Medians of --runs
after two warm-ups.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import mlx.core as mx

from benchmarks.prefill_memory import SIZES, build
from mlx_gemma4 import projection as pm

SETTINGS = {   # name: (dense, SLICE_BYTES, QUEUED_SLICES)
    "quantized": (False, 128 << 20, 2),
    "dense 64MB slices, 2 queued": (True, 64 << 20, 2),
    "dense 64MB slices, 3 queued": (True, 64 << 20, 3),
    "dense 128MB slices, 2 queued": (True, 128 << 20, 2),
    "dense whole, 2 queued": (True, 1 << 40, 2),
    "dense whole, no waits": (True, 1 << 40, 0),
}


@contextmanager
def setting(model, dense: bool, slice_bytes: int, queued: int):
    """Inside, ``model``'s prefill runs with one of SETTINGS (as ``*SETTINGS[name]``); restored after."""
    saved = model.dense_prefill, pm.SLICE_BYTES, pm.QUEUED_SLICES
    model.dense_prefill, pm.SLICE_BYTES, pm.QUEUED_SLICES = dense, slice_bytes, queued
    try:
        yield
    finally:
        model.dense_prefill, pm.SLICE_BYTES, pm.QUEUED_SLICES = saved


def time_prefill(model, inputs: dict, runs: int) -> tuple[float, float]:
    """Medians of ``model.prefill(inputs)`` into a new cache, after two warm-ups: (ms, peak MB over start)."""
    ts, peaks = [], []
    for r in range(runs + 2):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        mx.eval(model.prefill(inputs, model.make_cache()))
        if r >= 2:
            ts.append((time.perf_counter() - t0) * 1000)
            peaks.append((mx.get_peak_memory() - base) / 1e6)
    return statistics.median(ts), statistics.median(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="12b")
    ap.add_argument("--layers", type=int, default=12, help="layers (the size's pattern of layer types repeated)")
    ap.add_argument("--tokens", type=int, default=1059)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    spec = SIZES[a.size]
    pattern = spec["layer_types"]
    SIZES[a.size] = dict(spec, num_hidden_layers=a.layers, layer_types=(pattern * a.layers)[:a.layers])
    if spec.get("num_kv_shared_layers"):
        SIZES[a.size]["num_kv_shared_layers"] = a.layers // 2
    model = build(a.size, mx.bfloat16, 4)
    ids = mx.random.randint(3, 200_000, (1, a.tokens), key=mx.random.key(0)).astype(mx.int32)
    print(f"{a.size}, {a.layers} layers at real width, 4 bits, {a.tokens} tokens, {mx.default_device()}")
    for name, values in SETTINGS.items():
        with setting(model, *values):
            ms, peak = time_prefill(model, {"input_ids": ids}, a.runs)
        print(f"{name}: {ms:.1f} ms, peak {peak:.0f} MB over start", flush=True)


if __name__ == "__main__":
    main()
