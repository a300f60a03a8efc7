"""The user's path, timed side by side: convert -> load -> stream, ours against mlx-lm (and mlx-vlm).

    python -m benchmarks.e2e --size e4b --q-bits 4 --prompt 1024 --gen 128 --compare mlx-lm,mlx-vlm

Starts from a Hugging Face checkpoint of the real size with random weights (written by tests/random_checkpoint.py
unless --hf-path names one; its tensors repeat one block of random values, which changes nothing for speed),
converts it with each implementation's own converter (``convert.py``, ``mlx_lm.convert``, ``mlx_vlm.convert``) at
the same bits and group size, loads each with its own loader, and streams
the same chat prompt through each one's public ``stream_generate`` in one process: two warm-up runs each (MLX builds
kernels per shape), then --runs timed rounds taken in turns, the order alternating, so drift in the machine's load
hits all alike. Medians are reported.

Per run: TTFT (from the call to the first streamed token, as a user waits for it), prefill tok/s (prompt tokens /
TTFT), decode tok/s (tokens after the first / time after the first), and peak memory (the run's peak over what was
allocated when it started, plus the implementation's own resident weights). Random weights may emit an end-of-turn
id at any point, so every implementation is told to ignore stop ids (ours: ``stop_ids=[]``; mlx-lm / mlx-vlm: their
tokenizer's EOS set emptied): each run generates exactly --gen tokens.

--followup N times a chat's second turn: a first user turn of ~N tokens, then a 30-token message; ours through
``ChatSession.send`` (which re-renders the conversation with the chat template and prefills only what changed),
mlx-lm through ``stream_generate`` with the ``make_prompt_cache`` cache of the first turn and the new turn's tokens.
The first answer is forced (a sampler that emits a fixed sentence and end-of-turn) so that, as with a real model's
answer, it reads back through the template as the same tokens; random weights' answers would not.

--direct skips the Hugging Face checkpoint (52 GB for 26B-A4B in bfloat16; with the two 4-bit conversions it does
not fit a 64 GB disk): its weights are generated on demand and handed straight to each converter's own code, which
writes the same files it would write from that checkpoint (benchmarks/direct.py): ours through
``mlx_gemma4.conversion.convert``, mlx-lm through its loader's model class, ``sanitize``, ``quantize_model`` and
``save`` as ``mlx_lm.convert`` runs them, with the same generated weights (not its random init). Only the two
outputs (~15 GB each for 26B at 4 bits) and a few MB of settings reach the disk; ours and mlx-lm only.

    python -m benchmarks.e2e --size 26b --q-bits 4 --compare mlx-lm --direct
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Sure, here is a short answer about the fox and the dog."
WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings about rivers, mountains and "
         "the long summer evenings of a quiet town near the sea").split()


# -- checkpoints --------------------------------------------------------------------------------------------------
def make_checkpoint(size: str, out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    from tests import random_checkpoint as rc

    text, vision, audio = rc.SIZES[size]
    t0 = time.perf_counter()
    rc.write(out, text, "bfloat16", vision_config=vision, audio_config=audio, tokenizer=True, repeat_noise=True)
    print(f"# random {size} checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


SOURCE_MARK = "converted-from.txt"   # which checkpoint a conversion in the work folder was made from


def converted_from(dst: Path, src: Path) -> bool:
    """Whether ``dst`` holds a finished conversion of ``src`` (reused only then: a work folder serves several
    sizes and checkpoints)."""
    mark = dst / SOURCE_MARK
    return (dst / "config.json").exists() and mark.exists() and mark.read_text() == str(src.resolve())


def convert_all(src: Path, work: Path, impls: list[str], bits: int, group: int) -> dict[str, Path]:
    out = {}
    for impl in impls:
        dst = work / (f"{src.name}-{impl}-{bits}bit" if bits else f"{src.name}-{impl}-bf16")
        if not converted_from(dst, src):
            shutil.rmtree(dst, ignore_errors=True)
            q = ["--q-bits", str(bits), "--q-group-size", str(group)] if bits else []
            if impl == "ours":
                cmd = [sys.executable, str(ROOT / "convert.py"), "--hf-path", str(src), "--mlx-path", str(dst), *q]
            elif impl == "mlx-lm":
                cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(dst),
                       *(["-q", *q] if bits else [])]
            else:
                cmd = [sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(src), "--mlx-path", str(dst),
                       *(["-q", *q] if bits else [])]
            try:
                print(f"# {impl} converted in {_run(cmd):.0f} s", flush=True)
            except subprocess.CalledProcessError as e:
                if impl == "ours":
                    raise
                tail = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
                print(f"# {impl} could not convert: {' | '.join(tail) or e}", flush=True)
                continue
            (dst / SOURCE_MARK).write_text(str(src.resolve()))
        out[impl] = dst
    return out


# -- implementations: load, then stream one prompt -------------------------------------------------------------
class Impl:
    name = ""

    def __init__(self, path: Path):
        gc.collect()
        before = mx.get_active_memory()
        self.load(path)
        mx.eval(self.parameters())
        self.weights_gb = (mx.get_active_memory() - before) / 1e9

    note = ""  # a line about how it loaded, for the report

    def parameters(self):
        return self.model.parameters()

    def stream(self, prompt: str, gen: int):
        """Yield once per streamed response."""
        raise NotImplementedError

    def followup(self, first: str, second_turn: str, gen: int) -> float | None:
        """Seconds to the first token of a chat's second turn (None: not timed for this implementation)."""
        return None


