"""Speculative decoding with an assistant drafter: draft k tokens, verify them in one target forward, keep the
longest agreeing prefix plus the target's own next token, rewind the rest.

Reference: transformers ``generation/candidate_generator.py`` (``SinglePositionMultiTokenCandidateGenerator``)
and assisted generation in ``generation/utils.py``. One round, with the target's cache holding positions
``0 .. P-1``, the token ``t`` at ``P`` not yet fed, and the target's hidden state ``h`` that predicted ``t``:

1. the drafter drafts ``d1 .. dk`` greedily at the constant position ``P``, reading the target's K/V of
   ``0 .. P-1`` (its last producer layer of each type; sliding layers: the last ``window + 1`` of them);
2. the target runs ``[t, d1 .. dk]`` at ``P .. P+k`` in one forward and picks its own token ``y0 .. yk`` at
   each position with the caller's logits processors and sampler (history: the tokens before it, drafts
   included);
3. the drafts are kept while ``d(i+1) == y(i)``: with ``m`` kept, ``t, d1 .. dm`` stay in the cache, the other
   ``k - m`` positions are rewound (exactly, also in sliding rings that have wrapped), and ``y(m)`` with its
   hidden state starts the next round.

Every kept token is the one the target's sampler picked at that position given the same history, so greedy
output equals plain greedy decoding token for token. With sampling this is the speculative-sampling rule for a
drafter that proposes one token with certainty (q = 1 at d): a draft is accepted with probability p(d) and on
rejection the token comes from p without d, renormalised; drawing y ~ p and accepting when y == d does exactly
that, so every token follows the target's distribution. The drafts are greedy, as in the reference.

All of a round (k drafting steps, the verification, the k + 1 samples) is built lazily and evaluated once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from .cache import KVCache, SlidingCache
from .cache import rewind as rewind_cache
from .draft_length import DraftLength, automatic_policy
from .errors import InputError
from .generation import PromptEnd, check_prefilled, why_finished
from .sampling import pick, read_token


def producer_caches(model, cache: list[KVCache]) -> dict[str, KVCache]:
    """Layer type -> the cache of the target's last K/V-producing layer of that type (what the drafter reads)."""
    tc = model.config.text_config
    return {t: cache[i] for i, t in enumerate(tc.layer_types[: tc.first_kv_shared_layer])}


def required_max_rewind(model, assistant, k_max: int) -> int:
    """The ``max_rewind`` a target cache needs so that its sliding rings take a round of ``k_max`` drafts in one
    step (``k_max + 1`` tokens) and, after all of them are rejected and rewound, still hold the drafter's window
    (which may be wider than the target's: more rewind room; or narrower: no less than the round)."""
    window = model.config.text_config.sliding_window
    return k_max + max(1, 2 + assistant.config.text_config.sliding_window - window)


def check_draft_tokens(draft_tokens: Any) -> None:
    if draft_tokens is None:
        return
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, (int, np.integer)) or not \
            0 <= draft_tokens <= 64:
        raise InputError(f"draft_tokens must be a whole number from 0 to 64, or None to choose it automatically; "
                         f"got {draft_tokens!r}.")


def check_assistant(assistant: Any, model) -> None:
    """``assistant`` must be a drafter from ``load_assistant`` made for ``model``."""
    from .assistant import Assistant

    if not isinstance(assistant, Assistant):
        raise InputError(f"assistant must be a drafter loaded with load_assistant(DIR, target=model); got "
                         f"{type(assistant).__name__}.")
    assistant.check_fits(model)


@dataclass
class Round:
    """A round queued on the device: ``k`` drafts and their verification (all lazy). ``tokens`` / ``logprobs``:
    the target's pick and log-probs after the round's token and after each draft; ``hiddens`` (1, k + 1, hidden):
    the states that predicted them; ``side``: a draft on the side (a shadow); ``readback``: the drafts, then the
    picks, as int32 (what the host reads)."""
    k: int
    t0: float
    drafts: list[mx.array]
    tokens: list[mx.array]
    logprobs: list[mx.array]
    hiddens: mx.array
    side: list[mx.array]
    readback: mx.array | None


