"""Generation: chunked prefill, an overlapped decode loop, sampling, stop rules, streaming text and stats.

Three layers, each usable on its own:
- ``generate_step`` is the token loop: prefill, then one token at a time, with the sampler and logits processors
  the caller injects (mlx-lm's ``make_sampler`` / ``make_logits_processors`` or any callables). It yields
  ``(token, logprobs)`` and knows nothing about text.
- ``stream_tokens`` adds stop ids, streaming text (mlx-lm's detokenizer, built once per tokenizer) and stats.
- ``stream_generate`` / ``generate`` add the processor: prompt string + media in, text out.

Samplers, logits processors and the streaming detokenizer come from mlx-lm. Prefill runs the prompt through the
decoder in chunks; chunks before the last skip the KV-shared layers entirely (they write no cache and their
output is not read), and the last chunk computes logits for its final position only.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

from .cache import KVCache
from .checks import (_STREAM_KWARGS, check_assistant_args, check_generation_kwargs, check_model_and_processor,
                     check_policies, check_positive_int, check_sampling_args, check_start)
from .errors import InputError
from .sampling import make_policies, pick, read_token


@dataclass
class GenerationResponse:
    text: str                       # the new piece of text (may be empty while a character is incomplete)
    token: int                      # -1 only in the one response of a run stopped before its first token
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float                     # seconds from the call to the first token
    peak_memory_gb: float
    finish_reason: str | None = None  # None while streaming, then "stop" | "length" | "context" | "cancelled"
    drafted_tokens: int = 0         # with an assistant: tokens drafted so far in this run
    accepted_tokens: int = 0        # ... and how many of them the model kept


@dataclass
class PromptEnd:
    """What a prompt's prefill leaves besides the cache: the logits (vocab,) at its last position, before any
    logits processor or sampler, and (from the speculative loop) the final hidden state (1, 1, hidden) that a
    drafter starts from. Passed back as ``prefilled=`` with a cache that holds the whole prompt again, it stands
    in for the prefill, so answering the same prompt again computes no prompt token."""

    logits: mx.array
    hidden: mx.array | None = None


def prefill(model, inputs: dict[str, Any], cache: list[KVCache], chunk_size: int = 2048,
            start: int = 0, progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> mx.array | None:
    """Run ``inputs["input_ids"][:, start:]`` through the model into ``cache``; logits (vocab,) of the last token.

    ``start`` > 0 means the first ``start`` tokens are already in the cache; media for them must not be in
    ``inputs`` (see ChatSession). ``progress(done, total)`` is called before the first chunk and after each one.
    ``should_stop()`` is asked before each chunk; when it turns true the prefill stops there and returns None.
    A prompt that does not fit in the context raises ContextLengthError before any work.
    """
    check_positive_int("prefill_chunk", chunk_size)
    return model.prefill(inputs, cache, chunk_size=chunk_size, start=start, progress=progress,
                         should_stop=should_stop)


def peak_gb() -> float:
    """MLX's peak allocation since the last ``mx.reset_peak_memory()``, in GB (0 where a backend does not track it;
    the app then shows the process's RSS, labelled as such)."""
    try:
        return mx.get_peak_memory() / 1e9
    except Exception:  # some backends do not track it
        return 0.0


def cancelled_response(prompt_tokens: int, ttft: float = 0.0) -> GenerationResponse:
    """The one response of a run stopped before its first token."""
    return GenerationResponse("", -1, prompt_tokens=prompt_tokens, prompt_tps=0.0, generation_tokens=0,
                              generation_tps=0.0, ttft=ttft, peak_memory_gb=peak_gb(), finish_reason="cancelled")


# -- the token loop ----------------------------------------------------------------------------------------------
def why_finished(n: int, max_tokens: int, model, cache: list[KVCache], should_stop: Callable | None) -> str | None:
    """Whether a token loop ends with its ``n``-th token, and why: "length", "context", "cancelled" (or None)."""
    if n >= max_tokens:
        return "length"
    if model.context_left(cache) < 1:
        return "context"
    if should_stop is not None and should_stop():
        return "cancelled"
    return None


