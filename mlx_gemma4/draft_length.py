"""How many tokens to draft in the next round of speculative decoding (speculative.py): a fixed number, or the
number that maximises expected tokens per second from the round costs and the acceptance rate the loop measures,
with plain steps whenever drafting does not pay (``DraftLength``); one automatic policy per drafter and target,
kept across a chat's turns (``automatic_policy``).
"""

from __future__ import annotations

import collections
import math
import weakref


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