class Ours(Impl):
    name = "ours"
    prefill_chunk = 2048   # stream_generate's default; --prefill-chunk sets it
    dense_prefill = None   # model.dense_prefill while this one streams (None: the backend's default)
    few_rows = None        # few_rows.configure's setting while this one streams (None: as the environment sets it)
    decode_attention = None   # decode_attention.ENABLED while this one streams (None: as the environment sets it)

    def load(self, path):
        from mlx_gemma4 import load

        self.model, self.processor = load(path)
        self.note = f"PLE table {self.model.ple_placement}" if self.model.ple_placement else ""

    def variant(self, name: str, **settings) -> Ours:
        """The same loaded model under another name with other ``settings`` (prefill_chunk, dense_prefill): ours-cN
        prefills in chunks of N tokens, ours-qmm on the quantized matmuls (projection.py)."""
        other = copy.copy(self)
        other.name = name
        for key, value in settings.items():
            setattr(other, key, value)
        return other

    def chat_prompt(self, text: str) -> str:
        return self.processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)

    def count(self, prompt: str) -> int:
        return int(self.processor(text=prompt)["input_ids"].size)

    def answer_ids(self) -> list[int]:
        tok = self.processor.tokenizer
        return tok.encode(ANSWER, add_special_tokens=False) + [self.processor.special.turn_close.id]

    @contextlib.contextmanager
    def _settings(self):
        """This one's settings while it runs. The few-rows and decode-attention switches are read while a step is
        traced, so a variant with its own setting loads its own model (its own compiled steps) rather than sharing
        one."""
        from mlx_gemma4 import decode_attention, few_rows

        self.model.dense_prefill = self.dense_prefill
        before = few_rows.configure(self.few_rows) if self.few_rows is not None else None
        attention_before = decode_attention.ENABLED
        if self.decode_attention is not None:
            decode_attention.ENABLED = self.decode_attention
        try:
            yield
        finally:
            if before is not None:
                few_rows.configure(before)
            decode_attention.ENABLED = attention_before

    def stream(self, prompt, gen):
        from mlx_gemma4 import stream_generate

        with self._settings():
            yield from stream_generate(self.model, self.processor, prompt, max_tokens=gen, stop_ids=[],
                                       prefill_chunk=self.prefill_chunk)

    def followup(self, first, message, gen):
        from mlx_gemma4 import ChatSession

        with self._settings():
            session = ChatSession(self.model, self.processor, prefill_chunk=self.prefill_chunk)
            forced = self.answer_ids()
            for _ in session.send(first, max_tokens=len(forced), sampler=_forcing(forced)):
                pass
            t0 = time.perf_counter()
            for _ in session.send(message, max_tokens=gen, stop_ids=[]):
                return time.perf_counter() - t0


