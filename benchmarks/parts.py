"""Where our time to first token and decode step go, part by part, beside mlx-lm's, on converted checkpoints.

    python -m benchmarks.parts OURS_DIR [MLX_LM_DIR] --tokens 1059

OURS_DIR is a ``convert.py`` output and MLX_LM_DIR an ``mlx_lm.convert`` output of the same checkpoint (what
``benchmarks.e2e`` writes under its --work folder: hf-e4b-ours-4bit, hf-e4b-mlx-lm-4bit). On one prompt of
--tokens token ids it
times (medians after warm-up, each synchronised):

- prefill: ours (``model.prefill``), ours as one lazy graph, ours over every layer at every position, and mlx-lm's
  as its ``stream_generate`` runs it (all but the last token with the cache evaluated, then the last token);
- one layer of each kind at prompt length and its parts (attention, projections, MLP, sdpa, a norm);
- 4-bit matmuls at prompt sizes: MLX's quantized matmul against dequantize + dense matmul; with `--parts rows`, at
  1 to 8 rows (a speculative verify's), as they are and padded to 8;
- decode: a bare greedy loop (queued one step ahead) of ours and mlx-lm's, the host time to build one of our
  steps and one of mlx-lm's, and one step evaluated synchronously;
- A/B switches: mx.fast's attention everywhere against the written-out one everywhere (text.attention), and
  prefill with its 4-bit weights dequantized for their matmuls (projection.py) or not, with each one's peak.

Not the user's path (that is benchmarks.e2e): this explains its numbers.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import tempfile
import time

import mlx.core as mx


def med(f, runs: int = 5, warm: int = 2) -> float:
    for _ in range(warm):
        f()
    ts = []
    for _ in range(runs):
        mx.synchronize()
        t0 = time.perf_counter()
        f()
        mx.synchronize()
        ts.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(ts), 2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ours")
    ap.add_argument("mlx_lm", nargs="?", help="an mlx_lm.convert output of the same checkpoint (optional: the 12B has "
                    "none; then only ours is timed)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=64, help="tokens of each bare decode loop")
    ap.add_argument("--no-matmuls", action="store_true", help="leave out the 4-bit matmul sizes (slow on a CPU)")
    ap.add_argument("--parts", default="prefill,layers,matmuls,decode,ab",
                    help="comma-separated: which of prefill, layers, matmuls, rows, decode, graph, ab to time "
                         "(default all but rows and graph)")
    a = ap.parse_args(argv)

    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    import mlx_gemma4.text as text
    from mlx_gemma4 import load

    model, _ = load(a.ours)
    lmodel = mlx_lm.load(a.mlx_lm)[0] if a.mlx_lm else None
    lm = model.language_model
    ids = mx.array([[(i * 7919) % 200_000 + 1000 for i in range(a.tokens)]], dtype=mx.int32)
    inputs = {"input_ids": ids}
    y = mx.array([[1234]], dtype=mx.int32)
    res = _Results()

    def ours_prefill():
        mx.eval(model.prefill(inputs, model.make_cache()))

    def ours_every_layer():
        e, ti, _ = model.embed(ids)
        mx.eval(model.logits(lm(e, ti, model.make_cache())[:, -1:]))

    def lm_prefill():
        c = make_prompt_cache(lmodel)
        lmodel(ids[:, :-1], cache=c)
        mx.eval([x.state for x in c])
        mx.eval(lmodel(ids[:, -1:], cache=c))

    parts = set(a.parts.split(","))
    if "prefill" in parts:
        res["prefill ms: ours"] = med(ours_prefill)
        import mlx_gemma4.model as gm
        every = gm.EVAL_EACH_LAYER_FROM
        gm.EVAL_EACH_LAYER_FROM = 10**9
        res["prefill ms: ours, one lazy graph"] = med(ours_prefill)
        gm.EVAL_EACH_LAYER_FROM = every
        res["prefill ms: ours, every layer at every position"] = med(ours_every_layer)
        if lmodel is not None:
            res["prefill ms: mlx-lm (n-1, then 1)"] = med(lm_prefill)

    for i in (lm.config.layer_types.index("sliding_attention"), lm.config.layer_types.index("full_attention")):
        if "layers" in parts:
            res[f"layer {i} ({lm.config.layer_types[i]}) at prompt length, ms"] = _layer_parts(model, ids, i)

    hidden, inter = lm.config.hidden_size, lm.config.intermediate_size
    shapes = ((hidden, 2 * inter), (inter, hidden))          # this model's gate/up and down projections
    for M in () if a.no_matmuls or "matmuls" not in parts else (a.tokens, 512, 256, 128, 64):
        for K, N in shapes:
            res[f"4-bit matmul M={M} K={K} N={N}: quantized, dequantized+dense ms"] = _matmuls(M, K, N)
    if "rows" in parts:   # a speculative verify's few rows: as they are, and padded to 8
        for K, N in shapes:
            res[f"4-bit matmul K={K} N={N}, ms at M=1..8"] = [_rows(M, K, N) for M in range(1, 9)]
            res[f"4-bit matmul K={K} N={N}, ms at M=1..8 padded to 8"] = [_rows(M, K, N, 8) for M in range(1, 9)]

    def ours_decode():
        c = model.make_cache()
        mx.eval(model.prefill(inputs, c))
        t, mx_y = time.perf_counter(), y
        for _ in range(a.decode):
            mx_y = mx.argmax(model.step(mx_y, c)[:, -1:], axis=-1).astype(mx.int32)
            mx.async_eval(mx_y)
        mx.eval(mx_y)
        return a.decode / (time.perf_counter() - t)

    def lm_decode():
        c = make_prompt_cache(lmodel)
        mx.eval(lmodel(ids, cache=c))
        t, mx_y = time.perf_counter(), y
        for _ in range(a.decode):
            mx_y = mx.argmax(lmodel(mx_y, cache=c)[:, -1:], axis=-1).astype(mx.int32)
            mx.async_eval(mx_y)
        mx.eval(mx_y)
        return a.decode / (time.perf_counter() - t)

    def tps(f):
        f()
        f()
        return round(statistics.median(f() for _ in range(3)), 1)

    if "decode" in parts:
        res["bare decode tok/s: ours"] = tps(ours_decode)
        if lmodel is not None:
            res["bare decode tok/s: mlx-lm"] = tps(lm_decode)
        c = model.make_cache()
        mx.eval(model.prefill(inputs, c))
        res["step build ms (host): ours"] = _build_ms(lambda: model.step(y, c))
        res["step evaluated ms: ours"] = med(lambda: mx.eval(model.step(y, c)), runs=20)
        if lmodel is not None:
            lc = make_prompt_cache(lmodel)
            mx.eval(lmodel(ids, cache=lc))
            res["step build ms (host): mlx-lm"] = _build_ms(lambda: lmodel(y, cache=lc))
            res["step evaluated ms: mlx-lm"] = med(lambda: mx.eval(lmodel(y, cache=lc)), runs=20)
    if "graph" in parts:   # what one compiled decode step is made of, and whether the host keeps up with it
        c = model.make_cache()
        mx.eval(model.prefill(inputs, c))
        for name, count in _step_nodes(model.step(y, c)).most_common():
            res[f"step graph nodes: {name}"] = count
        res["step host ms, period ms (host: model.step + mx.async_eval)"] = _host_and_period(model, c, y, a.decode)
    if "ab" not in parts:
        return

    # A/B: mx.fast's attention everywhere, against the written-out math everywhere (the compiled step is traced
    # again for each setting); the default picks per head size and query count (text._fused_attention_sizes).
    sizes = text._fused_attention_sizes
    for label, setting in (("mx.fast attention", (1 << 30,) * 3), ("written-out attention", (0, 0, 0))):
        text._fused_attention_sizes = lambda setting=setting: setting
        model.retrace()
        res[f"A/B prefill ms: {label}"] = med(ours_prefill)
        res[f"A/B bare decode tok/s: {label}"] = tps(ours_decode)
    text._fused_attention_sizes = sizes
    model.retrace()

    # A/B: prefill's projections on dequantized weights (projection.py) as the default runs them, each weight
    # whole with no waits of its own, and quantized; with each one's peak (benchmarks/dense_prefill.py has more)
    from benchmarks.dense_prefill import SETTINGS, setting, time_prefill

    for label in ("dense 128MB slices, 2 queued", "dense whole, no waits", "quantized"):
        with setting(model, *SETTINGS[label]):
            ms, peak = time_prefill(model, inputs, 5)
        res[f"A/B prefill ms: {label}"] = round(ms, 2)
        res[f"A/B prefill peak over start MB: {label}"] = round(peak)


class _Results(dict):
    """Each result printed as it is measured: a run cut short by a time limit still leaves what it measured."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"{key}: {value}", flush=True)