class TokenLoop:
    """Iterating yields ``(token, logprobs)``; ``finish_reason`` is set just before the last token is yielded
    ("length", "context" or "cancelled"; None while more follow). See ``generate_step``."""

    def __init__(self, model, inputs: dict[str, Any], cache: list[KVCache] | None, *, start: int, max_tokens: int,
                 sampler: Callable[[mx.array], mx.array] | None,
                 logits_processors: Sequence[Callable[[mx.array, mx.array], mx.array]], prefill_chunk: int,
                 should_stop: Callable[[], bool] | None,
                 progress: Callable[[int, int], None] | None = None,
                 on_prefilled: Callable[[PromptEnd], None] | None = None, prefilled: PromptEnd | None = None,
                 seed: int | None = None):
        check_positive_int("max_tokens", max_tokens)
        check_positive_int("prefill_chunk", prefill_chunk)
        self.model, self.inputs, self.start = model, inputs, start
        self.cache = model.make_cache() if cache is None else cache
        self.prefilled = check_prefilled(inputs, self.cache, prefilled)
        self.max_tokens, self.prefill_chunk, self.should_stop = max_tokens, prefill_chunk, should_stop
        self.progress, self.on_prefilled = progress, on_prefilled
        self.sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
        self.processors = list(logits_processors)
        self.seed = seed   # draws keyed by the seed and the position (sampling.reseed)
        self.finish_reason: str | None = None
        self.fed = 0  # how many of the yielded tokens have gone into the model (so are in the cache)

    def __iter__(self) -> Iterator[tuple[int, mx.array]]:
        model, cache, processors = self.model, self.cache, self.processors
        vocab = model.config.text_config.vocab_size
        history = mx.array(np.array(self.inputs["input_ids"]).reshape(-1), dtype=mx.int32) if processors else None

        if self.prefilled is None:
            logits = prefill(model, self.inputs, cache, self.prefill_chunk, self.start, self.progress,
                             self.should_stop)
        else:  # the cache holds the whole prompt; asked once, as a prefill would be
            stopped = self.should_stop is not None and self.should_stop()
            logits = None if stopped else self.prefilled.logits
        if logits is None:  # stopped during prefill: no token
            self.finish_reason = "cancelled"
            return
        y, logprobs = pick(logits, history, processors, self.sampler, self.seed, cache[0].offset)
        mx.async_eval(y, logprobs)
        if self.on_prefilled is not None:
            self.on_prefilled(PromptEnd(logits))
        n = 0
        while True:
            n += 1
            self.finish_reason = why_finished(n, self.max_tokens, model, cache, self.should_stop)
            if self.finish_reason is None and n > 1:
                next_y, next_logprobs, history = self._queue(model, cache, y, history)
                self.fed = n
            yield read_token(y, vocab), logprobs
            if self.finish_reason is not None:
                return
            if n == 1:  # the first token went out before its step was built: it is what a user waits for
                next_y, next_logprobs, history = self._queue(model, cache, y, history)
                self.fed = 1
            y, logprobs = next_y, next_logprobs

    def _queue(self, model, cache, y: mx.array, history: mx.array | None):
        """Build and queue the step that feeds ``y``; its sampled token and log-probs (and the grown history)."""
        if self.processors:  # only logits processors read the history; keep the plain loop free of it
            history = mx.concatenate([history, y[None].astype(mx.int32)])
        logits = model.step(y.reshape(1, 1), cache)[0, -1]   # (it writes y: the offset is the new token's position)
        next_y, next_logprobs = pick(logits, history, self.processors, self.sampler, self.seed, cache[0].offset)
        mx.async_eval(next_y, next_logprobs)
        return next_y, next_logprobs, history