class MlxLM(Impl):
    name = "mlx-lm"

    def load(self, path):
        import mlx_lm

        self.model, self.tokenizer = mlx_lm.load(str(path))
        self.tokenizer._eos_token_ids = set()

    def stream(self, prompt, gen):
        import mlx_lm

        yield from mlx_lm.stream_generate(self.model, self.tokenizer, prompt, max_tokens=gen)

    def followup(self, first, message, gen):
        import mlx_lm
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        tok = self.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": first}], add_generation_prompt=True,
                                         tokenize=False)
        forced = tok.encode(ANSWER, add_special_tokens=False) + [tok.convert_tokens_to_ids("<turn|>")]
        for _ in mlx_lm.stream_generate(self.model, tok, prompt, max_tokens=len(forced), prompt_cache=cache,
                                        sampler=_forcing(forced)):
            pass
        new = tok.encode(f"<turn|>\n<|turn>user\n{message}<turn|>\n<|turn>model\n", add_special_tokens=False)
        t0 = time.perf_counter()
        for _ in mlx_lm.stream_generate(self.model, tok, new, max_tokens=gen, prompt_cache=cache):
            return time.perf_counter() - t0


class MlxVLM(Impl):
    name = "mlx-vlm"

    def load(self, path):
        import mlx_vlm

        self.model, self.processor = mlx_vlm.load(str(path))
        tok = getattr(self.processor, "tokenizer", self.processor)
        for attr in ("_eos_token_ids", "eos_token_ids"):
            if hasattr(tok, attr):
                try:
                    setattr(tok, attr, set())
                except Exception:
                    pass

    def stream(self, prompt, gen):
        import mlx_vlm

        yield from mlx_vlm.stream_generate(self.model, self.processor, prompt, max_tokens=gen)


def _forcing(ids: list[int]):
    """A sampler that emits ``ids`` in turn, whatever the logits (then the last one again: a loop may sample one
    token past its end)."""
    it = itertools.chain(ids, itertools.repeat(ids[-1]))
    return lambda logprobs: mx.array([next(it)], dtype=mx.int32)


IMPLS = {"ours": Ours, "mlx-lm": MlxLM, "mlx-vlm": MlxVLM}


def timed(impl: Impl, prompt: str, gen: int, n_prompt: int) -> dict:
    gc.collect()
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    t_first = t_last = None
    n = 0
    for _ in impl.stream(prompt, gen):
        t_last = time.perf_counter()
        if t_first is None:
            t_first = t_last
            first_peak = mx.get_peak_memory()
        n += 1
    ttft = t_first - t0
    return dict(ttft_ms=ttft * 1000, prefill_tps=n_prompt / ttft,
                decode_tps=(n - 1) / (t_last - t_first) if n > 1 else float("nan"), tokens=n,
                peak_gb=impl.weights_gb + max(mx.get_peak_memory() - base, 0) / 1e9,
                prefill_peak_gb=impl.weights_gb + max(first_peak - base, 0) / 1e9)


def make_prompt(ours: Ours, n_tokens: int) -> tuple[str, int]:
    """A chat prompt of about ``n_tokens`` tokens (with the template around it) and its exact length."""
    words, k = [], 0
    while True:
        words.append(WORDS[k % len(WORDS)])
        k += 1
        if k % 16 == 0 and ours.count(ours.chat_prompt(" ".join(words))) >= n_tokens:
            break
    prompt = ours.chat_prompt(" ".join(words))
    return prompt, ours.count(prompt)


