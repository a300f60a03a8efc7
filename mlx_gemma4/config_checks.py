"""The checked reading of config.json sections: every known key is type- and range-checked against its dataclass
field, and a bad value is a ConfigError that names the field and says what to do (used by config.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import types
import typing
from typing import Any

from .errors import ConfigError

logger = logging.getLogger("mlx_gemma4.config")

# Range rules for every whole-number field: sizes are >= 1 unless listed here; ids are >= 0.
_MAY_BE_ZERO = {"hidden_size_per_layer_input", "num_kv_shared_layers", "attention_context_left",
                "attention_context_right"}
_MAX = {"num_hidden_layers": 1024}   # more layers than any real model: a typo, not a model
_MAX_SIZE = 2**31 - 1                # one dimension of an MLX array
_POSITIVE = {"rms_norm_eps", "final_logit_softcapping", "attention_logit_cap", "gradient_clipping", "rope_theta",
             "factor", "partial_rotary_factor"}


def fail(where: str, value: Any, must: str) -> None:
    raise ConfigError(f"config.json: {where} is {json.dumps(value)[:60]}; it must be {must}. Fix that entry (the "
                      "model's published config.json has the right value) or download the checkpoint again.")


def check(where: str, value: Any, tp: Any) -> None:
    """Raise ConfigError unless ``value`` has type ``tp`` (a dataclass field's annotation) and is in range."""
    name = where.rsplit(".", 1)[-1].split("[")[0]
    if not _matches(value, tp):
        fail(where, value, _describe(tp, name))
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        lo = 0 if name.endswith(("_id", "_index")) or name in _MAY_BE_ZERO else 1
        if isinstance(v, int) and not lo <= v <= _MAX.get(name, _MAX_SIZE):
            fail(where, value, _describe(tp, name))
        if isinstance(v, float) and name in _POSITIVE and not v > 0:
            fail(where, value, "a number above 0")


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if tp is dict or origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return True


def _describe(tp: Any, name: str) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, name) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is int:
        lo = 0 if name.endswith(("_id", "_index")) or name in _MAY_BE_ZERO else 1
        return f"a whole number from {lo} to {_MAX.get(name, _MAX_SIZE)}"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0], name).replace('a ', '', 1)}s"
    return {bool: "true or false", float: "a finite number", str: "a string"}.get(tp, "a JSON object")


class Section:
    """One ``from_dict`` for every config dataclass: each known key is type- and range-checked (ConfigError names
    the field), nested configs are built the same way, unknown keys are ignored (logged at DEBUG)."""

    @classmethod
    def _normalize(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Other spellings of this section -> field names (override where a section has them)."""
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = ""):
        if not isinstance(d, dict):
            fail(where.rstrip(".") or "the file", d, "a JSON object")
        original, d = d, cls._normalize(d)
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k in d if k not in fields)
        if unknown:
            logger.debug("%s: ignoring keys %s", cls.__name__, unknown)
        kwargs = {}
        for name in fields & set(d):
            value, tp = d[name], hints[name]
            nested = next((a for a in (tp, *typing.get_args(tp)) if isinstance(a, type) and issubclass(a, Section)),
                          None)
            if nested is not None and value is not None:
                value = nested.from_dict(value, where if value is original else f"{where}{name}.")
            else:
                check(f"{where}{name}", value, tp)
            kwargs[name] = value
        return cls(**kwargs)


def check_heads(where: str, heads: int, kv_heads: int, head_dim: int) -> None:
    if heads % kv_heads:
        raise ConfigError(f"config.json: {where} has {heads} attention heads, not a multiple of its {kv_heads} "
                          "key/value heads. Fix num_attention_heads / num_key_value_heads, or download it again.")
    if head_dim % 2:
        raise ConfigError(f"config.json: {where} has head_dim {head_dim}; rotary embeddings need an even size. "
                          "Fix head_dim, or download the checkpoint again.")


def check_rope(where: str, params: Any, kinds: tuple[str, ...] | None = None) -> None:
    if not isinstance(params, dict):
        fail(where, params, "a JSON object")
    for key in ("rope_theta", "factor", "partial_rotary_factor"):
        if key in params:
            check(f"{where}.{key}", params[key], float)
    if params.get("partial_rotary_factor", 1.0) > 1:
        fail(f"{where}.partial_rotary_factor", params["partial_rotary_factor"], "a number from 0 to 1")
    if kinds and params.get("rope_type", kinds[0]) not in kinds:
        fail(f"{where}.rope_type", params.get("rope_type"), " or ".join(map(repr, kinds)))
