"""Sampling: mlx-lm's sampler and logits processors for a generation's settings (``make_policies``), and one
position's token and log-probabilities through them (``pick``), shared by the plain and speculative loops.

With a seed, the random draw that picks the token at position ``p`` comes from a key made of the seed and ``p``
alone (``reseed``), not from a stream that every draw advances: a speculative round samples k + 1 positions, some
of them rewound, so a shared stream made a seeded run depend on how many drafts the policy chose (itself timed),
and a seeded run with a drafter gave other tokens than without one. Keyed by position, a seeded generation gives
the same tokens with or without a drafter, at any draft length (the rule that keeps a draft only when the target
picks it is unchanged)."""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .errors import InputError, with_article


MIN_TEMPERATURE = 1e-6   # below this, sampling is greedy (make_policies)


def make_policies(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                  repetition_penalty: float | None = None, repetition_context_size: int = 20,
                  vocab_size: int | None = None
                  ) -> tuple[Callable[[mx.array], mx.array], list[Callable[[mx.array, mx.array], mx.array]]]:
    """mlx-lm's sampler and logits processors for these settings. A ``top_k`` of ``vocab_size`` or more keeps every
    token, so it is off (mlx-lm's top-k refuses it mid-sampling, which also leaves MLX's random state broken). A
    temperature under ``MIN_TEMPERATURE`` is greedy, the limit sampling tends to as the temperature falls (the
    sampler divides the logits by it: at 1e-38 they overflow to infinity and it drew tokens at random)."""
    if vocab_size is not None and top_k >= vocab_size:
        top_k = 0
    temperature = float(temperature)
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    sampler = make_sampler(temp=temperature, top_p=float(top_p) if top_p < 1 else 0.0,
                           min_p=float(min_p), top_k=int(top_k))
    # mlx-lm takes Python numbers only (a numpy float32 penalty is refused mid-setup)
    processors = make_logits_processors(
        repetition_penalty=None if repetition_penalty is None else float(repetition_penalty),
        repetition_context_size=int(repetition_context_size))
    return sampler, processors


def pick(logits: mx.array, history: mx.array | None, processors: Sequence[Callable], sampler: Callable,
         seed: int | None = None, position: int = 0) -> tuple[mx.array, mx.array]:
    """The token and log-probs (vocab,) at ``position``: ``logits`` (vocab,) through the logits processors (which
    read ``history``), normalized, then the sampler, whose draw a ``seed`` keys by the position (``reseed``)."""
    reseed(seed, position)
    logits = logits[None]                                                          # (1, vocab)
    for p in processors:
        out = p(history, logits)
        if not isinstance(out, mx.array) or out.shape != logits.shape:   # (fewer logits sampled from a part)
            raise InputError(f"A logits processor returned {_described(out)}; it must return logits of the shape "
                             f"it was given, {tuple(logits.shape)}.")
        logits = out
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    token = sampler(logprobs)
    if not isinstance(token, mx.array) or token.size != 1 or not mx.issubdtype(token.dtype, mx.integer):
        raise InputError(f"The sampler returned {_described(token)}; it must return the picked token id, an "
                         f"integer array of shape (1,), from log-probs of shape {tuple(logprobs.shape)}.")
    return token.reshape(-1)[0], logprobs[0]


def read_token(token: mx.array, vocab: int) -> int:
    """A picked token on the host (this waits for it); a sampler's id outside the vocabulary is an InputError
    (the next step's embedding lookup would fail far from its cause, or read another row)."""
    t = int(token.item())
    if not 0 <= t < vocab:
        raise InputError(f"The sampler picked token id {t}, outside the vocabulary (0 to {vocab - 1}); it must "
                         "return an index into the log-probs' last axis.")
    return t


def _described(x) -> str:
    if isinstance(x, mx.array):
        return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
    return with_article(type(x).__name__)


def reseed(seed: int | None, position: int) -> None:
    """With a seed, key the next draws (the sampler's, built next) by the seed and the token's ``position``."""
    if seed is not None:
        mixed = (int(seed) * 0x9E3779B97F4A7C15 + (int(position) + 1) * 0xBF58476D1CE4E5B9) % 2**64
        mx.random.seed(mixed ^ (mixed >> 31))