def _few_rows_settings(text: str) -> list[str]:
    from mlx_gemma4 import few_rows

    settings = [t for t in text.split(",") if t]
    for t in settings:
        if t not in few_rows.SETTINGS:
            raise argparse.ArgumentTypeError(f"{t!r} is not one of {', '.join(few_rows.SETTINGS)}")
    return settings


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="e4b",
                    help="a size of tests/random_checkpoint.py (e2b, e4b, 12b, 26b, 31b, small, 12b-small, 26b-small)")
    ap.add_argument("--hf-path", type=Path, help="an HF checkpoint to start from (default: write a random one)")
    ap.add_argument("--work", type=Path, default=Path("bench-work"), help="where checkpoints are written")
    ap.add_argument("--q-bits", type=int, default=4, help="0: unquantized bfloat16")
    ap.add_argument("--q-group-size", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=128, help="generated tokens")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs of each implementation first")
    ap.add_argument("--prefill-chunk", type=_chunks, default=[2048],
                    help="our prefill chunk (tokens): smaller chunks lower the peak, at some cost in TTFT; a "
                         "comma-separated list adds our model again under ours-cN for each further chunk N (the same "
                         "loaded weights, timed in the same interleaved rounds)")
    ap.add_argument("--quantized-prefill-too", action="store_true",
                    help="add our model again as ours-qmm, its prefill on quantized matmuls (where the backend "
                         "dequantizes by default: projection.py)")
    ap.add_argument("--few-rows-too", type=_few_rows_settings, default=[],
                    help="comma-separated MLX_GEMMA4_FEW_ROWS settings (0, 1, mma): load our model again "
                         "for each, as ours-frS, timed in the same rounds (0: every quantized matmul left to MLX)")
    ap.add_argument("--decode-attention-off-too", action="store_true",
                    help="load our model again as ours-da0 with MLX_GEMMA4_DECODE_ATTENTION=0 (attention of a few "
                         "queries left to MLX), timed in the same rounds")
    ap.add_argument("--compare", default="mlx-lm", help="comma-separated: mlx-lm, mlx-vlm ('' for ours alone)")
    ap.add_argument("--followup", type=int, default=0, help="also time a second chat turn after ~N tokens")
    ap.add_argument("--breakdown", action="store_true", help="also time the parts of our TTFT")
    ap.add_argument("--json", type=Path, help="append the results here as one JSON object")
    ap.add_argument("--direct", action="store_true",
                    help="convert generated weights without writing the HF checkpoint (ours and mlx-lm only)")
    a = ap.parse_args(argv)

    names = ["ours"] + [n for n in a.compare.split(",") if n]
    a.work.mkdir(parents=True, exist_ok=True)
    if a.direct:
        if a.hf_path or not set(names) <= {"ours", "mlx-lm"}:
            ap.error("--direct makes ours and mlx-lm's checkpoints from a --size; it takes no --hf-path or mlx-vlm")
        from benchmarks.direct import convert_all as convert_direct

        paths = convert_direct(a.size, a.work, names, a.q_bits, a.q_group_size)
    else:
        src = a.hf_path or make_checkpoint(a.size, a.work / f"hf-{a.size}")
        paths = convert_all(src, a.work, names, a.q_bits, a.q_group_size)
    impls, errors = [], {}
    for n in names:
        if n not in paths:
            errors[n] = "conversion failed"
            continue
        try:
            impls.append(IMPLS[n](paths[n]))
            if n == "ours":
                ours = impls[-1]
                ours.prefill_chunk = a.prefill_chunk[0]
                impls.extend(ours.variant(f"ours-c{c}", prefill_chunk=c) for c in a.prefill_chunk[1:])
                if a.quantized_prefill_too:
                    impls.append(ours.variant("ours-qmm", dense_prefill=False))
                for setting in a.few_rows_too:   # each its own model: its own compiled steps, traced so
                    impls.append(Ours(paths[n]).variant(f"ours-fr{setting}", prefill_chunk=a.prefill_chunk[0],
                                                        few_rows=setting))
                if a.decode_attention_off_too:
                    impls.append(Ours(paths[n]).variant("ours-da0", prefill_chunk=a.prefill_chunk[0],
                                                        decode_attention=False))
        except Exception as e:  # a peer that cannot load this checkpoint is reported, not fatal
            errors[n] = f"{type(e).__name__}: {e}"
            print(f"# {n} could not load: {errors[n]}", flush=True)
    ours = impls[0]
    prompt, n_prompt = make_prompt(ours, a.prompt)
    for impl in impls:
        for _ in range(a.warmup):
            timed(impl, prompt, min(a.gen, 16), n_prompt)
    runs: dict[str, list[dict]] = {i.name: [] for i in impls}
    for r in range(a.runs):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            runs[impl.name].append(timed(impl, prompt, a.gen, n_prompt))
            print(f"# run {r + 1} {impl.name}: " + json.dumps({k: round(v, 2) for k, v in runs[impl.name][-1].items()}),
                  flush=True)
    follow: dict[str, list[float]] = {}
    if a.followup:
        first, _ = make_prompt(ours, a.followup)
        first = first.split("<|turn>user\n", 1)[1].rsplit("<turn|>", 1)[0]
        message = " ".join(WORDS[:24])
        for r in range(a.runs):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                seconds = impl.followup(first, message, 4)
                if seconds is not None:
                    follow.setdefault(impl.name, []).append(seconds * 1000)
                    print(f"# 2nd turn {r + 1} {impl.name}: {follow[impl.name][-1]:.1f} ms", flush=True)

    if a.breakdown:
        print("# ours, TTFT parts (ms): " + json.dumps(_breakdown(ours, prompt)), flush=True)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    result = dict(size=a.size, q_bits=a.q_bits, group=a.q_group_size, prompt_tokens=n_prompt, gen=a.gen,
                  prefill_chunk=a.prefill_chunk[0],
                  runs=a.runs, device=str(mx.default_device()), machine=platform.machine(),
                  versions=_versions(names), weights_gb={i.name: round(i.weights_gb, 3) for i in impls},
                  notes={i.name: i.note for i in impls if i.note}, median=med, all=runs, errors=errors,
                  followup_ttft_ms={k: statistics.median(v) for k, v in follow.items()})
    print(_table(result))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")


