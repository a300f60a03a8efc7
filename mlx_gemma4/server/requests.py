"""An OpenAI chat-completions request body as this package's chat messages and generation settings.

Everything a client can get wrong is checked here (the body: body.py; its messages and media: messages.py), before
the request joins the model's queue, and raised as a ``RequestError`` that the app turns into a 4xx JSON error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import with_article
from .body import Limits, RequestError
from .messages import MediaStore, message

# What a chat-completions body may hold: OpenAI's fields (honoured, refused when they cannot be, or harmless to
# ignore, like 'user') and the sampling extensions other local servers take. Any other name is a typo to report,
# not a setting to drop in silence ('temprature': 0 would otherwise sample at 1.0).
_FIELDS = {"model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
           "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
           "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "moderation",
           "reasoning_effort", "response_format", "safety_identifier",
           "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
           "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
           "top_k", "min_p", "repetition_penalty", "chat_template_kwargs"}


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    options: dict[str, Any]                 # ChatSession.stream's keywords (sampling, max_tokens)
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool = True        # False: the answer ends with its first call
    n: int = 1                              # answers (choices) to generate, one after another
    enable_thinking: bool = False


# Choices one request may ask for ('n'): they are generated one after another, each up to max_tokens long.
MAX_CHOICES = 8


def parse_chat(body: dict[str, Any], *, model_id: str, limits: Limits, media: MediaStore,
               default_thinking: bool = False) -> ChatRequest:
    """Check an OpenAI chat-completions body and turn it into a ``ChatRequest``."""
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(f"The model {model!r} is not served here; this server serves {model_id!r} "
                           "(see GET /v1/models).", status=404, param="model", code="model_not_found")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise RequestError(f"Unknown field(s) {', '.join(map(repr, unknown))} in the request; check the name (this "
                           "server reads OpenAI's chat-completions fields and top_k, min_p, repetition_penalty, "
                           "chat_template_kwargs).", param=unknown[0])
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects.",
                           param="messages")
    converted = [message(m, i, limits, media) for i, m in enumerate(messages)]
    # A conversation of instructions alone (a system or developer message last) is answered, as OpenAI does: the
    # model's turn follows it. An assistant message last would be answered by a second assistant turn.
    if converted[-1]["role"] not in ("user", "tool", "system"):
        raise RequestError("The last message must be a user message (or a system message, or a tool result) for the "
                           f"model to answer; it is {with_article(converted[-1]['role'])} message.", param="messages")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object like {'include_usage': true}.",
                           param="stream_options")
    unknown = sorted(set(stream_options) - {"include_usage", "include_obfuscation"})
    if unknown:   # ('include_usgae': true would give no usage, in silence)
        raise RequestError(f"Unknown field(s) {', '.join(map(repr, unknown))} in 'stream_options'; it takes "
                           "'include_usage'.", param="stream_options")
    tools, choice = _tools(body)
    options = _options(body, limits)
    if choice is not None:
        options["tool_choice"] = choice  # ChatSession.stream opens the answer with that call
    return ChatRequest(messages=converted, options=options, stream=_bool(body, "stream", False),
                       include_usage=_bool(stream_options, "include_usage", False), stop=_stop(body),
                       tools=tools, parallel_tool_calls=_bool(body, "parallel_tool_calls", True),
                       enable_thinking=_thinking(body, default_thinking), n=_int(body, "n", 1, MAX_CHOICES, 1))


# -- sampling ------------------------------------------------------------------------------------------------------
def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise RequestError(f"'{name}' must be a number in [{lo:g}, {hi:g}]; got {value!r}.", param=name)
    return value


def _int(body: dict[str, Any], name: str, lo: int, hi: int, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"'{name}' must be a whole number in [{lo}, {hi}]; got {value!r}.", param=name)
    return value


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false; got {value!r}.", param=name)
    return value


def _options(body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is not None and isinstance(max_tokens, int) and not isinstance(max_tokens, bool) \
            and max_tokens > limits.max_tokens:
        raise RequestError(f"'{name}' is {max_tokens}, over this server's limit of {limits.max_tokens} tokens per "
                           "answer; ask for fewer (or start the server with a higher --max-tokens).", param=name)
    temperature, top_p = _number(body, "temperature", 0.0, 2.0, 1.0), _number(body, "top_p", 0.0, 1.0, 1.0)
    options = {"max_tokens": _int(body, name, 1, limits.max_tokens, limits.max_tokens),
               # top_p 0 keeps only the most likely token, which is greedy decoding (the sampler takes (0, 1]; 0
               # was read as 1, no cut at all).
               "temperature": 0.0 if top_p == 0 else temperature,
               "top_p": top_p or 1.0,
               "top_k": _int(body, "top_k", 0, 2**31 - 1, 0),
               "min_p": _number(body, "min_p", 0.0, 0.999, 0.0)}
    # OpenAI's seed is any 64-bit integer: a negative seed is the same 64 bits read unsigned, as MLX takes them;
    # but -1 is llama.cpp's "any seed" (clients send it for that: it gave the same answer every time).
    seed = _int(body, "seed", -2**63, 2**64 - 1, None)
    if seed is not None and seed != -1:
        options["seed"] = seed % 2**64
    penalty = _number(body, "repetition_penalty", 0.01, 10.0, None)
    if penalty is not None:
        options["repetition_penalty"] = penalty
    return options


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Settings this server cannot honour are refused rather than silently ignored."""
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"'{name}' is not supported; use 'repetition_penalty' (e.g. 1.1) instead.",
                               param=name)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError("Log-probabilities are not returned by this server; drop 'logprobs'.", param="logprobs")
    if body.get("functions") or body.get("function_call") is not None:
        raise RequestError("The legacy 'functions' / 'function_call' fields are not supported; send the functions "
                           "as 'tools': [{'type': 'function', 'function': {...}}] (and 'tool_choice').",
                           param="functions" if body.get("functions") else "function_call")
    if body.get("logit_bias"):
        raise RequestError("'logit_bias' is not supported (token ids are this model's own, not OpenAI's); drop it.",
                           param="logit_bias")
    modalities = body.get("modalities")
    if (modalities is not None and modalities != ["text"]) or body.get("audio") is not None:
        raise RequestError("This server answers in text only: 'modalities' may only be [\"text\"], and 'audio' "
                           "(spoken answers) is not supported. Audio input goes in a message as an 'input_audio' "
                           "part.", param="modalities" if body.get("audio") is None else "audio")
    if body.get("moderation") is not None:
        raise RequestError("This server does not run moderation on requests or answers; drop 'moderation'.",
                           param="moderation")
    if body.get("web_search_options") is not None:
        raise RequestError("This server does not search the web; drop 'web_search_options'.",
                           param="web_search_options")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError("Only 'response_format': {'type': 'text'} is supported (no JSON mode or schemas); "
                           "ask for JSON in the prompt instead.", param="response_format")


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 non-empty strings.",
                           param="stop")
    return stop