def _layer_parts(model, ids: mx.array, i: int) -> dict[str, float]:
    lm = model.language_model
    layer, attn = lm.layers[i], lm.layers[i].self_attn
    e, ti, _ = model.embed(ids)
    p = lm.begin(e, ti, model.make_cache(), None)
    mx.eval(p.h, p.per_layer)
    x, mask = p.h, p.masks[lm.config.layer_types[i]]
    per_layer = None if p.per_layer is None else p.per_layer[:, :, i]
    xn = layer.input_layernorm(x)
    proj = attn.qkv_proj if "qkv_proj" in attn else attn.q_proj
    q = mx.random.normal((1, attn.n_heads, x.shape[1], attn.head_dim)).astype(x.dtype)
    k = mx.random.normal((1, attn.n_kv_heads, x.shape[1], attn.head_dim)).astype(x.dtype)
    mx.eval(xn, q, k)
    return {
        "layer": med(lambda: mx.eval(layer(x, per_layer, 0, mask, model.make_cache()[i])[0])),
        "attention": med(lambda: mx.eval(attn(xn, 0, mask, model.make_cache()[i])[0])),
        "q(kv) projection": med(lambda: mx.eval(proj(xn))),
        "mlp": med(lambda: mx.eval(layer.mlp(xn))),
        "attention math": med(lambda: mx.eval(_attention(q, k, mask))),
        "norm": med(lambda: mx.eval(layer.input_layernorm(x))),
    }