class SpeculativeLoop:
    """A token loop with a drafter: iterating yields ``(token, logprobs)`` like ``generation.TokenLoop`` (same
    ``finish_reason`` and ``fed``), plus ``drafted`` / ``accepted``: drafted tokens and kept drafts so far, and
    ``judged``: the drafts the target judged (the kept ones and each round's first rejected one; the drafts after it
    were never compared), so ``accepted / judged`` is the acceptance rate per draft."""

    def __init__(self, model, assistant, inputs: dict[str, Any], cache: list[KVCache] | None, *, start: int,
                 max_tokens: int, sampler: Callable[[mx.array], mx.array] | None,
                 logits_processors: Sequence[Callable[[mx.array, mx.array], mx.array]], prefill_chunk: int,
                 should_stop: Callable[[], bool] | None, progress: Callable[[int, int], None] | None = None,
                 on_prefilled: Callable[[PromptEnd], None] | None = None, prefilled: PromptEnd | None = None,
                 draft_tokens: int | None = None, seed: int | None = None):
        check_draft_tokens(draft_tokens)
        check_assistant(assistant, model)
        self.model, self.assistant, self.inputs, self.start = model, assistant, inputs, start
        self.lengths = DraftLength(draft_tokens) if draft_tokens is not None else automatic_policy(model, assistant)
        if cache is None:
            cache = model.make_cache(max_rewind=required_max_rewind(model, assistant, self.lengths.k_max))
        self.cache = cache
        self.prefilled = check_prefilled(inputs, cache, prefilled)
        self._check_ring_room()
        self.max_tokens, self.prefill_chunk, self.should_stop = max_tokens, prefill_chunk, should_stop
        self.progress, self.on_prefilled = progress, on_prefilled
        self.sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
        self.processors = list(logits_processors)
        self.seed = seed   # draws keyed by the seed and the position: the plain loop's tokens (sampling.reseed)
        self.finish_reason: str | None = None
        self.fed = 0
        self.drafted = self.accepted = self.judged = 0
        self._ahead: tuple[int, list[mx.array] | None] | None = None   # the next round's length and drafts, if chosen

    def _check_ring_room(self) -> None:
        need = required_max_rewind(self.model, self.assistant, self.lengths.k_max)
        for c in self.cache:
            if isinstance(c, SlidingCache) and c.slots - c.window + 1 < need:
                raise InputError(f"The cache's sliding rings can rewind {c.slots - c.window + 1} tokens; drafting "
                                 f"{self.lengths.k_max} needs {need}. Make it with "
                                 f"model.make_cache(max_rewind={need}).")

    # -- one round --------------------------------------------------------------------------------------------
    def _draft(self, token: mx.array, hidden: mx.array, k: int, at: mx.array | None = None) -> list[mx.array]:
        """``k`` greedy drafts (lazy scalars) after ``token`` at the cache's next position (or at ``at``: see
        ``_draft_ahead``)."""
        if k == 0:
            return []
        step = self.assistant.draft_step(self.model, producer_caches(self.model, self.cache), at=at)
        drafts = []
        for _ in range(k):
            token, hidden = step(token, hidden)
            drafts.append(token)
        return drafts

    def _draft_ahead(self, n: int, k: int, readback: mx.array, hiddens: mx.array
                     ) -> tuple[int, list[mx.array] | None] | None:
        """The next round's length and drafts, queued right behind this round's verification (``k`` drafts after
        the ``n``-th token), before the host reads how many are kept: the device drafts while the host reads the
        outcome, rewinds and hands the kept tokens out, where it would otherwise wait for the host to build the
        drafts after that. The kept count, the token after it, its hidden state and position are picked on the
        device from ``readback`` (the drafts, then the target's tokens); the policy chooses the length on what it
        knows before this round. Neither near the end of the answer or the context, where the next round's limit
        depends on this round's outcome, and no drafts where the compiled drafting step does not fit: they are
        chosen, or drafted, after the read, as before."""
        from .draft_step import fits_compiled_draft

        producers = producer_caches(self.model, self.cache)
        limit = min(self.max_tokens - (n + k + 1) - 1, self.model.context_left(self.cache) - 1)
        if limit < self.lengths.k_max:   # near the end, where the limit depends on this round's outcome
            return None
        k_next = self.lengths.choose(limit)
        if not k_next or not fits_compiled_draft(producers):
            return k_next, None
        kept = mx.cumprod((readback[:k] == readback[k : 2 * k]).astype(mx.int32)).sum(keepdims=True)   # (1,)
        token = mx.take(readback[k:], kept)                       # the target's token after the kept drafts
        hidden = mx.take(hiddens, kept, axis=1)                   # (1, 1, hidden): the state that predicted it
        at = (next(iter(producers.values())).offset - k + kept).reshape(())   # its position, after the rewind
        drafts = self._draft(token, hidden, k_next, at)
        mx.async_eval(drafts)
        return k_next, drafts

    def _pick(self, logits: mx.array, history: mx.array | None, position: int) -> tuple[mx.array, mx.array]:
        """The target's token and log-probs (vocab,) at ``position``, with the processors and sampler."""
        return pick(logits, history, self.processors, self.sampler, self.seed, position)

    def _verify(self, token: mx.array, drafts: list[mx.array], history: mx.array | None):
        """The target's tokens, log-probs and hidden states at ``token`` and each draft (all lazy)."""
        if drafts:
            ids = mx.stack([token.reshape(()), *drafts]).reshape(1, -1).astype(mx.int32)  # (1, k + 1)
        else:   # a plain step: no more ops than the plain loop's
            ids = token.reshape(1, 1)
        logits, hidden = self.model.step_hidden(ids, self.cache)
        first = self.cache[0].offset - ids.shape[1] + 1   # the position of the token picked after ``token``
        picks = []
        for i in range(ids.shape[1]):
            h = history if history is None or not i else mx.concatenate([history, ids[0, 1 : i + 1]])
            picks.append(self._pick(logits[0, i], h, first + i))
        return [p[0] for p in picks], [p[1] for p in picks], hidden

    def _queue(self, y: mx.array, hidden: mx.array, history: mx.array | None, n: int) -> tuple[Round, Any]:
        """Build the round that feeds ``y`` (the ``n``-th token) and queue it on the device (with the next round's
        drafts behind it, if it drafts); the round and the history with ``y``."""
        if history is not None:
            history = mx.concatenate([history, y.reshape(1).astype(mx.int32)])
        if self._ahead is not None:   # drafted behind the last round
            (k, drafts), self._ahead = self._ahead, None
        else:
            k = self.lengths.choose(min(self.max_tokens - n - 1, self.model.context_left(self.cache) - 1))
            drafts = None
        r = self._round(y, hidden, history, k, k == 0 and self.lengths.shadow_due(), drafts)
        self.fed = n   # y is in the cache from now on
        if k:
            self._ahead = self._draft_ahead(n, k, r.readback, r.hiddens)
        return r, history

    def _round(self, y: mx.array, hidden: mx.array, history: mx.array | None, k: int, shadow: bool,
               drafts: list[mx.array] | None = None) -> Round:
        """``k`` drafts after ``y`` (or ``drafts``, queued already) and their verification, queued on the device:
        the drafts first, so that the device drafts while the host builds the verification (on a fast device that
        build would otherwise leave it idle: ~1.8 ms of an E4B round on an H200), and so that nothing still reads
        the cache's buffers when the verification writes them. ``shadow`` (a round without drafts): one draft on
        the side as well, judged against the target's next token once that is read, never fed
        (DraftLength.shadow_due)."""
        t0 = time.perf_counter()
        if drafts is None:
            drafts = self._draft(y, hidden, k)
            side = self._draft(y, hidden, 1) if shadow else []
            if drafts or side:
                mx.async_eval(drafts, side)
        else:
            side = []
        tokens, all_logprobs, hiddens = self._verify(y, drafts, history)
        # What the host reads to judge the drafts, in one array (one transfer): the drafts, then the target's picks
        readback = mx.concatenate([mx.stack(drafts).reshape(-1).astype(mx.int32),
                                   mx.concatenate([t.reshape(-1) for t in tokens]).astype(mx.int32)]) \
            if drafts else None
        mx.async_eval(drafts, tokens, all_logprobs, hiddens, *([readback] if drafts else []))
        return Round(k, t0, drafts, tokens, all_logprobs, hiddens, side, readback)

    # -- the loop ---------------------------------------------------------------------------------------------
    def _prefill(self) -> tuple[mx.array, mx.array, mx.array] | None:
        """Prompt into the cache; the first token, its log-probs and the hidden state that predicted it."""
        ids = mx.array(self.inputs["input_ids"]).reshape(1, -1)
        L = ids.shape[1]
        history = ids[0].astype(mx.int32) if self.processors else None
        end = self.prefilled
        if end is not None:   # the cache holds the whole prompt
            if self.should_stop is not None and self.should_stop():
                return None
            if end.hidden is None:
                # Kept by the plain loop, without the hidden state a drafter starts from: feed the last token again
                # (text only: any media of the prompt is already in the cache).
                rewind_cache(self.cache, 1)
                logits, hidden = self.model.step_hidden(ids[:, L - 1:], self.cache)
                end = PromptEnd(logits[0, -1], hidden[:, -1:])
        else:
            # One pass, which also returns the last position's hidden state (the drafter's first input).
            end = self.model.prefill(self.inputs, self.cache, chunk_size=self.prefill_chunk, start=self.start,
                                     should_stop=self.should_stop, progress=self.progress, with_hidden=True)
            if end is None:
                return None
            end = PromptEnd(*end)
        self._end = end
        y, logprobs = self._pick(end.logits, history, self.cache[0].offset)
        return y, logprobs, end.hidden

    def __iter__(self) -> Iterator[tuple[int, mx.array]]:
        model, cache = self.model, self.cache
        vocab = model.config.text_config.vocab_size
        first = self._prefill()
        if first is None:
            self.finish_reason = "cancelled"
            return
        y, logprobs, hidden = first
        mx.eval(y, logprobs, hidden)
        if self.on_prefilled is not None:
            self.on_prefilled(self._end)
        history = mx.array(np.array(self.inputs["input_ids"]).reshape(-1), dtype=mx.int32) \
            if self.processors else None
        n = 0
        plain_round = False   # y came from a round without drafts, still lazy: its cost is recorded once read
        shadow: list = []     # that round's draft on the side, if it made one: judged once y is read
        last_read = time.perf_counter()   # when the host last read a token: a plain round costs the time between reads
        while True:
            # y (not yet fed) goes out now; the checks say whether another round follows. From the second token
            # on, that round is built and queued before y goes out, so the device works while the caller handles
            # y (as in the plain loop); the first token goes out as soon as it exists.
            n += 1
            self.finish_reason = why_finished(n, self.max_tokens, model, cache, self.should_stop)
            queued = None
            if self.finish_reason is None and n > 1:
                queued, history = self._queue(y, hidden, history, n)
            token = read_token(y, vocab)
            if shadow or plain_round:
                now = time.perf_counter()
                if shadow:   # a round without drafts but one on the side: its cost is the shadow draft's
                    self.lengths.record_shadow(int(shadow[0].item()) == token, now - last_read)
                else:   # a round without drafts costs the time between two tokens, as a plain step does
                    self.lengths.record(0, 0, now - last_read)
                last_read = now
            shadow, plain_round = [], False
            try:
                yield token, logprobs
            except GeneratorExit:
                if queued is not None:   # y stays in the cache (it went out); the round's drafts go
                    rewind_cache(cache, queued.k)
                raise
            if self.finish_reason is not None:
                return
            if queued is None:
                queued, history = self._queue(y, hidden, history, n)
            r = queued
            if r.k == 0:
                # No drafts to judge: the target's own token is next, whatever it is. It stays lazy, so the next
                # round is built while the device runs this one: the plain loop's overlap, and its speed.
                plain_round, shadow = True, r.side
                y, logprobs, hidden = r.tokens[0], r.logprobs[0], r.hiddens[:, :1]
                continue
            k = r.k
            read = r.readback.tolist()   # waits for this round's verification (not for the drafts behind it)
            d, t = read[:k], read[k:]
            m = 0
            while m < k and d[m] == t[m]:
                m += 1
            rewind_cache(cache, k - m)
            # From when the round was queued (a read of the token before it can come late: MLX may notice a round
            # done only with the next one, so the time between reads gave rounds of drafts ~0.2 ms)
            now = time.perf_counter()
            self.lengths.record(k, m, now - r.t0)
            last_read = now
            self.drafted += k
            self.accepted += m
            self.judged += m + (m < k)
            for i in range(m):  # kept drafts: in the cache as they go out
                n += 1
                self.fed = n
                if history is not None:
                    history = mx.concatenate([history, r.drafts[i].reshape(1).astype(mx.int32)])
                try:
                    yield d[i], r.logprobs[i]
                except GeneratorExit:
                    # The caller stopped (a stop token): the cache keeps only what went out, like plain decoding.
                    rewind_cache(cache, m - i - 1)
                    raise
            y, logprobs, hidden = r.tokens[m], r.logprobs[m], r.hiddens[:, m : m + 1]