def check_prefilled(inputs: dict[str, Any], cache: list[KVCache] | None, prefilled: Any) -> PromptEnd | None:
    """``prefilled`` as a PromptEnd (a bare logits array is taken as one), checked against what ``cache`` holds."""
    if prefilled is None:
        return None
    if isinstance(prefilled, mx.array):
        prefilled = PromptEnd(prefilled)
    if not isinstance(prefilled, PromptEnd):
        raise InputError(f"prefilled must be a PromptEnd (what on_prefilled was given) or its logits array; got "
                         f"{type(prefilled).__name__}.")
    n = int(np.array(inputs["input_ids"]).size)
    held = cache[0].offset if cache else 0
    if held != n:
        raise InputError(f"prefilled stands for a prompt already in the cache, but the cache holds {held} tokens and "
                         f"the prompt has {n}. Restore the cache the logits came with, or leave prefilled out.")
    return prefilled


def generate_step(
    model,
    inputs: dict[str, Any],
    cache: list[KVCache] | None = None,
    *,
    start: int = 0,
    max_tokens: int = 256,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: Sequence[Callable[[mx.array, mx.array], mx.array]] = (),
    prefill_chunk: int = 2048,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_prefilled: Callable[[PromptEnd], None] | None = None,
    prefilled: PromptEnd | mx.array | None = None,
    assistant=None,
    draft_tokens: int | None = None,
    seed: int | None = None,
):
    """The token loop: iterate it for ``(token, logprobs)``, up to ``max_tokens`` tokens after the prompt.

    ``sampler`` maps log-probabilities (1, vocab) to a token (1,); greedy when None. Each logits processor is
    called as ``p(history, logits)`` with the token history (prompt and generated, int32) and logits (1, vocab),
    as in mlx-lm. ``cache`` (``model.make_cache()`` when None) already holds the first ``start`` prompt tokens.
    The loop ends after ``max_tokens`` tokens, when the context is full, or when ``should_stop()`` turns true
    (checked between prefill chunks and before each step is queued; stopped during prefill, it yields nothing);
    the returned loop's ``finish_reason`` says which. ``progress(done, total)`` reports prefill progress;
    ``on_prefilled(end)`` is called once the whole prompt is in the cache, before the first decode step, with the
    prompt's PromptEnd (a chat snapshots the cache there and keeps ``end``). ``prefilled`` (such a PromptEnd, or
    its logits) says ``cache`` already holds the whole prompt: nothing is prefilled and the first token comes from
    those logits (logits processors still see the whole prompt as history). Every yielded token
    but the last has been fed to the model, so the cache then holds the prompt plus all yielded tokens but the
    last (a caller that stops iterating early: see ``loop.fed``).

    From the second token on, the next step is queued before the current token is handed out, so building step
    n+1 overlaps evaluating step n (the loop waits on the device only for the token it yields); the first token is
    handed out as soon as it exists. ``loop.fed`` counts the yielded tokens that are in the cache.

    With ``assistant`` (a drafter from ``load_assistant``) the loop decodes speculatively (speculative.py): the
    same tokens for the same sampler, ``draft_tokens`` drafts per round (None: chosen as it goes), and
    ``loop.drafted`` / ``loop.accepted`` count drafted and kept tokens. A given ``cache`` then needs sliding rings
    that can rewind a round (``model.make_cache(max_rewind=...)``; the error says how much).

    ``seed`` keys each position's random draw by the seed and the position (sampling.reseed): the same seed gives
    the same tokens, with or without a drafter.
    """
    check_policies(sampler=sampler, logits_processors=logits_processors, should_stop=should_stop, progress=progress,
                   on_prefilled=on_prefilled)
    model.check_cache(cache)
    if prefilled is None:
        check_start(inputs, cache, start)
    if assistant is not None:
        from .speculative import SpeculativeLoop

        return SpeculativeLoop(model, assistant, inputs, cache, start=start, max_tokens=max_tokens, sampler=sampler,
                               logits_processors=logits_processors, prefill_chunk=prefill_chunk,
                               should_stop=should_stop, progress=progress, on_prefilled=on_prefilled,
                               prefilled=prefilled, draft_tokens=draft_tokens, seed=seed)
    if draft_tokens is not None:
        raise InputError("draft_tokens is set but no assistant was given; pass assistant=load_assistant(DIR).")
    return TokenLoop(model, inputs, cache, start=start, max_tokens=max_tokens, sampler=sampler,
                     logits_processors=logits_processors, prefill_chunk=prefill_chunk, should_stop=should_stop,
                     progress=progress, on_prefilled=on_prefilled, prefilled=prefilled, seed=seed)


