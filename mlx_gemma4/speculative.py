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

import collections
import math
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from .cache import KVCache, SlidingCache
from .cache import rewind as rewind_cache
from .errors import InputError
from .generation import PromptEnd, check_prefilled, pick, why_finished

DEFAULT_MAX_DRAFT = 6   # the most tokens the automatic choice drafts in one round


class DraftLength:
    """How many tokens to draft in the next round: a fixed ``k``, or (``fixed`` None) the ``k`` in
    ``0 .. k_max`` that maximises expected tokens per second.

    With acceptance rate ``a`` per drafted token, a round of ``k`` drafts yields ``(1 - a**(k+1)) / (1 - a)``
    tokens on average. A round's cost is measured: seconds per round for each ``k`` used, the lower quartile of
    its last ``recent`` rounds (a busy host's hiccups only ever add time); the first round of each ``k`` builds
    kernels and is not counted; lengths not yet measured are estimated from the measured ones
    (``estimated_seconds``), and no round of drafts is taken as cheaper than a plain step. ``k = 0`` is a plain
    decode step, queued before the previous one is read as the plain loop does (its cost is the time between two
    tokens), so when drafting does not pay the loop decodes as fast as without a drafter. Its cost is only ever
    measured: first (two rounds of it, then two of drafts, so one hiccup does not decide), again whenever it looks
    as dear as a round of drafts, and now and then while drafting. While a length above 0 wins, every
    ``explore_every`` rounds a neighbouring one or a plain step is tried so that the costs and the acceptance rate
    around it stay current; once drafting, the loop stops only when plain steps win by more than ``keep`` (a rate
    a little over the break-even one, read with the estimate's noise, would otherwise flip it off now and then).
    While ``k = 0`` wins, every ``shadow_every``-th round also drafts one token on the side (``shadow_due``: a
    shadow draft, compared with the target's next token and never fed, ``record_shadow``), every
    ``near_every``-th while drafting would be within ``near`` of plain steps' speed, and a round of drafts comes
    now and then when near or when the drafter agrees often (its costs may be stale): a drafter that never agrees
    costs ~1% and one that agrees again is drafted with again soon (within a few dozen tokens when near the
    break-even rate). What finding out costs is kept under ``shadow_share`` of plain steps' time: a shadow draft
    costs the host its build, which a plain step on a fast device waits for, and the device a drafter step, so its
    rounds are timed (``record_shadow``) and shadow drafts come no oftener than that share allows (an E2B shadow
    round cost ~1.26 plain steps on an H100, and one every 6th round lost it 4-5% at acceptance 0.4-0.5, where it
    stayed on plain steps); a round of drafts when near comes every ``explore_every`` rounds where it would lose
    ~nothing (it judges a few drafts where a shadow judges one), rarer the more it would lose (``_near_loss``).
    """

    def __init__(self, fixed: int | None = None, k_max: int = DEFAULT_MAX_DRAFT, explore_every: int = 8,
                 prior_acceptance: float = 0.6, recent: int = 9, memory: float = 0.975, shadow_every: int = 16,
                 keep: float = 0.03, near: float = 0.85, near_every: int = 6, shadow_share: float = 0.015):
        self.fixed, self.k_max = fixed, fixed if fixed is not None else k_max
        self.explore_every = explore_every
        self.keep, self.near = keep, near
        self.shadow_every, self.near_every, self.shadow_share = shadow_every, near_every, shadow_share
        self.shadow_seconds: float | None = None   # a round with a shadow draft: the lower quartile of recent ones
        self._shadow_recent: collections.deque = collections.deque(maxlen=recent)
        self.memory = memory
        # The acceptance rate is kept drafts over judged ones, both counted with older drafts fading (by
        # ``memory`` per draft judged since: ~40 drafts count): the rate the rounds' runs of kept drafts imply,
        # unbiased where an average of each round's own rate is not (a round that kept 1 of 2 says less than one
        # that kept 4 of 5), and steady enough not to fall under the break-even rate by chance.
        self._kept, self._judged = 2 * prior_acceptance, 2.0
        self.seconds: dict[int, float] = {}   # k -> the lower quartile of its recent rounds' seconds
        self._recent: dict[int, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=recent))
        self._seen: set[int | str] = set()
        self._drafting = self._near = False   # the last choice drafted; drafting is within ``near`` of plain
        self._near_loss = 0.0
        self.rounds = 0
        self._since_explore = self._since_shadow = 0
        self._explored = 0   # explorations so far: a longer length, a shorter one, a plain step, in turn

    @property
    def acceptance(self) -> float:
        return self._kept / self._judged

    def _judge(self, kept: int, judged: int) -> None:
        fade = self.memory ** judged
        self._kept, self._judged = fade * self._kept + kept, fade * self._judged + judged

    def expected_tokens(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def estimated_seconds(self, k: int) -> float | None:
        """A round's cost for ``k`` drafts: measured, or from the measured rounds of drafts around it; ``k = 0`` (a
        plain step) only ever measured: a round of drafts pays for the drafter's steps and a wider forward that a
        plain step does not, so what drafting rounds cost says nothing of it (extended down to it, the costs of
        rounds of 1 and 2 drafts made a plain step look nearly as dear as a round of drafts, and drafting look
        worth it at any acceptance)."""
        if k in self.seconds:
            return self.seconds[k]
        drafting = sorted(j for j in self.seconds if j)
        if not k or not drafting:
            return None
        if len(drafting) == 1:
            # One measurement: assume each drafted token adds a tenth of a plain step (a drafter step and a row
            # of the verification; ~0.05-0.07 on an H100's E4B and 12B), or a quarter of that round's cost.
            j = drafting[0]
            per_draft = 0.1 * self.seconds[0] if 0 in self.seconds else 0.25 * self.seconds[j] / (1 + 0.25 * j)
            return max(self.seconds[j] + per_draft * (k - j), 1e-9)
        lo = max([j for j in drafting if j < k], default=drafting[0])
        hi = min([j for j in drafting if j > k], default=drafting[-1])
        if lo == hi:   # outside the measured range: extend the nearest two points' slope
            lo, hi = (drafting[0], drafting[1]) if k < drafting[0] else (drafting[-2], drafting[-1])
        slope = max((self.seconds[hi] - self.seconds[lo]) / (hi - lo), 0.0)
        return max(self.seconds[lo] + slope * (k - lo), 1e-9)

    def choose(self, limit: int) -> int:
        """The next round's draft length, at most ``limit``."""
        if self.fixed is not None:
            return max(0, min(self.fixed, limit))
        self.rounds += 1
        drafting = 0   # the best length above 0
        # First a plain step's cost, then a round of drafts': two rounds of each (after the one that builds
        # kernels), so that one hiccup of the host does not decide.
        if 0 not in self.seconds or len(self._recent[0]) == 1:
            best = 0
        elif not any(k and len(self._recent[k]) != 1 for k in self.seconds):
            best = min(2, self.k_max)
        elif any(k and c <= self.seconds[0] for k, c in self.seconds.items()):
            best = 0   # a plain step's work is in every round: its cost is stale (hiccups): measure it again
        else:
            costs = {k: self.estimated_seconds(k) for k in range(self.k_max + 1)}
            costs = {k: max(c, costs[0]) for k, c in costs.items()}   # (a plain step's work is in every round)
            speed = {k: self.expected_tokens(k) / costs[k] for k in costs}
            best = max(speed, key=speed.get)
            drafting = max((k for k in speed if k), key=speed.get, default=0)
            if not best and self._drafting and speed[drafting] >= (1 - self.keep) * speed[0]:
                best = drafting
            self._near = bool(drafting) and speed[drafting] >= self.near * speed[0]
            # What a round of drafts would lose against plain steps, in plain steps (none where it pays)
            self._near_loss = max(costs[drafting] / costs[0] - self.expected_tokens(drafting), 0.0) if drafting \
                else 0.0
            self._drafting = best > 0
        if best:   # now and then a neighbouring length, or a plain step
            self._since_explore += 1
            if self._since_explore >= self.explore_every:
                self._since_explore = 0
                step = self._explored % 3
                best = 0 if step == 2 else min(max(best + (1 if step == 0 else -1), 0), self.k_max)
                self._explored += 1
        elif self._near or self.acceptance >= 0.5:
            # Plain steps win, but not by much, or the drafter agrees often (its costs may be a hiccup's): now and
            # then a round of drafts, so that their cost stays current.
            self._since_explore += 1
            every = 4 * self.explore_every
            if self._near:
                every = max(self.explore_every, min(every, math.ceil(self._near_loss / self.shadow_share)))
            if self._since_explore >= every:
                self._since_explore = 0
                best = drafting
        return max(0, min(best, limit))

    def shadow_due(self) -> bool:
        """Whether this round without drafts also drafts one token on the side (never with a fixed length)."""
        if self.fixed is not None:
            return False
        self._since_shadow += 1
        if self._since_shadow < self.shadow_interval():
            return False
        self._since_shadow = 0
        return True

    def shadow_interval(self) -> int:
        """Rounds from one shadow draft to the next: ``shadow_every``, or ``near_every`` when near paying, and no
        fewer than keep shadow drafts' measured cost under ``shadow_share`` of plain steps' time (at most 64)."""
        rounds = min(self.near_every, self.shadow_every) if self._near else self.shadow_every
        if self.shadow_seconds is not None and self.seconds.get(0):
            extra = max(self.shadow_seconds - self.seconds[0], 0.0) / self.seconds[0]
            rounds = max(rounds, min(math.ceil(extra / self.shadow_share), 64))
        return rounds

    def record_shadow(self, kept: bool, seconds: float | None = None) -> None:
        """What a shadow draft gave: whether the target's next token was the drafted one (one draft judged), and
        its round's ``seconds`` (the first round builds the drafter's kernels and is not counted)."""
        self._judge(int(kept), 1)
        if seconds is None:
            return
        if "shadow" not in self._seen:
            self._seen.add("shadow")
            return
        self._shadow_recent.append(seconds)
        self.shadow_seconds = sorted(self._shadow_recent)[(len(self._shadow_recent) - 1) // 4]

    def record(self, k: int, accepted: int, seconds: float) -> None:
        """What a round of ``k`` drafts gave: ``accepted`` drafts kept, in ``seconds``."""
        if k not in self._seen:   # the first round of a length builds its kernels (and traces the step): not its cost
            self._seen.add(k)
        else:
            recent = self._recent[k]
            recent.append(seconds)
            self.seconds[k] = sorted(recent)[(len(recent) - 1) // 4]   # the lower quartile
        if k:   # the drafts the target judged: all kept ones and the first rejected
            self._judge(accepted, accepted + (accepted < k))


# (id(assistant), id(model)) -> (weak references to both, their automatic policy)
_POLICIES: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, DraftLength]] = {}


def automatic_policy(model, assistant) -> DraftLength:
    """The automatic draft-length policy of this drafter and model: one per pair, kept across calls (a chat's
    turns), so what it measured carries over instead of being learnt again each turn."""
    key = (id(assistant), id(model))
    held = _POLICIES.get(key)
    if held is None or held[0]() is not assistant or held[1]() is not model:   # new, or ids of collected objects
        for k in [k for k, (a, m, _) in _POLICIES.items() if a() is None or m() is None]:
            del _POLICIES[k]
        held = _POLICIES[key] = (weakref.ref(assistant), weakref.ref(model), DraftLength())
    return held[2]


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
                 draft_tokens: int | None = None):
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
        self.finish_reason: str | None = None
        self.fed = 0
        self.drafted = self.accepted = self.judged = 0

    def _check_ring_room(self) -> None:
        need = required_max_rewind(self.model, self.assistant, self.lengths.k_max)
        for c in self.cache:
            if isinstance(c, SlidingCache) and c.slots - c.window + 1 < need:
                raise InputError(f"The cache's sliding rings can rewind {c.slots - c.window + 1} tokens; drafting "
                                 f"{self.lengths.k_max} needs {need}. Make it with "
                                 f"model.make_cache(max_rewind={need}).")

    # -- one round --------------------------------------------------------------------------------------------
    def _draft(self, token: mx.array, hidden: mx.array, k: int) -> list[mx.array]:
        """``k`` greedy drafts (lazy scalars) after ``token`` at the cache's next position."""
        if k == 0:
            return []
        step = self.assistant.draft_step(self.model, producer_caches(self.model, self.cache))
        drafts = []
        for _ in range(k):
            token, hidden = step(token, hidden)
            drafts.append(token)
        return drafts

    def _pick(self, logits: mx.array, history: mx.array | None) -> tuple[mx.array, mx.array]:
        """The target's token and log-probs (vocab,) at one position, with the processors and sampler."""
        return pick(logits, history, self.processors, self.sampler)

    def _verify(self, token: mx.array, drafts: list[mx.array], history: mx.array | None):
        """The target's tokens, log-probs and hidden states at ``token`` and each draft (all lazy)."""
        if drafts:
            ids = mx.stack([token.reshape(()), *drafts]).reshape(1, -1).astype(mx.int32)  # (1, k + 1)
        else:   # a plain step: no more ops than the plain loop's
            ids = token.reshape(1, 1)
        logits, hidden = self.model.step_hidden(ids, self.cache)
        picks = []
        for i in range(ids.shape[1]):
            h = history if history is None or not i else mx.concatenate([history, ids[0, 1 : i + 1]])
            picks.append(self._pick(logits[0, i], h))
        return [p[0] for p in picks], [p[1] for p in picks], hidden

    def _queue(self, y: mx.array, hidden: mx.array, history: mx.array | None, n: int):
        """Build the round that feeds ``y`` (the ``n``-th token) and queue it on the device; the round (k, start
        time, drafts, the target's tokens, log-probs and hidden states) and the history with ``y``."""
        if history is not None:
            history = mx.concatenate([history, y.reshape(1).astype(mx.int32)])
        k = self.lengths.choose(min(self.max_tokens - n - 1, self.model.context_left(self.cache) - 1))
        t0 = time.perf_counter()
        drafts, tokens, all_logprobs, hiddens, side = self._round(y, hidden, history, k,
                                                                  k == 0 and self.lengths.shadow_due())
        self.fed = n   # y is in the cache from now on
        return (k, t0, drafts, tokens, all_logprobs, hiddens, side), history

    def _round(self, y: mx.array, hidden: mx.array, history: mx.array | None, k: int, shadow: bool):
        """``k`` drafts after ``y`` and their verification, queued on the device: the drafts first, so that the
        device drafts while the host builds the verification (on a fast device that build would otherwise leave it
        idle: ~1.8 ms of an E4B round on an H200), and so that nothing still reads the cache's buffers when the
        verification writes them. ``shadow`` (a round without drafts): one draft on the side as well, judged
        against the target's next token once that is read, never fed (DraftLength.shadow_due)."""
        drafts = self._draft(y, hidden, k)
        side = self._draft(y, hidden, 1) if shadow else []
        if drafts or side:
            mx.async_eval(drafts, side)
        tokens, all_logprobs, hiddens = self._verify(y, drafts, history)
        mx.async_eval(drafts, tokens, all_logprobs, hiddens)
        return drafts, tokens, all_logprobs, hiddens, side

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
        y, logprobs = self._pick(end.logits, history)
        return y, logprobs, end.hidden

    def __iter__(self) -> Iterator[tuple[int, mx.array]]:
        model, cache = self.model, self.cache
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
        last_read = time.perf_counter()
        while True:
            # y (not yet fed) goes out now; the checks say whether another round follows. From the second token
            # on, that round is built and queued before y goes out, so the device works while the caller handles
            # y (as in the plain loop); the first token goes out as soon as it exists.
            n += 1
            self.finish_reason = why_finished(n, self.max_tokens, model, cache, self.should_stop)
            queued = None
            if self.finish_reason is None and n > 1:
                queued, history = self._queue(y, hidden, history, n)
            token = int(y.item())
            now = time.perf_counter()
            if shadow:   # a round without drafts but one on the side: its cost is the shadow draft's
                self.lengths.record_shadow(int(shadow[0].item()) == token, now - last_read)
                shadow = []
            elif plain_round:   # a round without drafts costs the time between two tokens, as a plain step does
                self.lengths.record(0, 0, now - last_read)
            plain_round = False
            last_read = now
            try:
                yield token, logprobs
            except GeneratorExit:
                if queued is not None:   # y stays in the cache (it went out); the round's drafts go
                    rewind_cache(cache, queued[0])
                raise
            if self.finish_reason is not None:
                return
            if queued is None:
                queued, history = self._queue(y, hidden, history, n)
            k, t0, drafts, tokens, all_logprobs, hiddens, side = queued
            if k == 0:
                # No drafts to judge: the target's own token is next, whatever it is. It stays lazy, so the next
                # round is built while the device runs this one: the plain loop's overlap, and its speed.
                plain_round, shadow = True, side
                y, logprobs, hidden = tokens[0], all_logprobs[0], hiddens[:, :1]
                continue
            mx.eval(drafts, tokens, all_logprobs, hiddens)
            d, t = [int(x.item()) for x in drafts], [int(x.item()) for x in tokens]
            m = 0
            while m < k and d[m] == t[m]:
                m += 1
            rewind_cache(cache, k - m)
            self.lengths.record(k, m, time.perf_counter() - t0)
            self.drafted += k
            self.accepted += m
            self.judged += m + (m < k)
            for i in range(m):  # kept drafts: in the cache as they go out
                n += 1
                self.fed = n
                if history is not None:
                    history = mx.concatenate([history, drafts[i].reshape(1).astype(mx.int32)])
                try:
                    yield d[i], all_logprobs[i]
                except GeneratorExit:
                    # The caller stopped (a stop token): the cache keeps only what went out, like plain decoding.
                    rewind_cache(cache, m - i - 1)
                    raise
            y, logprobs, hidden = tokens[m], all_logprobs[m], hiddens[:, m : m + 1]