def _attention(q, k, mask):
    from mlx_gemma4.text import attention

    return attention(q, k, k, mask)


def _operands(M: int, K: int, N: int) -> tuple[mx.array, ...]:
    """x (1, M, K) and a 4-bit (group 64) weight (N, K) as (packed, scales, biases), bfloat16, evaluated."""
    w = mx.random.normal((N, K)).astype(mx.bfloat16) * 0.02
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((1, M, K)).astype(mx.bfloat16)
    mx.eval(wq, scales, biases, x)
    return x, wq, scales, biases


def _matmuls(M: int, K: int, N: int) -> tuple[float, float]:
    x, wq, scales, biases = _operands(M, K, N)
    return (med(lambda: mx.eval(mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4))),
            med(lambda: mx.eval(x @ mx.dequantize(wq, scales, biases, group_size=64, bits=4).T)))


def _rows(M: int, K: int, N: int, pad_to: int = 0) -> float:
    x, wq, scales, biases = _operands(M, K, N)

    def run():
        xp = mx.pad(x, [(0, 0), (0, pad_to - M), (0, 0)]) if pad_to > M else x
        return mx.quantized_matmul(xp, wq, scales, biases, transpose=True, group_size=64, bits=4)[:, :M]

    return round(med(lambda: mx.eval(run()), runs=20), 4)


def _step_nodes(out: mx.array) -> collections.Counter:
    """The primitives of ``out``'s graph (a step as the compiled step leaves it), counted by name: a decode step
    bound by the host costs roughly its node count in dispatches."""
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, out)
        names = re.findall(r'label ="?([A-Za-z_0-9]+)', f.read())
    mx.eval(out)
    counts = collections.Counter(names)
    counts["(all)"] = len(names)
    return counts


def _host_and_period(model, cache, y: mx.array, n: int) -> tuple[float, float]:
    """A bare greedy loop queued one step ahead: the host's median time to build and dispatch a step (model.step
    and mx.async_eval) against the loop's period, in ms. Equal: the loop waits on the host, not the device."""
    host = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        y = mx.argmax(model.step(y, cache)[:, -1:], axis=-1).astype(mx.int32)
        mx.async_eval(y)
        host.append(time.perf_counter() - t)
    mx.eval(y)
    period = (time.perf_counter() - t0) / n
    return round(statistics.median(host) * 1000, 3), round(period * 1000, 3)


def _build_ms(build) -> float:
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        out = build()
        ts.append((time.perf_counter() - t0) * 1000)
        mx.eval(out)
    return round(statistics.median(ts[5:]), 3)


if __name__ == "__main__":
    main()
