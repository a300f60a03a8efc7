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

    def draft_step(self, target, producers, compiled=True):
        step = super().draft_step(target, producers, compiled)
        j = next(iter(producers.values())).offset - self.prompt_len   # the round feeds the loop's token j
        # Token j has not gone out yet where the round is queued before it (after a round without drafts it is
        # still being computed): reading it would wait for the device, which the loop does not, so what earlier
        # runs picked there stands in for it (wrong only at a flip, and then only for this round).
        y = self.out[j] if len(self.out) > j else self.known.get(tuple(self.out[:j]))
        context = None if y is None else (*self.out[:j], y)

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

    def draft_step(self, target, producers, compiled=True):
        step = super().draft_step(target, producers, compiled)
        # The round feeds generated token j; its first draft stands for token j + 1.
        i = next(iter(producers.values())).offset - self.prompt_len + 1
        vocab = self.config.text_config.vocab_size

        def propose(token, hidden):
            nonlocal i
            token, hidden = step(token, hidden)
            right = self.script[min(i, len(self.script) - 1)]
            i += 1
            return mx.array(right if self._rng.random() < self.rate else (right + 1) % vocab, dtype=mx.int32), hidden

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