def stream_tokens(
    model,
    processor,
    inputs: dict[str, Any],
    cache: list[KVCache] | None = None,
    *,
    start: int = 0,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
    prefill_chunk: int = 2048,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: Sequence[Callable[[mx.array, mx.array], mx.array]] | None = None,
    stop_ids: Sequence[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_token: Callable[[int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_prefilled: Callable[[PromptEnd], None] | None = None,
    prefilled: PromptEnd | mx.array | None = None,
    started: float | None = None,
    prompt_tokens: int | None = None,
    assistant=None,
    draft_tokens: int | None = None,
) -> Iterator[GenerationResponse]:
    """The generation loop over an already-processed prompt, with text and stats.

    ``started`` (a ``time.perf_counter()`` value) is when the caller began this turn's work, so TTFT and
    prompt tok/s include what it did before (a chat session's earlier prefill pass); ``prompt_tokens`` is the
    prompt size to report (default: the tokens this call prefills).

    ``sampler`` / ``logits_processors`` replace the ones built from the sampling settings. ``on_token`` sees
    every token that went through the model (so is in the cache). ``progress(done, total)`` reports prefill;
    ``on_prefilled``, ``prefilled`` (then no prompt token is computed), ``assistant`` and ``draft_tokens`` as in
    ``generate_step``.
    Stopped by ``should_stop`` before the first token, it yields one response with no text, ``token`` -1 and
    ``finish_reason`` "cancelled".
    """
    t0 = time.perf_counter() if started is None else started
    owner = threading.get_ident()
    check_sampling_args(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
                        seed=seed, prefill_chunk=prefill_chunk)
    check_policies(sampler=sampler, logits_processors=logits_processors, stop_ids=stop_ids, should_stop=should_stop,
                   on_token=on_token, progress=progress, on_prefilled=on_prefilled)
    if cache is None and assistant is None:   # the speculative loop makes its own, with rings that rewind a round
        cache = model.make_cache()
    default_sampler, default_processors = make_policies(temperature, top_p, top_k, min_p, repetition_penalty,
                                                        repetition_context_size,
                                                        vocab_size=model.config.text_config.vocab_size)
    stop = set(stop_ids if stop_ids is not None else default_stop_ids(model, processor))
    if prompt_tokens is not None:
        n_prompt = prompt_tokens
    else:
        n_prompt = 0 if prefilled is not None else int(np.array(inputs["input_ids"]).size) - start
    make = getattr(processor.tokenizer, "make_detokenizer", None)
    detok = make() if make else NaiveStreamingDetokenizer(processor.tokenizer)
    steps = generate_step(model, inputs, cache, start=start, max_tokens=max_tokens,
                          sampler=sampler or default_sampler,
                          logits_processors=default_processors if logits_processors is None else logits_processors,
                          prefill_chunk=prefill_chunk, should_stop=should_stop, progress=progress,
                          on_prefilled=on_prefilled, prefilled=prefilled, assistant=assistant,
                          draft_tokens=draft_tokens, seed=seed)
    ttft = prompt_tps = 0.0
    t_first = None
    n = 0
    seen: list[int] = []
    reported = 0
    for token, _ in steps:
        n += 1
        seen.append(token)
        if on_token is not None:
            while reported < steps.fed:  # what the loop has queued into the model is in the cache
                on_token(seen[reported])
                reported += 1
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            ttft = now - t0
            prompt_tps = n_prompt / max(ttft, 1e-9)
        stats = dict(prompt_tokens=n_prompt, prompt_tps=prompt_tps, generation_tokens=n,
                     generation_tps=(n - 1) / max(now - t_first, 1e-9) if n > 1 else 0.0,
                     ttft=ttft, peak_memory_gb=peak_gb(), drafted_tokens=getattr(steps, "drafted", 0),
                     accepted_tokens=getattr(steps, "accepted", 0))
        if token in stop:
            detok.finalize()
            yield GenerationResponse(detok.last_segment, token, finish_reason="stop", **stats)
            return
        detok.add_token(token)
        if steps.finish_reason is None:
            yield GenerationResponse(detok.last_segment, token, **stats)
            if threading.get_ident() != owner:
                raise InputError(ON_ANOTHER_THREAD)
            continue
        detok.finalize()
        yield GenerationResponse(detok.last_segment, token, finish_reason=steps.finish_reason, **stats)
        return
    if n == 0 and steps.finish_reason == "cancelled":
        yield cancelled_response(n_prompt)


# MLX's streams belong to the thread that made them: a generation read on from another thread failed in MLX ("There
# is no Stream(cpu, 1) in current thread"), as a web framework's streaming response does with a plain generator.
ON_ANOTHER_THREAD = ("This generation was started on another thread. MLX runs a generation's work on the thread "
                     "that started it: read it to the end there (in a web server, run the whole loop in one worker "
                     "thread and pass its pieces on through a queue).")


def default_stop_ids(model, processor) -> list[int]:
    """The ids that end an answer when the caller gives no ``stop_ids``: the model's and the processor's eos."""
    ids = set(model.config.text_config.eos_token_ids)
    ids.update(getattr(processor, "eos_token_ids", None) or [])
    return sorted(ids)


def stream_generate(model, processor, prompt: str, images=None, audio=None, videos=None, *,
                    max_soft_tokens: int | None = None, sampling_rate: int | None = None,
                    **kwargs) -> Iterator[GenerationResponse]:
    """Stream the answer to ``prompt`` (used verbatim: no chat template is applied here).

    ``max_soft_tokens`` sets the image (and video frame) token budget; ``sampling_rate`` is the rate of audio
    given as arrays (default 16 kHz); the other keywords are those of ``stream_tokens`` (sampling settings,
    ``max_tokens``, ``stop_ids``, ``should_stop``, ...). Arguments are checked before any work is done.
    """
    kwargs.setdefault("started", time.perf_counter())   # TTFT counts the media preprocessing, as a chat's does
    check_model_and_processor(model, processor, "stream_generate")
    check_generation_kwargs(kwargs, _STREAM_KWARGS, "stream_generate")
    check_assistant_args(model, kwargs.get("assistant"), kwargs.get("draft_tokens"))
    given = {"image": images, "audio": audio, "video": videos}
    model.check_media(k for k, v in given.items() if v is not None and not (isinstance(v, (list, tuple)) and not v))
    rate = {} if sampling_rate is None else {"sampling_rate": sampling_rate}
    mx.reset_peak_memory()   # the peak of this call, not of everything the process did before it
    inputs = processor(text=prompt, images=images, audio=audio, videos=videos, max_soft_tokens=max_soft_tokens,
                       **rate)
    yield from stream_tokens(model, processor, inputs, **kwargs)


def generate(model, processor, prompt: str, images=None, audio=None, videos=None, *, verbose: bool = False,
             **kwargs) -> str:
    """The whole answer to ``prompt`` as one string. ``verbose`` prints the text as it streams and the stats of
    the run. Takes the keywords of ``stream_generate``."""
    text, last = [], None
    for r in stream_generate(model, processor, prompt, images=images, audio=audio, videos=videos, **kwargs):
        text.append(r.text)
        if verbose:
            print(r.text, end="", flush=True)
        last = r
    if verbose and last is not None:
        print()
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s (first token after "
              f"{last.ttft * 1000:.0f} ms)")
        print(f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s "
              f"({last.finish_reason})")
        print(f"peak memory: {last.peak_memory_gb:.2f} GB")
    return "".join(text)
