"""The drafters that stand in for a real one in benchmarks/speculative.py's end-to-end runs: the drafter's own
compute, proposing tokens the target will (or, at a set rate, will not) pick.

``Oracle`` proposes the loop's own picks, learnt by context over runs (``learn``): the ceiling. ``ScriptedOracle``
proposes a script the target is made to follow (``forcing``), right at a set rate: the speed at that acceptance.
"""

from __future__ import annotations

import random

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4.assistant import Assistant


class Oracle(Assistant):
    """The drafter's own compute, proposing the target's picks instead of its own: in each context (the tokens
    after the prompt so far) the token the loop picked there in an earlier run (``known``), with probability
    ``rate`` (else a token the target does not pick), so a run shows the speed at that acceptance rate.

    Keyed by context, not by position: where a verification rounds differently from a plain step (low precision,
    and its width varies with the automatic k) a near-tie can flip, and the loop goes on from a context no
    position-indexed sequence describes. ``blind`` counts proposals in contexts no earlier run reached."""

    def __init__(self, drafter: Assistant, known: dict[tuple[int, ...], int], prompt_len: int, rate: float = 1.0,
                 seed: int = 0):
        nn.Module.__init__(self)
        self.__dict__.update(vars(drafter))     # the same modules and settings: a view of the drafter
        dict.update(self, drafter)
        self.known, self.prompt_len, self.rate = known, prompt_len, rate
        self.restart([], seed)

    def restart(self, out: list[int], seed: int = 0) -> None:
        """Before a run: ``out`` is the list its tokens will be appended to as they go out."""
        self.out, self.blind, self._rng = out, 0, random.Random(seed)

    def draft_step(self, target, producers, compiled=True, at=None):
        step = super().draft_step(target, producers, compiled, at)
        # The round feeds the loop's token j. Drafted ahead (``at``: the position is on the device), reading it
        # waits for the round before: this oracle's runs are the ceiling of the drafter's compute, not timings of
        # that overlap.
        j = (next(iter(producers.values())).offset if at is None else int(at.item())) - self.prompt_len
        # Token j has not gone out yet where the round is queued before it (after a round without drafts it is
        # still being computed): reading it would wait for the device, which the loop does not, so what earlier
        # runs picked there stands in for it (wrong only at a flip, and then only for this round).
        context = tuple(self.out[: j + 1])
        while context is not None and len(context) < j + 1:   # (drafted ahead: the tokens of the round before too)
            y = self.known.get(context)
            context = None if y is None else (*context, y)

        def propose(token, hidden):
            nonlocal context
            token, hidden = step(token, hidden)
            right = None if context is None else self.known.get(context)
            if right is None:
                self.blind += 1
                return token, hidden
            context = (*context, right)
            wrong = (right + 1) % self.config.text_config.vocab_size
            return mx.array(right if self._rng.random() < self.rate else wrong, dtype=mx.int32), hidden

        return propose


class ScriptedOracle(Assistant):
    """The drafter's own compute, proposing the tokens of a script that the target is made to follow (``forcing``):
    each draft is the script's token with probability ``rate`` (else one the target will not pick), so the
    acceptance is ``rate`` whatever the rounding. For the end-to-end runs at a given acceptance rate: with random
    weights near-ties are everywhere, and in bfloat16 a verify and a one-token step round them apart, so an oracle
    of the loop's own picks (``Oracle``) cannot be right at a set rate."""

    def __init__(self, drafter: Assistant, script: list[int], prompt_len: int, rate: float, seed: int = 0):
        nn.Module.__init__(self)
        self.__dict__.update(vars(drafter))     # the same modules and settings: a view of the drafter
        dict.update(self, drafter)
        self.script, self.prompt_len, self.rate = script, prompt_len, rate
        self._rng = random.Random(seed)

    def draft_step(self, target, producers, compiled=True, at=None):
        step = super().draft_step(target, producers, compiled, at)
        # The round feeds generated token j; its first draft stands for token j + 1. Drafted ahead (``at``: the
        # position is on the device), the script is read there too, so nothing waits.
        vocab = self.config.text_config.vocab_size
        if at is None:
            i = next(iter(producers.values())).offset - self.prompt_len + 1
        else:
            i = at - self.prompt_len + 1
            script = mx.array(self.script, dtype=mx.int32)

        def propose(token, hidden):
            nonlocal i
            token, hidden = step(token, hidden)
            keep = self._rng.random() < self.rate
            if at is None:
                right = self.script[min(i, len(self.script) - 1)]
                token = mx.array(right if keep else (right + 1) % vocab, dtype=mx.int32)
            else:
                right = script[mx.minimum(i, len(self.script) - 1)]
                token = right if keep else (right + 1) % vocab
            i += 1
            return token, hidden

        return propose


def forcing(script: list[int], prompt_len: int, vocab: int):
    """A logits processor that makes the target pick generated token i = ``script[i]`` (its logit raised by 1,000,
    far past any rounding; one vocabulary-wide select per position, paid by plain and speculative runs alike)."""
    table = mx.array(script, dtype=mx.int32)
    ids = mx.arange(vocab, dtype=mx.int32)

    def process(history: mx.array, logits: mx.array) -> mx.array:
        i = min(history.shape[-1] - prompt_len, len(script) - 1)
        return mx.where(ids == table[i], logits + 1000.0, logits)

    return process


def learn(known: dict[tuple[int, ...], int], tokens: list[int]) -> bool:
    """Add a run's picks to ``known`` (context -> the token picked after it); whether all were known already."""
    already = True
    for i in range(1, len(tokens)):
        context = tuple(tokens[:i])
        already &= known.get(context) == tokens[i]
        known[context] = tokens[i]
    return already
