"""mlx_gemma4/tools.py on what the real chat template and tokenizer of the tiny checkpoints write."""

from __future__ import annotations

from typing import Literal, Optional

import pytest

from mlx_gemma4.errors import InputError
from mlx_gemma4.processing.processor import Processor
from mlx_gemma4.tools import ToolCall, ToolCallStream, parse_tool_calls, tool_schema

QUOTE = '<|"|>'


@pytest.fixture(scope="module")
def processor(checkpoint_factory):
    return Processor.from_pretrained(checkpoint_factory("e")[1])


def render_calls(processor, calls: list[dict]) -> str:
    """The model's side of a turn holding ``calls``, as the template writes it and the tokenizer reads it back."""
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": c} for c in calls]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=False)
    answer = prompt[prompt.index("<|turn>model\n") + len("<|turn>model\n"):]
    # A pending call leaves the turn open on <|tool_response>, the stop token the model ends its answer with.
    assert answer.endswith("<tool_call|><|tool_response>")
    ids = processor.tokenizer.encode(answer.removesuffix("<|tool_response>"), add_special_tokens=False)
    return processor.decode(ids)


NESTED = {"name": "plan", "arguments": {
    "steps": [{"do": "walk", "km": 2.5}, {"do": "rest", "km": 0}],
    "meta": {"tags": ["a", "b"], "ok": True, "off": False, "deep": {"x": [[1, -2], []]}},
    "note": "", "big": 12345678901234, "small": 1e-05}}
TRICKY = {"name": "echo", "arguments": {
    "braces": "{a:1}, [b]", "commas": "x, y, z", "quote": f"say {QUOTE}hi{QUOTE} now",
    "colon": "k:v", "newline": "line one\nline two", "markers": "<|tool> <tool|>"}}


def test_single_call_round_trip(processor):
    text = render_calls(processor, [{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}])
    assert text.startswith("<|tool_call>call:get_weather{city:" + QUOTE + "Paris" + QUOTE)
    calls, rest = parse_tool_calls(text)
    assert calls == [ToolCall("get_weather", {"city": "Paris", "days": [1, 2]})]
    assert calls[0].raw.startswith("<|tool_call>") and calls[0].raw.endswith("<tool_call|>")
    assert rest == text[text.index("<tool_call|>") + len("<tool_call|>"):]


def test_several_calls_and_text_between(processor):
    first = render_calls(processor, [{"name": "a", "arguments": {"n": 1}}, {"name": "b", "arguments": {}}])
    calls, rest = parse_tool_calls("Let me look." + first)
    assert [c.name for c in calls] == ["a", "b"] and calls[0].arguments == {"n": 1} and calls[1].arguments == {}
    assert rest.startswith("Let me look.") and "<|tool_call>" not in rest


@pytest.mark.parametrize("call", [NESTED, TRICKY], ids=["nested", "tricky-strings"])
def test_values_round_trip(processor, call):
    text = render_calls(processor, [call])
    calls, _ = parse_tool_calls(text)
    assert calls[0].name == call["name"] and calls[0].arguments == call["arguments"]
    # What comes back renders to the same text: the parsed call is fit for the next turn's history.
    assert render_calls(processor, [calls[0].to_message()["function"]]) == text


def test_stream_at_every_split_point(processor):
    text = "Sure." + render_calls(processor, [TRICKY, NESTED])
    whole, rest = parse_tool_calls(text)
    for cut in range(len(text) + 1):
        stream = ToolCallStream()
        events = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.close()
        assert [e for e in events if isinstance(e, ToolCall)] == whole, cut
        assert "".join(e for e in events if isinstance(e, str)) == rest, cut


def test_stream_token_by_token_emits_text_early(processor):
    text = "Checking now." + render_calls(processor, [NESTED]) + "done"
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    stream, events, seen_text_before_call = ToolCallStream(), [], False
    for i in ids:
        new = stream.feed(processor.decode([i]))
        if any(isinstance(e, str) for e in new) and not any(isinstance(e, ToolCall) for e in events):
            seen_text_before_call = True
        events += new
    events += stream.close()
    assert seen_text_before_call
    assert [e for e in events if isinstance(e, ToolCall)] == [ToolCall(NESTED["name"], NESTED["arguments"])]
    assert "".join(e for e in events if isinstance(e, str)) == "Checking now.done"


@pytest.mark.parametrize("bad", [
    "<|tool_call>call:f{a:<|\"|>x}<tool_call|>",       # unterminated string
    "<|tool_call>call:f{a:1,}<tool_call|>",            # dangling comma
    "<|tool_call>f{a:1}<tool_call|>",                  # no call: prefix
    "<|tool_call>call:f{a:maybe}<tool_call|>",         # bare word
    "<|tool_call>call:f{a:[1,2}<tool_call|>",          # unclosed list
    "<|tool_call>call:f{a:1}}<tool_call|>",            # text after the arguments
    "text <|tool_call>call:f{a:1}",                    # never closed
])
def test_malformed_call_keeps_raw_text(bad):
    with pytest.raises(InputError) as info:
        parse_tool_calls(bad)
    assert info.value.raw == bad[bad.index("<|tool_call>"):]
    assert "tool call" in str(info.value)


