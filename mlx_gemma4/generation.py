"""Generation: chunked prefill, an overlapped decode loop, sampling, stop rules, streaming text and stats.

Samplers, logits processors and the streaming detokenizer come from mlx-lm. Prefill runs the prompt through the
decoder in chunks; chunks before the last skip the KV-shared layers entirely (they write no cache and their
output is not read), and the last chunk computes logits for its final position only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

from .cache import KVCache
from .errors import ContextLengthError

logger = logging.getLogger(__name__)

_MEDIA_KEYS = ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids",
               "input_features", "input_features_mask")


@dataclass
class GenerationResponse:
    text: str                       # the new piece of text (may be empty while a character is incomplete)
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float                     # seconds from the call to the first token
    peak_memory_gb: float
    finish_reason: str | None = None  # None while streaming, then "stop" | "length" | "cancelled"

    @property
    def peak_memory(self) -> float:
        """Peak memory in GB (mlx-lm's name for it)."""
        return self.peak_memory_gb


def _chunk_ends(L: int, chunk: int, vision_blocks: np.ndarray | None) -> list[int]:
    """Chunk end positions; a chunk never ends inside an image or video-frame block (its tokens attend to each
    other bidirectionally and must be in the same chunk)."""
    ends, s = [], 0
    while s < L:
        e = min(s + chunk, L)
        if vision_blocks is not None:
            while e < L and vision_blocks[e] >= 0 and vision_blocks[e] == vision_blocks[e - 1]:
                e += 1
        ends.append(e)
        s = e
    return ends


def prefill(model, inputs: dict[str, Any], cache: list[KVCache], chunk_size: int = 2048,
            start: int = 0) -> mx.array:
    """Run ``inputs["input_ids"][:, start:]`` through the model into ``cache``; logits (vocab,) of the last token.

    ``start`` > 0 means the first ``start`` tokens are already in the cache; media for them must not be in
    ``inputs`` (see ChatSession).
    """
    ids = mx.array(inputs["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    ids = ids[:, start:]
    media = {k: inputs[k] for k in _MEDIA_KEYS if inputs.get(k) is not None}
    embeds, token_inputs, blocks = model.embed(ids, **media)
    L = ids.shape[1]
    limit = model.config.text_config.max_position_embeddings
    total = (cache[0].offset if cache else 0) + L
    if total >= limit:
        raise ContextLengthError(
            f"The prompt is {total} tokens but the model's context is {limit}. "
            "Shorten it, or drop earlier turns of the conversation."
        )
    lm = model.language_model
    s = 0
    h = None
    for e in _chunk_ends(L, chunk_size, None if blocks is None else np.array(blocks)):
        last = e == L
        h = lm(embeds[:, s:e], None if token_inputs is None else token_inputs[:, s:e], cache,
               None if blocks is None else blocks[s:e], logits_to_keep=1 if last else 0, run_shared_layers=last)
        if not last:
            mx.eval([c.keys for c in cache] + [c.values for c in cache])
        s = e
    return model.logits(h)[0, -1]


def _peak_gb() -> float:
    try:
        return mx.get_peak_memory() / 1e9
    except Exception:  # some backends do not track it
        return 0.0


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
    stop_ids: Sequence[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Iterator[GenerationResponse]:
    """The generation loop over an already-processed prompt. ``on_token`` sees every token fed to the model."""
    t0 = time.perf_counter()
    if seed is not None:
        mx.random.seed(seed)
    if cache is None:
        cache = model.make_cache()
    sampler = make_sampler(temp=temperature, top_p=top_p if 0 < top_p < 1 else 0.0, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty,
                                        repetition_context_size=repetition_context_size)
    prompt_ids = np.array(inputs["input_ids"]).reshape(-1).tolist()
    history = mx.array(prompt_ids, dtype=mx.int32)
    stop = set(stop_ids if stop_ids is not None else _stop_ids(model, processor))
    limit = model.config.text_config.max_position_embeddings

    def sample(logits: mx.array, history: mx.array) -> mx.array:
        for p in processors:
            logits = p(history, logits[None])[0]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return sampler(logprobs[None])[0]

    logits = prefill(model, inputs, cache, prefill_chunk, start)
    y = sample(logits, history)
    mx.async_eval(y)
    n_prompt = len(prompt_ids) - start
    make = getattr(processor.tokenizer, "make_detokenizer", None)
    detok = make() if make else NaiveStreamingDetokenizer(processor.tokenizer)
    ttft = prompt_tps = 0.0
    t_gen = None
    n = 0
    while True:
        if n + 1 < max_tokens and cache[0].offset + 1 < limit:
            if processors:  # only a repetition penalty reads the history; keep the plain loop free of it
                history = mx.concatenate([history, y[None].astype(mx.int32)])
            next_logits = model.decode(y.reshape(1, 1), cache)[0, -1]
            next_y = sample(next_logits, history)
            mx.async_eval(next_y)
        else:
            next_y = None
        token = int(y.item())
        n += 1
        if t_gen is None:
            t_gen = time.perf_counter()
            ttft = t_gen - t0
            prompt_tps = n_prompt / max(ttft, 1e-9)
        gen_tps = (n - 1) / max(time.perf_counter() - t_gen, 1e-9) if n > 1 else 0.0
        stats = dict(prompt_tokens=n_prompt, prompt_tps=prompt_tps, generation_tokens=n, generation_tps=gen_tps,
                     ttft=ttft, peak_memory_gb=_peak_gb())
        if on_token is not None and next_y is not None:
            on_token(token)  # it went through the model, so it is in the cache
        if token in stop:
            detok.finalize()
            yield GenerationResponse(detok.last_segment, token, finish_reason="stop", **stats)
            return
        detok.add_token(token)
        cancelled = should_stop is not None and should_stop()
        if next_y is None or cancelled:
            detok.finalize()
            yield GenerationResponse(detok.last_segment, token,
                                     finish_reason="cancelled" if cancelled else "length", **stats)
            return
        yield GenerationResponse(detok.last_segment, token, **stats)
        y = next_y


def _stop_ids(model, processor) -> list[int]:
    ids = set(model.config.text_config.eos_token_ids)
    ids.update(getattr(processor, "eos_token_ids", None) or [])
    return sorted(ids)


def stream_generate(model, processor, prompt: str, images=None, audio=None, videos=None,
                    **kwargs) -> Iterator[GenerationResponse]:
    """Stream the answer to ``prompt`` (used verbatim: no chat template is applied here)."""
    inputs = processor(text=prompt, images=images, audio=audio, videos=videos)
    yield from stream_tokens(model, processor, inputs, **kwargs)


def generate(model, processor, prompt: str, images=None, audio=None, videos=None, verbose: bool = False,
             **kwargs) -> str:
    """The whole answer to ``prompt`` as one string. ``verbose`` logs the stats of the run."""
    text, last = [], None
    for r in stream_generate(model, processor, prompt, images=images, audio=audio, videos=videos, **kwargs):
        text.append(r.text)
        last = r
    if verbose and last is not None:
        logger.info("prompt %d tok at %.1f tok/s, generation %d tok at %.1f tok/s, peak %.2f GB",
                    last.prompt_tokens, last.prompt_tps, last.generation_tokens, last.generation_tps,
                    last.peak_memory_gb)
    return "".join(text)

