"""Argument checks shared by the generation entry points: each raises InputError naming the argument and its
valid range, before any work is done."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InputError


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)) \
        and math.isfinite(float(x))


def check_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise InputError(f"{name} must be a whole number >= 1; got {value!r}.")


def _check_real(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
                meaning: str = "") -> None:
    ok = _is_real(value)
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        rng = f"{lb}{lo:g}, {hi:g}{rb}".replace("inf", "infinity")
        raise InputError(f"{name} must be a number in {rng}{meaning}; got {value!r}.")


def check_sampling_args(*, max_tokens: Any = 1, temperature: Any = 0.0, top_p: Any = 1.0, top_k: Any = 0,
                        min_p: Any = 0.0, repetition_penalty: Any = None, repetition_context_size: Any = 20,
                        seed: Any = None, prefill_chunk: Any = 2048) -> None:
    """Validate generation arguments up front; raise InputError naming the argument and its valid range."""
    check_positive_int("max_tokens", max_tokens)
    _check_real("temperature", temperature, 0.0, math.inf, hi_open=True, meaning=" (0 = greedy)")
    _check_real("top_p", top_p, 0.0, 1.0, lo_open=True, meaning=" (1 = off)")
    if not _is_int(top_k) or top_k < 0:
        raise InputError(f"top_k must be a whole number >= 0 (0 = off); got {top_k!r}.")
    _check_real("min_p", min_p, 0.0, 1.0, hi_open=True, meaning=" (0 = off)")
    if repetition_penalty is not None:
        _check_real("repetition_penalty", repetition_penalty, 0.0, math.inf, lo_open=True, hi_open=True,
                    meaning=" (1 = off)")
    check_positive_int("repetition_context_size", repetition_context_size)
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise InputError(f"seed must be a whole number in [0, 2**64) or None; got {seed!r}.")
    check_positive_int("prefill_chunk", prefill_chunk)


def check_callable(name: str, value: Any) -> None:
    """``value`` must be None or something to call (a function, a lambda, an object with ``__call__``)."""
    if value is not None and not callable(value):
        raise InputError(f"{name} must be a function (or None); got {type(value).__name__} {value!r:.60}.")


def check_token_ids(name: str, value: Any) -> None:
    """``value`` must be None or a collection of whole-number token ids (not one bare id, not strings)."""
    if value is None:
        return
    if _is_int(value) or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InputError(f"{name} must be a list of token ids (e.g. [1, 106]) or None; got {value!r:.60}.")
    bad = [v for v in value if not _is_int(v) or v < 0]
    if bad:
        raise InputError(f"{name} must hold whole-number token ids >= 0; got {bad[0]!r:.60}. Turn strings into "
                         "ids with processor.tokenizer.convert_tokens_to_ids(...).")


def check_policies(*, sampler: Any = None, logits_processors: Any = None, stop_ids: Any = None,
                   **callbacks: Any) -> None:
    """Validate the non-numeric generation arguments up front: ``sampler``, each of ``logits_processors``, and the
    named ``callbacks`` (``should_stop``, ``on_token``, ``progress``, ...) must be callables; ``stop_ids`` ids."""
    check_callable("sampler", sampler)
    if logits_processors is not None:
        if callable(logits_processors) or not isinstance(logits_processors, (list, tuple)):
            raise InputError("logits_processors must be a list of functions p(history, logits) -> logits (or "
                             f"None); got {type(logits_processors).__name__}.")
        for i, p in enumerate(logits_processors):
            if p is None:   # (None is "not given" for the others, not an item of this list)
                raise InputError(f"logits_processors[{i}] is None; each item must be a function "
                                 "p(history, logits) -> logits.")
            check_callable(f"logits_processors[{i}]", p)
    check_token_ids("stop_ids", stop_ids)
    for name, value in callbacks.items():
        check_callable(name, value)


def check_inputs(inputs: Any) -> None:
    """``inputs`` must be the processor's output: a dict with ``input_ids``."""
    if not isinstance(inputs, dict) or inputs.get("input_ids") is None:
        raise InputError(f"inputs must be the processor's output, a dict with input_ids; got "
                         f"{type(inputs).__name__}{f' of {sorted(inputs)}' if isinstance(inputs, dict) else ''}.")