def test_malformed_call_in_stream_raises_once_closed():
    stream = ToolCallStream()
    assert stream.feed("hi <|tool_call>call:f{a:") == ["hi "]
    with pytest.raises(InputError) as info:
        stream.feed("oops}<tool_call|>")
    assert info.value.raw == "<|tool_call>call:f{a:oops}<tool_call|>"


def weather(city: str, days: int, unit: Literal["celsius", "fahrenheit"] = "celsius",
            scale: float = 1.0, metric: bool = True, tags: list[str] | None = None,
            extra: dict | None = None, raw: list | None = None,
            where: Optional[dict[str, int]] = None, level: Literal[1, 2] = 1):  # noqa: UP045 (Optional is a case)
    """Get the weather
    for a city.

    More words that are not the description.

    Args:
        city: The city name.
        days (int): How many days,
            counted from today.
        unit: Temperature unit.

    Returns:
        A forecast.
    """


def test_schema_from_function_with_each_hint():
    schema = tool_schema(weather)
    fn = schema["function"]
    assert schema["type"] == "function" and fn["name"] == "weather"
    assert fn["description"] == "Get the weather for a city."
    params = fn["parameters"]
    assert params["type"] == "object" and params["required"] == ["city", "days"]
    assert params["properties"] == {
        "city": {"description": "The city name.", "type": "string"},
        "days": {"description": "How many days, counted from today.", "type": "integer"},
        "unit": {"description": "Temperature unit.", "type": "string", "enum": ["celsius", "fahrenheit"]},
        "scale": {"type": "number"},
        "metric": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "nullable": True},
        "extra": {"type": "object", "nullable": True},
        "raw": {"type": "array", "nullable": True},
        "where": {"type": "object", "nullable": True},
        "level": {"type": "integer", "enum": [1, 2]},
    }


def test_schema_dicts_pass_through():
    full = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    assert tool_schema(full) is full
    assert tool_schema(full["function"]) == full


def no_hint(x):
    """Nothing."""


def bad_union(x: int | str):
    """Nothing."""


def bad_type(x: complex):
    """Nothing."""


def star(*args: int):
    """Nothing."""


@pytest.mark.parametrize("fn, words", [
    (no_hint, "no type hint"), (bad_union, "type hint"), (bad_type, "complex"), (star, "*args"),
    (lambda x: x, "def"), (42, "function or a JSON-schema dict"), (dict, "not the class dict")])
def test_schema_errors_say_what_to_do(fn, words):
    with pytest.raises(InputError, match=r"(?s).*" + words.replace("*", r"\*")):
        tool_schema(fn)


def test_an_answer_that_is_not_text_is_named():
    """parse_tool_calls(None) and split_answer(None) were TypeErrors from string concatenation inside."""
    from mlx_gemma4.tool_use import split_answer

    for fn in (parse_tool_calls, split_answer):
        with pytest.raises(InputError, match="takes the model's answer as a string; got None"):
            fn(None)


def test_template_renders_declarations_from_schemas(processor):
    messages = [{"role": "user", "content": "Weather?"}]
    prompt = processor.apply_chat_template(messages, tools=[tool_schema(weather)])
    assert prompt.startswith("<bos><|turn>system\n<|tool>declaration:weather{description:"
                             + QUOTE + "Get the weather for a city." + QUOTE)
    assert "city:{description:" + QUOTE + "The city name." + QUOTE + ",type:" + QUOTE + "STRING" + QUOTE + "}" in prompt
    assert "enum:[" + QUOTE + "celsius" + QUOTE + "," + QUOTE + "fahrenheit" + QUOTE + "]" in prompt
    assert "required:[" + QUOTE + "city" + QUOTE + "," + QUOTE + "days" + QUOTE + "]" in prompt
    assert prompt.count("<|tool>") == 1 and "<tool|>" in prompt


def test_template_takes_functions_as_tools(processor):
    messages = [{"role": "user", "content": "Weather?"}]
    assert (processor.apply_chat_template(messages, tools=[weather])
            == processor.apply_chat_template(messages, tools=[tool_schema(weather)]))
    with pytest.raises(InputError, match="no type hint"):
        processor.apply_chat_template(messages, tools=[no_hint])


def test_stream_can_hand_back_malformed_calls_and_go_on():
    stream = ToolCallStream(keep_errors=True)
    events = stream.feed("a <|tool_call>call:f{x:bad}<tool_call|> b <|tool_call>call:g{y:1}<tool_call|>")
    events += stream.feed(" c <|tool_call>call:h{") + stream.close()
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["str", "ToolCallError", "str", "ToolCall", "str", "ToolCallError"]
    assert events[1].raw == "<|tool_call>call:f{x:bad}<tool_call|>" and events[3] == ToolCall("g", {"y": 1})
    assert events[5].raw == "<|tool_call>call:h{"


def test_a_function_without_a_docstring_gets_a_schema_without_a_description():
    """tool_schema(add) for a plain `def add(a: int, b: int)` raised IndexError (found by an API audit)."""
    def add(a: int, b: int) -> int:
        return a + b

    def blank(x: str) -> None:
        """"""

    assert tool_schema(add)["function"] == {"name": "add", "description": "", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
    assert tool_schema(blank)["function"]["description"] == ""
