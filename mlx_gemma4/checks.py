"""Argument checks shared by the generation entry points: each raises InputError naming the argument and its
valid range, before any work is done."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .cache import KVCache


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


def check_start(inputs: dict[str, Any], cache: list[KVCache] | None, start: Any) -> None:
    """``start`` > 0 must be how many of the prompt's tokens ``cache`` already holds, and leave at least one to run
    (a wrong one put the rest of the prompt at the wrong positions without a word). ``start`` 0 runs the whole
    prompt after whatever the cache holds (a continuation, as mlx-lm's prompt cache does)."""
    check_inputs(inputs)
    n = int(np.asarray(inputs["input_ids"]).size)
    held = cache[0].offset if cache else 0
    whole = isinstance(start, (int, np.integer)) and not isinstance(start, bool)
    if not whole or not 0 <= start < n or start not in (0, held):
        raise InputError(f"start must be 0 or the number of the prompt's tokens the cache already holds ({held}), "
                         f"and below the prompt's {n} tokens; got {start!r:.40}.")


def check_generation_kwargs(kwargs: dict[str, Any], allowed: set[str], caller: str) -> None:
    """The keywords a generation entry point passes on, checked before any work: names, ranges, callables."""
    unknown = set(kwargs) - allowed
    if unknown:
        raise InputError(f"Unknown argument(s) {sorted(unknown)}; {caller} takes {sorted(allowed)}.")
    check_sampling_args(**{k: v for k, v in kwargs.items() if k in _SAMPLING_KWARGS})
    check_policies(**{k: v for k, v in kwargs.items() if k in _POLICY_KWARGS})


def check_model_and_processor(model: Any, processor: Any, caller: str) -> None:
    """The first two arguments must be what ``load()`` returns, in its order (swapped, or one left out, they used
    to fail with a TypeError or AttributeError from deep inside)."""
    if not callable(getattr(model, "make_cache", None)) or not callable(getattr(processor, "apply_chat_template",
                                                                                 None)):
        raise InputError(f"{caller} takes the model and the processor that load(DIR) returns, in that order: "
                         f"model, processor = load(DIR); {caller}(model, processor, ...); got "
                         f"{type(model).__name__} and {type(processor).__name__}.")


def check_assistant_args(model, assistant: Any, draft_tokens: Any) -> None:
    """``assistant`` (None, or a drafter for ``model``) and ``draft_tokens``, checked before any work."""
    if assistant is None:
        if draft_tokens is not None:
            raise InputError("draft_tokens is set but no assistant was given; pass assistant=load_assistant(DIR).")
        return
    from .speculative import check_assistant, check_draft_tokens

    check_draft_tokens(draft_tokens)
    check_assistant(assistant, model)


_POLICY_KWARGS = {"sampler", "logits_processors", "stop_ids", "should_stop", "on_token", "progress", "on_prefilled"}
_SAMPLING_KWARGS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "repetition_context_size", "seed", "prefill_chunk"}
_STREAM_KWARGS = _SAMPLING_KWARGS | {"sampler", "logits_processors", "stop_ids", "should_stop", "on_token",
                                     "cache", "progress", "on_prefilled", "prefilled", "started", "prompt_tokens",
                                     "assistant", "draft_tokens"}
# What ChatSession.stream / send pass on (the session itself owns the cache, its prefill and what it reports).
CHAT_KWARGS = _SAMPLING_KWARGS | {"sampler", "logits_processors", "stop_ids", "should_stop", "progress", "assistant",
                                  "draft_tokens"}