def _breakdown(ours: Ours, prompt: str, runs: int = 3) -> dict:
    """Medians of the pieces of our first token: processor, prefill (to evaluated logits), sampling."""
    out: dict[str, list[float]] = {"processor": [], "prefill": [], "sample": []}
    for _ in range(runs):
        mx.synchronize()
        t0 = time.perf_counter()
        inputs = ours.processor(text=prompt)
        t1 = time.perf_counter()
        cache = ours.model.make_cache()
        logits = ours.model.prefill(inputs, cache)
        mx.eval(logits)
        t2 = time.perf_counter()
        y = mx.argmax(logits - mx.logsumexp(logits, keepdims=True))
        y.item()
        t3 = time.perf_counter()
        for k, v in zip(out, (t1 - t0, t2 - t1, t3 - t2)):
            out[k].append(v * 1000)
    return {k: round(statistics.median(v), 2) for k, v in out.items()}


def _chunks(text: str) -> list[int]:
    try:
        chunks = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token counts separated by commas, got {text!r}") from None
    if not chunks or min(chunks) < 1:
        raise argparse.ArgumentTypeError(f"chunks must be positive token counts, got {text!r}")
    return chunks


def _versions(names) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ["mlx", "mlx-cuda-13", "mlx-metal"] + [n for n in names if n != "ours"]:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _table(r: dict) -> str:
    med, base = r["median"], r["median"].get("ours")
    lines = [f"{r['size']} {r['q_bits']}-bit (group {r['group']}), prompt {r['prompt_tokens']} tokens, "
             f"{r['gen']} generated, median of {r['runs']}, {r['device']}, {r['versions']}"
             + (f", our prefill chunk {r['prefill_chunk']}" if r.get("prefill_chunk", 2048) != 2048 else ""),
             "| impl | weights GB | TTFT ms | prefill tok/s | decode tok/s | peak GB | 2nd-turn TTFT ms |",
             "|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        f, first = r["followup_ttft_ms"].get(name), m.get("prefill_peak_gb", float("nan"))
        lines.append(f"| {name} | {r['weights_gb'][name]:.2f} | {m['ttft_ms']:.0f} | {m['prefill_tps']:,.0f} | "
                     f"{m['decode_tps']:.1f} | {m['peak_gb']:.2f} ({first:.2f} at 1st token) | "
                     f"{'' if f is None else f'{f:.0f}'} |")
    ours_like = [n for n in med if n == "ours" or n.startswith("ours-")]
    for mine in ours_like if base else []:
        for name, m in med.items():
            if name in ours_like:
                continue
            b = med[mine]
            f0, f1 = r["followup_ttft_ms"].get(mine), r["followup_ttft_ms"].get(name)
            lines.append(f"{mine} / {name}: TTFT {b['ttft_ms'] / m['ttft_ms']:.2f}x, decode "
                         f"{b['decode_tps'] / m['decode_tps']:.2f}x, peak {b['peak_gb'] / m['peak_gb']:.2f}x"
                         + (f", 2nd-turn TTFT {f0 / f1:.2f}x" if f0 and f1 else ""))
    for name, note in r["notes"].items():
        lines.append(f"{name}: {note}")
    for name, err in r["errors"].items():
        lines.append(f"{name}: could not load ({err})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
