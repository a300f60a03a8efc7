"""Cost curve of speculative decoding with an assistant drafter, on random weights of the real sizes.

    python -m benchmarks.speculative --size e2b --q-bits 4 --prompt 1024
    python -m benchmarks.speculative --size medium --q-bits 4 --dtype float32 --prompt 256    # a CPU smoke run

Random weights cannot show a real acceptance rate, so this measures what a rate turns into. Target and drafter
are built directly in MLX (no checkpoint), cast to --dtype (bfloat16) and quantized at --q-bits (the drafter as
convert.py quantizes one: layers, head and projections; its centroid scorer kept). The drafter's own sizes are
not in the target's config: --drafter-hidden / --drafter-layers set them (its attention sizes follow the target's
K/V). After a prompt of --prompt tokens, each of these is timed (medians of --runs, after warm-up):

- ``plain``: one decode step as the token loop runs it (compiled, queued one step ahead), seconds per token;
- ``verify k``: the target on k + 1 tokens (what one round verifies), then the rewind;
- ``verify build k``: the host time to build (not run) that verification's graph: where decoding is bound by
  building the graph (MLX's GPU backends at batch 1) this, not the device, sets a round's cost;
- ``draft``: one drafter step as the loop runs it (compiled, draft_step.py; the centroid-masked head's greedy
  path), and ``draft uncompiled``: the same step built op by op (the path before the compiled one, and the one
  taken where the compiled step does not fit);
- ``draft build k``: the host time to build (not run) a round's k drafts, compiled and uncompiled;
- ``round k``: a whole round as speculative.py runs it: k drafts, the verification, one wait for the device.

From the round costs: tokens/s at acceptance rates 0.2 .. 0.9 (a round of k drafts yields (1 - a^(k+1)) / (1 - a)
tokens on average), the best k at each rate, and the break-even rate (the lowest at which some k beats plain
decoding). Then the real loop, end to end, greedy for --gen tokens: plain; with the random drafter and k chosen
automatically (it keeps almost nothing, so this is the "never slower" check); and with an oracle drafter that runs
the drafter's compute but proposes the loop's own picks (the ceiling; learnt by context over runs, see oracles.Oracle),
fixed k and automatic; then, with the target made to follow a script (a logits processor raising the script's
token, in plain and speculative runs alike), a drafter proposing the script right at each of --script-rates
(independently per draft), k automatic: the speed a real drafter of that acceptance gets from the loop as it runs
(the issue's 0.7 target, measured rather than modelled; rate 0 is the "never slower" check again), --pairs plain
and speculative runs in turns at each rate: ``vs_plain`` is the ratio of their medians, ``vs_plain_pairs`` the
median of each turn's own ratio (a busy host's slow spells fall on both runs of a turn), ``vs_plain_best`` the ratio
of the fastest of each (a host only ever slows a run down). Acceptance is per draft judged (the curve's rate).
Each speculative run is checked against plain greedy (identical, or explained by rounding: check_tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import Counter
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from benchmarks.oracles import Oracle, ScriptedOracle, forcing, learn
from mlx_gemma4 import projection
from tests import random_checkpoint as rc

SIZES = {"small": rc.SMALL_TEXT, "medium": rc.MEDIUM_TEXT, "e2b": rc.E2B_TEXT, "e4b": rc.E4B_TEXT,
         "12b": rc.UNIFIED_12B_TEXT, "12b-small": rc.UNIFIED_SMALL_TEXT}
RATES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def build(size: str, bits: int | None, group_size: int, drafter_hidden: int, drafter_layers: int, centroids: int,
          dtype: mx.Dtype = mx.bfloat16):
    from mlx_gemma4.assistant import Assistant, AssistantConfig, assistant_recipe
    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.model import Gemma4
    from mlx_gemma4.quantize import apply_quantization

    text = dict(SIZES[size])
    target = Gemma4(ModelConfig.from_dict({**text, "model_type": text.get("model_type", "gemma4_text")}))
    tc = target.config.text_config
    kinds = ["sliding_attention"] * (drafter_layers - 1) + ["full_attention"]
    drafter_text = {
        "vocab_size": tc.vocab_size, "hidden_size": drafter_hidden, "intermediate_size": 4 * drafter_hidden,
        "num_hidden_layers": drafter_layers, "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads, "head_dim": tc.head_dim,
        "global_head_dim": tc.global_head_dim, "num_global_key_value_heads": tc.num_global_key_value_heads,
        "attention_k_eq_v": tc.attention_k_eq_v, "sliding_window": tc.sliding_window, "layer_types": kinds,
    }
    drafter = Assistant(AssistantConfig.from_dict({
        "model_type": "gemma4_assistant", "text_config": drafter_text, "backbone_hidden_size": tc.hidden_size,
        "use_ordered_embeddings": centroids > 0, "num_centroids": max(centroids, 1),
        "centroid_intermediate_top_k": min(32, max(centroids, 1)),
    }))
    if centroids:
        drafter.masked_embedding.token_ordering = mx.random.permutation(tc.vocab_size).astype(mx.int32)
    for m in (target, drafter):
        m.set_dtype(dtype)
    if bits:
        nn.quantize(target, group_size=group_size, bits=bits)
        apply_quantization(drafter, assistant_recipe(drafter, bits, group_size))
    target.language_model.fuse()   # the projections joined as load() and load_assistant() leave them
    drafter.fuse()
    mx.eval(target.parameters(), drafter.parameters())
    return target, drafter


def _median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        mx.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_parts(target, drafter, prompt: mx.array, k_max: int, runs: int) -> dict:
    from mlx_gemma4.cache import restore, rewind, snapshot
    from mlx_gemma4.speculative import SpeculativeLoop, producer_caches, required_max_rewind

    # One more than a round needs: the timed rounds rewind their first token too, to start again from one state.
    cache = target.make_cache(max_rewind=required_max_rewind(target, drafter, k_max) + 1)
    target.prefill({"input_ids": prompt[:, :-1]}, cache)
    _, hidden = target.step_hidden(prompt[:, -1:], cache)
    tok = prompt[:, -1:]
    mx.eval(hidden, *[c.state for c in cache])

    def plain(n: int = 16) -> None:
        # Restored, not rewound: a ring rewound this far no longer holds the drafter's window.
        snap = snapshot(cache)
        t = tok
        for _ in range(n):
            t = mx.argmax(target.step(t, cache)[:, -1], axis=-1).reshape(1, 1)
            mx.async_eval(t)
        mx.eval(t)
        restore(cache, snap)

    producers = producer_caches(target, cache)
    steps = {True: drafter.draft_step(target, producers), False: drafter.draft_step(target, producers, False)}

    def build_seconds(k: int) -> float:
        ids = mx.repeat(tok, k + 1, axis=1)
        mx.eval(ids)
        t0 = time.perf_counter()
        out = target.step_hidden(ids, cache)
        built = time.perf_counter() - t0
        mx.eval(out)
        rewind(cache, k + 1)
        return built

    def draft(compiled: bool = True) -> None:
        mx.eval(steps[compiled](tok[0, 0], hidden))

    def draft_build_seconds(k: int, compiled: bool) -> float:
        t0 = time.perf_counter()
        step, t, h, drafts = drafter.draft_step(target, producers, compiled), tok[0, 0], hidden, []
        for _ in range(k):
            t, h = step(t, h)
            drafts.append(t)
        built = time.perf_counter() - t0
        mx.eval(drafts, h)
        return built

    loop = SpeculativeLoop(target, drafter, {"input_ids": prompt}, cache, start=0, max_tokens=2, sampler=None,
                           logits_processors=(), prefill_chunk=2048, should_stop=None, draft_tokens=k_max)

    def round_(k: int) -> None:
        r = loop._round(tok[0, 0], hidden, None, k, False)
        mx.eval(r.drafts, r.tokens, r.logprobs, r.hiddens)
        rewind(cache, k + 1)

    for fn in (plain, draft, lambda: draft(False), *(lambda k=k: round_(k) for k in range(k_max + 1))):
        fn(), fn()   # warm-up: kernels (and the compiled steps) are built per shape
    out = {"plain_s": _median_seconds(plain, runs) / 16, "draft_s": _median_seconds(draft, runs),
           "draft_uncompiled_s": _median_seconds(lambda: draft(False), runs)}
    for compiled in (True, False):
        out["draft_build_s" if compiled else "draft_build_uncompiled_s"] = {
            k: statistics.median(draft_build_seconds(k, compiled) for _ in range(runs)) for k in range(1, k_max + 1)}
    out["verify_s"] = measure_verify(target, drafter, prompt, k_max, runs)
    out["round_s"] = {k: _median_seconds(lambda k=k: round_(k), runs) for k in range(k_max + 1)}
    out["build_s"] = {k: statistics.median(build_seconds(k) for _ in range(runs)) for k in range(k_max + 1)}
    return out


def measure_verify(target, drafter, prompt: mx.array, k_max: int, runs: int) -> dict:
    """Median seconds of the target's verify of k + 1 tokens (k = 0..k_max): one forward after a prompt, the
    argmax and hidden states evaluated, then the rewind. On a cache of its own, so that it also serves the
    padded A/B (pad_from_out)."""
    from mlx_gemma4.cache import rewind
    from mlx_gemma4.speculative import required_max_rewind

    cache = target.make_cache(max_rewind=required_max_rewind(target, drafter, k_max) + 1)
    target.prefill({"input_ids": prompt[:, :-1]}, cache)
    mx.eval(target.step_hidden(prompt[:, -1:], cache), *[c.state for c in cache])
    tok = prompt[:, -1:]

    def verify(k: int) -> None:
        logits, h = target.step_hidden(mx.repeat(tok, k + 1, axis=1), cache)
        mx.eval(mx.argmax(logits, axis=-1), h)
        rewind(cache, k + 1)

    for k in range(k_max + 1):
        verify(k), verify(k)
    return {k: _median_seconds(lambda k=k: verify(k), runs) for k in range(k_max + 1)}


@contextmanager
def pad_from_out(target, value: int | None):
    """Inside, the library's few-row padding (projection.PAD_FROM_OUT: quantized projections at least this wide on
    2 to 7 rows run on them padded to 8 on CUDA; 0 all, None none), the target's compiled steps traced again."""
    saved = projection.PAD_FROM_OUT
    projection.PAD_FROM_OUT = value
    target.retrace()
    try:
        yield
    finally:
        projection.PAD_FROM_OUT = saved
        target.retrace()


