"""What prefill's peak memory over the resident weights is made of, at a family's real widths with few layers.

    python -m benchmarks.prefill_memory --size 12b --tokens 1059 [--dtype bfloat16] [--q-bits 4] [--runs 2]

A layer's temporaries do not depend on the model's depth, so each size keeps its real widths (hidden, heads, head
sizes, MLP and expert widths, window) with a few layers: one sliding and one full-attention layer, and for the
E-sizes the same again as KV-shared layers (their producers are the first two). Random weights; ``--q-bits`` as
the user's checkpoints are (all projections and the embedding quantized); the dtype sets activations' width.

Printed: the KV caches the prompt leaves; per phase of one instrumented pass (embedding, masks and per-layer
inputs, each layer, the head), the peak over what was allocated before it and what the phase leaves allocated,
every phase evaluated on its own; then the plain ``model.prefill`` as ``stream_generate`` runs it, with its first
decode steps. A GPU backend frees an op's buffers only once the device has run it, so a layer evaluated alone
shows the sum of its allocations (less what its ops donate to each other); ``model.prefill`` has two layers
queued at a time (model._eval_each_layer), and its transient is about two such layers. The CPU backend's
scheduler caps what is queued itself, at roughly that much.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn

from tests import random_checkpoint as rc

SLIDING, FULL = "sliding_attention", "full_attention"
SIZES = {
    "e2b": dict(rc.E2B_TEXT, num_hidden_layers=4, num_kv_shared_layers=2, layer_types=[SLIDING, FULL] * 2),
    "e4b": dict(rc.E4B_TEXT, num_hidden_layers=4, num_kv_shared_layers=2, layer_types=[SLIDING, FULL] * 2),
    "12b": dict(rc.UNIFIED_12B_TEXT, num_hidden_layers=2, layer_types=[SLIDING, FULL]),
    "26b": dict(rc.A26B_TEXT, num_hidden_layers=2, layer_types=[SLIDING, FULL]),
}
MB = 1e6


def build(size: str, dtype: mx.Dtype, bits: int, group_size: int = 64):
    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.model import Gemma4

    model = Gemma4(ModelConfig.from_dict({"model_type": "gemma4_text", **SIZES[size]}))
    model.set_dtype(dtype)
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
    model.language_model.fuse()
    mx.eval(model.parameters())
    return model


def _phase(rows: list, name: str, fn) -> None:
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    mx.synchronize()
    rows.append((name, (mx.get_peak_memory() - before) / MB, (mx.get_active_memory() - before) / MB))


def instrumented(model, ids: mx.array) -> list:
    """The prefill of one chunk, phase by phase (as Gemma4.prefill runs it), each phase evaluated on its own."""
    lm = model.language_model
    cfg = lm.config
    cache = model.make_cache()
    rows: list = []
    out: dict = {}
    _phase(rows, "embed", lambda: [a for a in out.setdefault("e", model.embed(ids))[:2] if a is not None])
    embeds, token_inputs, _ = out["e"]
    p = lm.begin(embeds, token_inputs, cache)
    _phase(rows, "masks, per-layer inputs",
           lambda: [a for a in (p.per_layer, *p.masks.values()) if isinstance(a, mx.array)])
    first_shared = cfg.first_kv_shared_layer
    for i in range(len(lm.layers)):
        narrow = 1 if i == first_shared - 1 else None
        kind = cfg.layer_types[i].split("_")[0] + (", KV-shared" if cfg.is_kv_shared(i) else "")

        def one(i=i, narrow=narrow):
            lm.run(p, cache, range(i, i + 1), narrow_last=narrow)
            return [a for a in (p.h, *(x for kv in p.kvs.values() for x in kv), *(s for c in cache for s in c.state))
                    if a is not None]
        _phase(rows, f"layer {i} ({kind}{', last position only' if narrow else ''})", one)
    _phase(rows, "final norm, logits (last position)", lambda: model.logits(lm.norm(p.h))[0, -1])
    rows.append(("KV caches left", sum(c.nbytes for c in cache) / MB, sum(c.nbytes for c in cache) / MB))
    return rows


def plain(model, ids: mx.array, steps: int = 3) -> dict:
    """``model.prefill`` and ``steps`` decode steps as the token loop runs them; peaks over the memory before."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    cache = model.make_cache()
    logits = model.prefill({"input_ids": ids}, cache)
    mx.eval(logits)
    seconds = time.perf_counter() - t0
    prefill_peak = mx.get_peak_memory() - base
    kv = sum(c.nbytes for c in cache)
    y = mx.argmax(logits)
    for _ in range(steps):
        y = mx.argmax(model.step(y.reshape(1, 1), cache)[0, -1])
        mx.eval(y)
    return {"prefill_peak_mb": prefill_peak / MB, "kv_mb": kv / MB, "transient_mb": (prefill_peak - kv) / MB,
            "with_steps_peak_mb": (mx.get_peak_memory() - base) / MB, "prefill_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="12b")
    ap.add_argument("--tokens", type=int, default=1059)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--q-bits", type=int, default=0, help="0: unquantized")
    ap.add_argument("--runs", type=int, default=2, help="plain prefills after the instrumented pass")
    a = ap.parse_args()
    model = build(a.size, getattr(mx, a.dtype), a.q_bits)
    print(f"{a.size} ({len(model.layers)} layers at real width), {a.dtype}, {a.q_bits or 'no'} bits: "
          f"weights {mx.get_active_memory() / 1e9:.2f} GB; prompt {a.tokens} tokens")
    ids = mx.random.randint(3, 200_000, (1, a.tokens), key=mx.random.key(0)).astype(mx.int32)
    print("| phase | peak over start MB | left allocated MB |\n| --- | --- | --- |")
    for name, peak, kept in instrumented(model, ids):
        print(f"| {name} | {peak:.1f} | {kept:.1f} |")
    for _ in range(a.runs):
        r = plain(model, ids)
        print(f"model.prefill: peak {r['prefill_peak_mb']:.1f} MB over start = KV {r['kv_mb']:.1f} + transient "
              f"{r['transient_mb']:.1f}; with 3 decode steps {r['with_steps_peak_mb']:.1f} MB; {r['prefill_s']:.2f} s")


if __name__ == "__main__":
    main()