def _thinking(body: dict[str, Any], default: bool) -> bool:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise RequestError(f"'chat_template_kwargs' must be an object like {{\"enable_thinking\": true}}; got "
                           f"{_json_type(kwargs)}.", param="chat_template_kwargs")
    unknown = sorted(set(kwargs or ()) - {"enable_thinking"})
    if unknown:   # ('enable_thinkng': true answered without thinking, in silence)
        raise RequestError(f"Unknown key(s) {', '.join(map(repr, unknown))} in 'chat_template_kwargs'; Gemma 4's "
                           "template takes 'enable_thinking'.", param="chat_template_kwargs")
    if isinstance(kwargs, dict) and "enable_thinking" in kwargs:
        return _bool(kwargs, "enable_thinking", default)
    effort = body.get("reasoning_effort")
    if effort is None:
        return default
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise RequestError(f"'reasoning_effort' must be none, minimal, low, medium or high; got {effort!r}.",
                           param="reasoning_effort")
    return effort not in ("none", "minimal")  # Gemma 4 thinks or does not; there are no levels


def _json_type(value: Any) -> str:
    """What a JSON value is, as a client would say it: "a string", "an array", ..."""
    for kind, name in ((bool, "a boolean"), (str, "a string"), (list, "an array"), (dict, "an object"),
                       ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else with_article(type(value).__name__)


# -- tools -----------------------------------------------------------------------------------------------------------
def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The tools to declare, and what the answer must open with: None (the model decides), "required" (a call of
    some tool), a tool's name (a call of that tool) or "none" (no call)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice' asks for a tool call but no 'tools' were given.", param="tool_choice")
        return None, None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise RequestError("'tools' must be a list of {'type': 'function', 'function': {'name': ..., "
                           "'description': ..., 'parameters': {...}}} objects.", param="tools")
    for i, t in enumerate(tools):
        params = t["function"].get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(f"'tools[{i}].function.parameters' must be a JSON Schema object like {{\"type\": "
                               f"\"object\", \"properties\": {{...}}}}; got {_json_type(params)}.", param="tools")
    if choice in (None, "auto") or (choice == "none" and not tools):
        return tools or None, None
    if choice == "none":  # declared, as OpenAI does (a conversation with calls in it reads the same), not callable
        return tools, "none"
    if not tools:
        raise RequestError("'tool_choice' asks for a tool call but 'tools' is empty.", param="tool_choice")
    if choice == "required":
        return tools, "required"
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not any(t["function"]["name"] == name for t in tools):
            raise RequestError(f"'tool_choice' names {name!r}, which is not among 'tools'.", param="tool_choice")
        return tools, name   # all declared, as OpenAI does (the prompt is the conversation's); this one forced
    raise RequestError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                       "{'name': ...}}.", param="tool_choice")