def curve(parts: dict) -> tuple[list[dict], float | None]:
    """Tokens/s at each acceptance rate with the best k (k = 0 is plain decoding), and the break-even rate."""
    plain = 1 / parts["plain_s"]
    rows = []
    for a in RATES:
        rates = {k: (1 - a ** (k + 1)) / (1 - a) / s for k, s in parts["round_s"].items() if k > 0}
        best = max(rates, key=rates.get)
        rows.append({"acceptance": a, "best_k": best, "tok_s": round(rates[best], 1),
                     "vs_plain": round(rates[best] / plain, 2)})
    even = None
    for i in range(1, 100):
        a = i / 100
        if any((1 - a ** (k + 1)) / (1 - a) / s >= plain for k, s in parts["round_s"].items() if k > 0):
            even = a
            break
    return rows, even


def plain_gaps(target, prompt: mx.array, tokens: list[int]) -> tuple[list[float], list[float], list[mx.array]]:
    """Feed ``tokens`` through the plain token loop (the kernels plain decoding runs) and return, per token, how
    far its log-probability is below that step's best, the step's gap between its best two, and the step's
    log-probabilities (vocab,)."""
    forced, gaps, margins, logprobs_out = iter(tokens), [], [], []

    def sampler(logprobs: mx.array) -> mx.array:
        t = next(forced)
        top2 = mx.topk(logprobs, 2, axis=-1)
        logprobs_out.append(logprobs[0])
        gaps.append(mx.max(logprobs, axis=-1) - logprobs[:, t])
        margins.append(mx.max(top2, axis=-1) - mx.min(top2, axis=-1))
        return mx.array([t], dtype=mx.uint32)

    from mlx_gemma4.generation import generate_step
    for _ in generate_step(target, {"input_ids": prompt}, max_tokens=len(tokens), sampler=sampler):
        pass
    return [g.item() for g in gaps], [m.item() for m in margins], logprobs_out


