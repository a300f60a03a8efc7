"""Speed and memory benchmark of the text decoder on random weights of the real sizes, side by side with mlx-lm.

    python -m benchmarks.decoder --size e4b --q-bits 4 --prompt 1024 --gen 128 --compare mlx-lm

Both models are built directly in MLX (no checkpoint), cast to bfloat16 and quantized the same way (every Linear
and Embedding at --q-bits, group size 64: what mlx-lm does by default), then timed on the same random prompt in
one process: two warm-up runs each (MLX builds kernels per shape), then timed runs taken in turns (ours, mlx-lm,
ours, ...) so drift in the host's load hits both alike; medians are reported. Prefill is timed to the first sampled
token; decode is greedy for --gen tokens. Peak memory is each run's peak over what was allocated when it started,
plus the implementation's own weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from tests import random_checkpoint as rc

# The real text decoders (one definition, shared with the random checkpoints of the conversion benchmark).
SIZES = {"e2b": rc.E2B_TEXT, "e4b": rc.E4B_TEXT, "26b": rc.A26B_TEXT, "31b": rc.DENSE_31B_TEXT}


def _text_config(size: str) -> dict:
    if size == "tiny":
        from mlx_gemma4.demo import demo_config

        return demo_config()["text_config"]
    return dict(SIZES[size], model_type="gemma4_text")


def _prepare(model: nn.Module, bits: int | None, group_size: int) -> float:
    model.set_dtype(mx.bfloat16)
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9


def _time(prefill_fn, step_fn, prompt: mx.array, n_gen: int) -> tuple[float, float]:
    mx.synchronize()
    t0 = time.perf_counter()
    state, tok = prefill_fn(prompt)
    mx.eval(tok)
    t1 = time.perf_counter()
    for _ in range(n_gen):
        tok = step_fn(state, tok)
        mx.async_eval(tok)
    mx.eval(tok)
    t2 = time.perf_counter()
    return prompt.shape[1] / (t1 - t0), n_gen / (t2 - t1)


def _map_ple(model, bits: int | None, group_size: int) -> float:
    """Move the per-layer embedding table to a memory-mapped file, as converted E2B/E4B checkpoints load it;
    returns the GB it no longer holds on the device."""
    import tempfile

    from mlx_gemma4.ple import MappedPerLayerEmbedding, save_table

    lm = model.language_model
    table = lm.embed_tokens_per_layer
    tensors = {k: v for k, v in table.parameters().items()}
    gb = sum(v.nbytes for v in tensors.values()) / 1e9
    path = tempfile.mkdtemp(prefix="gemma4-bench-") + "/per_layer_embeddings.safetensors"
    save_table(path, tensors, lm.ple_dim**0.5, lm.ple_dim * len(lm.layers), bits or 0, group_size if bits else 0)
    lm.embed_tokens_per_layer = MappedPerLayerEmbedding(path)
    return gb


def bench_ours(size: str, bits: int | None, group_size: int, prompt: mx.array, n_gen: int,
               chunk: int, mapped_ple: bool = False) -> dict:
    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.generation import prefill
    from mlx_gemma4.model import Gemma4

    model = Gemma4(ModelConfig.from_dict(_text_config(size)))
    weights_gb = _prepare(model, bits, group_size)
    model.language_model.fuse()   # as load() leaves it
    if mapped_ple and model.language_model.ple_dim:
        weights_gb -= _map_ple(model, bits, group_size)

    def do_prefill(p):
        cache = model.make_cache()
        logits = prefill(model, {"input_ids": p}, cache, chunk_size=chunk)
        return cache, mx.argmax(logits).reshape(1, 1)

    def step(cache, tok):
        return mx.argmax(model.step(tok, cache)[:, -1], axis=-1).reshape(1, 1)

    return dict(impl="mlx-gemma4", weights_gb=weights_gb, prefill=do_prefill, step=step, model=model)


def bench_mlx_lm(size: str, bits: int | None, group_size: int, prompt: mx.array, n_gen: int,
                 chunk: int) -> dict:
    from mlx_lm.models import gemma4_text
    from mlx_lm.models.cache import make_prompt_cache

    args = {k: v for k, v in _text_config(size).items() if k != "model_type"}
    model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(args))
    weights_gb = _prepare(model, bits, group_size)

    def do_prefill(p):
        # What mlx-lm's generate_step does: chunks of `chunk` tokens into the cache, logits of the last position.
        cache = make_prompt_cache(model)
        while p.shape[1] > chunk:
            model(p[:, :chunk], cache=cache)
            mx.eval([c.state for c in cache])
            p = p[:, chunk:]
        return cache, mx.argmax(model(p, cache=cache)[:, -1], axis=-1).reshape(1, 1)

    def step(cache, tok):
        return mx.argmax(model(tok, cache=cache)[:, -1], axis=-1).reshape(1, 1)

    return dict(impl="mlx-lm", weights_gb=weights_gb, prefill=do_prefill, step=step, model=model)


def measure(impls: list[dict], prompt: mx.array, n_gen: int, runs: int = 5) -> list[dict]:
    """Warm every implementation up, then time them in turns (ours, theirs, ours, ...) so that drift in the
    host's load hits both alike; medians of ``runs``. Peak memory is each run's peak over what was allocated
    when it started (both models' weights), plus the implementation's own weights."""
    for impl in impls:
        for _ in range(2):  # MLX builds kernels (and our compiled step) per shape on first use
            _time(impl["prefill"], impl["step"], prompt, 8)
    samples: dict[str, list] = {impl["impl"]: [] for impl in impls}
    for _ in range(runs):
        for impl in impls:
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            start = mx.get_active_memory()
            p, d = _time(impl["prefill"], impl["step"], prompt, n_gen)
            samples[impl["impl"]].append((p, d, (mx.get_peak_memory() - start) / 1e9))
    out = []
    for impl in impls:
        runs_ = samples[impl["impl"]]
        out.append(dict(
            impl=impl["impl"], weights_gb=round(impl["weights_gb"], 3),
            prefill_tok_s=round(statistics.median(r[0] for r in runs_), 1),
            decode_tok_s=round(statistics.median(r[1] for r in runs_), 1),
            peak_gb=round(impl["weights_gb"] + max(r[2] for r in runs_), 3),
            device=str(mx.default_device()),
        ))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=[*SIZES, "tiny"], default="e4b")
    ap.add_argument("--q-bits", type=int, default=4, help="0 for bfloat16")
    ap.add_argument("--q-group-size", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=128, help="generated tokens")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--compare", choices=["mlx-lm"], default=None)
    ap.add_argument("--mapped-ple", action="store_true",
                    help="read the per-layer embedding table from a memory-mapped file (how converted E2B/E4B load)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per implementation (medians reported)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per implementation only")
    a = ap.parse_args(argv)
    mx.random.seed(0)
    prompt = mx.random.randint(10, 200_000 if a.size != "tiny" else 300, (1, a.prompt)).astype(mx.int32)
    bits = a.q_bits or None
    impls = [bench_ours(a.size, bits, a.q_group_size, prompt, a.gen, a.prefill_chunk, a.mapped_ple)]
    if a.compare == "mlx-lm":
        impls.append(bench_mlx_lm(a.size, bits, a.q_group_size, prompt, a.gen, a.prefill_chunk))
    results = measure(impls, prompt, a.gen, a.runs)
    for r in results:
        r.update(size=a.size, bits=a.q_bits, prompt=a.prompt, gen=a.gen)
        print(json.dumps(r), flush=True)
    if len(results) == 2 and not a.json:
        ours, ref = results
        print(f"ratios ours/mlx-lm: prefill {ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x, "
              f"decode {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x, "
              f"peak memory {ours['peak_gb'] / ref['peak_gb']:.2f}x "
              f"(ours: {ours['peak_gb'] - ours['weights_gb']:+.2f} GB over weights)")


if __name__ == "__main__":
    main()