def one_pass(target, prompt: mx.array, tokens: list[int], i: int) -> mx.array:
    """Log-probabilities for ``tokens[i]`` from one forward pass over the prompt and ``tokens[:i]``."""
    ids = mx.concatenate([prompt, mx.array([tokens[:i]], dtype=prompt.dtype)], axis=1) if i else prompt
    logits = target.prefill({"input_ids": ids}, target.make_cache()).astype(mx.float32)
    return logits - mx.logsumexp(logits, keepdims=True)


def check_tokens(target, prompt: mx.array, greedy: list[int], tokens: list[int], logprobs: list[mx.array],
                 tol: float) -> dict:
    """Speculative greedy against plain greedy. Identical is the expectation; where the kernels of a k+1-token
    verification round differently from a one-token step, a near-tie can flip, and the outputs part. Then every
    emitted token is checked against the plain loop fed the same tokens (its gap below that loop's best), and at
    those steps and a sample of others both loops' log-probabilities are compared with one forward pass over the
    same tokens (another kernel path again): rounding puts the speculative loop about as close to that pass as the
    plain loop is; a wrong cache or mask would put it far off. It passes if every gap is within ``tol``, or if the
    speculative loop is no farther from the one-pass forward than 1.5x the plain loop is."""
    if tokens == greedy:
        return {"identical": True}
    gaps, margins, plain_lp = plain_gaps(target, prompt, tokens)
    off = [(i, round(g, 4)) for i, g in enumerate(gaps) if g > 0]
    keep = set(range(0, len(tokens), max(1, len(tokens) // 8))) | {i for i, _ in off[:8]}
    d_plain = d_spec = 0.0
    for i in sorted(keep):
        ref = one_pass(target, prompt, tokens, i)
        d_plain = max(d_plain, mx.max(mx.abs(plain_lp[i].astype(mx.float32) - ref)).item())
        d_spec = max(d_spec, mx.max(mx.abs(logprobs[i].reshape(-1).astype(mx.float32) - ref)).item())
    worst = max(g for _, g in off)
    report = {"identical": False,
              "first_difference": next(i for i, (a, b) in enumerate(zip(tokens, greedy)) if a != b),
              "not_plain_best": off, "worst_gap": worst, "median_top2_margin": round(statistics.median(margins), 4),
              "steps_vs_one_pass": len(keep), "plain_vs_one_pass": round(d_plain, 4),
              "speculative_vs_one_pass": round(d_spec, 4)}
    assert worst <= tol or d_spec <= 1.5 * d_plain, f"speculative output is not plain greedy beyond rounding: {report}"
    return report


def end_to_end(target, drafter, prompt: mx.array, n_gen: int, k_fixed: int, tol: float,
               rates: tuple[float, ...] = (), script_rates: tuple[float, ...] = (), oracles: bool = True,
               pairs: int = 3) -> dict:
    from mlx_gemma4.generation import generate_step

    inputs = {"input_ids": prompt}

    def run(seed: int = 0, **kw) -> tuple[float, list[int], object, list[mx.array]]:
        tokens, logprobs, t_first = [], [], None
        if isinstance(kw.get("assistant"), Oracle):
            kw["assistant"].restart(tokens, seed)
        loop = generate_step(target, inputs, max_tokens=n_gen, **kw)
        lengths = getattr(loop, "lengths", None)
        if lengths is not None:   # count this run's rounds of each draft length (the policy's choices)
            loop.rounds_by_k = counts = Counter()
            record = type(lengths).record
            lengths.record = lambda k, *a: (counts.update([k]), record(lengths, k, *a))
        for t, lp in loop:
            tokens.append(t)
            logprobs.append(lp)
            if t_first is None:
                t_first = time.perf_counter()
        return (len(tokens) - 1) / (time.perf_counter() - t_first), tokens, loop, logprobs

    # Warm-up: the first runs trace the compiled steps at each length the policy tries and at each cache size the
    # runs reach, and compile their kernels (MLX keeps those on disk), which a chat pays once per process.
    run()
    for _ in range(3):
        run(assistant=drafter)
    # Plain and the random drafter (automatic k) in turns, medians: the floor is a few percent, within a
    # host's run-to-run spread.
    plains, randoms = [], []
    for _ in range(3):
        plains.append(run())
        randoms.append(run(assistant=drafter))
    plain_tps = statistics.median(r[0] for r in plains)
    greedy = plains[0][1]
    random_auto = sorted(randoms, key=lambda r: r[0])[1]
    out = {"plain_tok_s": round(plain_tps, 1), "plain_runs": [round(r[0], 1) for r in plains],
           "random_auto_runs": [round(r[0], 1) for r in randoms]}

    def report(name: str, tps: float, tokens: list[int], loop, logprobs: list[mx.array], **extra) -> None:
        lengths = loop.lengths
        out[name] = {"tok_s": round(tps, 1), "vs_plain": round(tps / plain_tps, 2),
                     "acceptance": round(loop.accepted / loop.judged, 2) if loop.judged else None,
                     "kept_of_drafted": round(loop.accepted / loop.drafted, 2) if loop.drafted else None,
                     "drafted": loop.drafted, "rounds_by_k": dict(sorted(loop.rounds_by_k.items())),
                     "policy_costs_ms": {k: round(v * 1e3, 2) for k, v in sorted(lengths.seconds.items())},
                     "policy_acceptance": round(lengths.acceptance, 3), **extra,
                     "check": check_tokens(target, prompt, greedy, tokens, logprobs, tol)}
        print(json.dumps({name: out[name]}), flush=True)

    report("random_auto", *random_auto)
    # The oracle proposes the tokens the speculative loop itself picks. Where its verification rounds differently
    # from a plain step (low precision), plain greedy tokens stop being its picks after the first near-tie, and
    # with k automatic the rounds fall at other positions in every run (the costs it measures decide k): so each
    # run's picks are added to what the oracle knows, and runs go on until one picks nothing it did not know.
    known: dict[tuple[int, ...], int] = {}
    learn(known, greedy)
    learn(known, random_auto[1])

    def oracle(name: str, rate: float = 1.0, **kw) -> None:
        # One oracle for all runs at a rate: with k automatic its policy (automatic_policy, one per drafter and
        # target) carries over from run to run, as it does for the random drafter and across a chat's turns.
        drafting = Oracle(drafter, known, prompt.shape[1], rate)
        learn(known, run(assistant=drafting, **kw)[1])   # warm-up, which teaches the oracle too
        for runs in range(1, 9):
            result = run(assistant=drafting, seed=runs, **kw)
            if learn(known, result[1]):
                break
        report(name, *result, runs_to_own_sequence=runs, blind=drafting.blind)

    if oracles:
        oracle(f"oracle_k{k_fixed}", draft_tokens=k_fixed)
        oracle("oracle_auto")
    # The oracle right only at a given rate (independently per draft): the automatic k at that acceptance.
    for rate in rates:
        oracle(f"oracle_{rate}_auto", rate)
    if script_rates:
        scripted(out, run, drafter, prompt, n_gen, script_rates, pairs)
    return out


def scripted(out: dict, run, drafter, prompt: mx.array, n_gen: int, rates: tuple[float, ...],
             pairs: int = 3) -> None:
    """Plain and speculative runs (k automatic) with the target made to follow a script (``forcing``) and the
    drafter right at each rate (``ScriptedOracle``): plain and speculative in turns, ``pairs`` of each (see the
    module's docstring for the three ratios). Both outputs must be the script."""
    vocab = drafter.config.text_config.vocab_size
    rng = random.Random(1)
    script = [rng.randrange(10, vocab - 10) for _ in range(n_gen + 72)]
    force = [forcing(script, prompt.shape[1], vocab)]
    run(logits_processors=force)   # warm-up
    plains = []
    for rate in rates:
        drafting = ScriptedOracle(drafter, script, prompt.shape[1], rate)
        for _ in range(3):   # warm-up: the policy (one per drafter object) learns the rate and the costs
            run(assistant=drafting, logits_processors=force)
        results, turn = [], []
        for _ in range(pairs):
            turn.append(run(logits_processors=force))
            results.append(run(assistant=drafting, logits_processors=force))
        plains += turn
        for r in turn + results:
            assert r[1] == script[:n_gen], "a forced run left the script"
        plain_tps = statistics.median_low(r[0] for r in turn)
        tps, _, loop, _ = sorted(results, key=lambda r: r[0])[(len(results) - 1) // 2]
        out[f"scripted_{rate}_auto"] = row = {
            "tok_s": round(tps, 1), "plain_tok_s": round(plain_tps, 1), "vs_plain": round(tps / plain_tps, 2),
            "vs_plain_pairs": round(statistics.median(r[0] / p[0] for r, p in zip(results, turn)), 2),
            "vs_plain_best": round(max(r[0] for r in results) / max(p[0] for p in turn), 2),
            "runs": [round(r[0], 1) for r in results], "plain_runs": [round(r[0], 1) for r in turn],
            "acceptance": round(loop.accepted / loop.judged, 2) if loop.judged else None,
            "drafted": loop.drafted, "rounds_by_k": dict(sorted(loop.rounds_by_k.items())),
            "policy_costs_ms": {k: round(v * 1e3, 2) for k, v in sorted(loop.lengths.seconds.items())},
            "policy_acceptance": round(loop.lengths.acceptance, 3)}
        print(json.dumps({f"scripted_{rate}_auto": row}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="e2b")
    ap.add_argument("--q-bits", type=int, default=4, help="0 for bfloat16")
    ap.add_argument("--q-group-size", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens before the timed steps")
    ap.add_argument("--gen", type=int, default=128, help="tokens of each end-to-end run")
    ap.add_argument("--k-max", type=int, default=6, help="largest draft length timed")
    ap.add_argument("--drafter-hidden", type=int, default=512)
    ap.add_argument("--drafter-layers", type=int, default=4)
    ap.add_argument("--centroids", type=int, default=2048, help="masked-head clusters (0: a plain tied head)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="dtype of the weights (and of quantization scales); float32 for MLX's CPU backend")
    ap.add_argument("--runs", type=int, default=7, help="timed repetitions (medians reported)")
    ap.add_argument("--pairs", type=int, default=3, help="plain and speculative runs in turns at each --script-rates")
    ap.add_argument("--rates", default="",
                    help="acceptance rates at which an oracle of the loop's own picks, right that often, runs end "
                         "to end (automatic k); in low precision near-ties part it from what it learnt: see "
                         "--script-rates")
    ap.add_argument("--script-rates", default="0,0.3,0.5,0.7,0.9,1.0",
                    help="acceptance rates at which a drafter right that often runs end to end (automatic k), with "
                         "the target made to follow a script (both plain and speculative runs)")
    ap.add_argument("--ab-verify-pad", action="store_true",
                    help="also time the verify with no quantized projection on 2-7 rows padded to 8 (MLX's CUDA "
                         "backend runs fewer than 8 rows as one matrix-vector pass each) and with all of them padded "
                         "(the library pads those at least projection.PAD_FROM_OUT wide)")
    ap.add_argument("--pad-from-out", type=int, default=None,
                    help="set projection.PAD_FROM_OUT for the whole run (-1: pad none)")
    ap.add_argument("--no-end-to-end", action="store_true", help="time the parts only")
    ap.add_argument("--no-oracle", action="store_true",
                    help="end to end, skip the oracle of the loop's own picks (k fixed and automatic)")
    ap.add_argument("--tol", type=float, default=0.25,
                    help="log-probability gap below plain decoding's best that counts as a rounding tie")
    a = ap.parse_args(argv)
    if a.pad_from_out is not None:
        projection.PAD_FROM_OUT = None if a.pad_from_out < 0 else a.pad_from_out
    mx.random.seed(0)
    target, drafter = build(a.size, a.q_bits or None, a.q_group_size, a.drafter_hidden, a.drafter_layers,
                            a.centroids, getattr(mx, a.dtype))
    vocab = target.config.text_config.vocab_size
    prompt = mx.random.randint(10, vocab - 10, (1, a.prompt)).astype(mx.int32)
    parts = measure_parts(target, drafter, prompt, a.k_max, a.runs)
    rows, even = curve(parts)
    head = dict(size=a.size, bits=a.q_bits, dtype=a.dtype, prompt=a.prompt, device=str(mx.default_device()),
                pad_from_out=projection.PAD_FROM_OUT,
                plain_ms=round(parts["plain_s"] * 1e3, 2), draft_ms=round(parts["draft_s"] * 1e3, 2),
                draft_uncompiled_ms=round(parts["draft_uncompiled_s"] * 1e3, 2),
                draft_build_ms={k: round(v * 1e3, 2) for k, v in parts["draft_build_s"].items()},
                draft_build_uncompiled_ms={k: round(v * 1e3, 2) for k, v in parts["draft_build_uncompiled_s"].items()},
                verify_ms={k: round(v * 1e3, 2) for k, v in parts["verify_s"].items()},
                round_ms={k: round(v * 1e3, 2) for k, v in parts["round_s"].items()},
                verify_build_ms={k: round(v * 1e3, 2) for k, v in parts["build_s"].items()}, break_even=even)
    if a.ab_verify_pad:
        for label, value in (("verify_ms_unpadded", None), ("verify_ms_padded_all", 0)):
            with pad_from_out(target, value):
                timed = measure_verify(target, drafter, prompt, a.k_max, a.runs)
            head[label] = {k: round(v * 1e3, 2) for k, v in timed.items()}
    print(json.dumps(head), flush=True)
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.no_end_to_end:
        return
    print(json.dumps({"end_to_end": end_to_end(target, drafter, prompt, a.gen, min(4, a.k_max), a.tol,
                                                        tuple(float(r) for r in a.rates.split(",") if r),
                                                        tuple(float(r) for r in a.script_rates.split(",") if r),
                                                        not a.no_oracle, a.pairs)}),
          flush=True)


if __name__ == "__main__":
    main()
