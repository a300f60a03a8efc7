"""mlx_gemma4/tool_loop.py on the tiny random model, forced by a logits processor to write given calls, so the real
tokenizer, chat template, detokenizer and cache reuse are all in the path."""

from __future__ import annotations

import pytest
from PIL import Image

from mlx_gemma4 import ChatSession, ToolLoop, run_tools
from mlx_gemma4.chat import ChatResponse
from mlx_gemma4.errors import InputError
from mlx_gemma4.processing.processor import Processor
from mlx_gemma4.tool_loop import ToolRun
from mlx_gemma4.tools import ToolCallError
from mlx_gemma4.weights import load_model
from tests import tiny
from tests.helpers import ScriptedAnswers

QUOTE = '<|"|>'
WAIT = "<|tool_response>"  # the token a call ends its turn with


def get_weather(city: str, days: int = 1) -> str:
    """The weather in a city.

    Args:
        city: The city's name.
        days: How many days ahead.
    """
    return f"sunny in {city} for {days} days"


def boom(n: int) -> dict:
    """Always fails."""
    raise ValueError(f"cannot do {n}")


@pytest.fixture(scope="module")
def loaded(checkpoint_factory):
    _, path = checkpoint_factory("e")
    return load_model(path), Processor.from_pretrained(path)


def ask(text="weather in Paris?"):
    return [{"role": "user", "content": text}]


def run(session, processor, answers, messages=None, **kw):
    force = ScriptedAnswers(processor, answers)
    return ToolLoop(session, messages or ask(), max_tokens=80, logits_processors=[force], temperature=0.0, **kw)


def test_loop_runs_the_call_and_answers_from_its_result(loaded):
    model, processor = loaded
    session = ChatSession(model, processor, tools=[get_weather])
    call = f"<|tool_call>call:get_weather{{city:{QUOTE}Paris{QUOTE},days:2}}<tool_call|>"
    loop = run(session, processor, [call + WAIT, "It is sunny.<turn|>"])
    events = list(loop)
    kinds = [type(e).__name__ for e in events]
    at = kinds.index("ToolRun")
    assert set(kinds[:at]) == {"ChatResponse"} and set(kinds[at + 1:]) == {"ChatResponse"}
    [ran] = loop.runs
    assert ran.call.arguments == {"city": "Paris", "days": 2} and ran.result == "sunny in Paris for 2 days"
    assert ran.error is None and loop.finished and loop.steps == 2
    assert loop.answer.text == "It is sunny." and loop.answer.tool_calls == []
    assert [m["role"] for m in loop.messages] == ["user", "assistant", "tool", "assistant"]
    assert loop.messages[2]["tool_call_id"] == loop.messages[1]["tool_calls"][0]["id"]
    # The second step prefilled only the result: the call the model wrote is what the history renders.
    first_prompt = len(session.encode(ask()).ids)
    assert session.last_reused >= first_prompt + len(processor.tokenizer.encode(call, add_special_tokens=False))
    # The whole conversation renders as one model turn that continues after the result.
    prompt = processor.apply_chat_template(loop.messages, tools=[get_weather], add_generation_prompt=False)
    assert prompt.endswith(call + "<|tool_response>response:get_weather{value:" + QUOTE + ran.result + QUOTE
                           + "}<tool_response|>It is sunny.<turn|>\n")
    assert prompt.count("<|turn>model") == 1


def test_failing_and_unknown_tools_are_told_to_the_model(loaded):
    model, processor = loaded
    session = ChatSession(model, processor)
    calls = "<|tool_call>call:boom{n:3}<tool_call|><|tool_call>call:nope{}<tool_call|>"
    loop = run(session, processor, [calls + WAIT, "Sorry.<turn|>"], tools=[boom])
    list(loop)
    assert [r.error for r in loop.runs] == ["ValueError: cannot do 3",
                                             "There is no tool named 'nope'; the tools are: boom."]
    assert all(r.result.startswith("Error: ") for r in loop.runs)
    assert [m.get("content") for m in loop.messages if m["role"] == "tool"] == [r.result for r in loop.runs]
    assert loop.finished and loop.answer.text == "Sorry."


def test_step_limit_stops_with_the_calls_unanswered(loaded):
    model, processor = loaded
    session = ChatSession(model, processor, tools=[get_weather])
    call = f"<|tool_call>call:get_weather{{city:{QUOTE}Oslo{QUOTE}}}<tool_call|>" + WAIT
    loop = run(session, processor, [call] * 3, max_steps=2)
    list(loop)
    assert not loop.finished and loop.steps == 2 and len(loop.runs) == 1
    assert loop.messages[-1]["role"] == "assistant" and loop.messages[-1]["tool_calls"]
    with pytest.raises(InputError, match="max_steps"):
        ToolLoop(session, ask(), max_steps=0)


def test_malformed_call_raises_with_the_raw_text(loaded):
    model, processor = loaded
    session = ChatSession(model, processor, tools=[get_weather])
    bad = "<|tool_call>call:get_weather{city:Paris}<tool_call|>"
    with pytest.raises(ToolCallError) as info:
        list(run(session, processor, [bad + WAIT]))
    assert info.value.raw == bad


def test_run_tools_and_a_tool_that_returns_an_image(checkpoint_factory):
    _, path = checkpoint_factory("e", vision=tiny.VISION)
    model, processor = load_model(path), Processor.from_pretrained(path)
    processor.image_processor.max_soft_tokens = 70

    def snapshot(place: str) -> Image.Image:
        """A picture of a place.

        Args:
            place: Where.
        """
        return Image.new("RGB", (40, 30), "blue")

    session = ChatSession(model, processor)
    call = f"<|tool_call>call:snapshot{{place:{QUOTE}sea{QUOTE}}}<tool_call|>"
    force = ScriptedAnswers(processor, [call + WAIT, "Blue.<turn|>"])
    loop = run_tools(session, ask("show me the sea"), [snapshot], max_tokens=80, logits_processors=[force],
                     temperature=0.0)
    assert loop.finished and loop.answer.text == "Blue."
    result = loop.messages[2]["content"]
    assert result[0]["type"] == "image" and isinstance(result[0]["image"], Image.Image)
    enc = session.encode(loop.messages[:3], tools=[snapshot])
    assert [it.kind for _, _, it in enc.items] == ["image"]
    assert isinstance(loop.runs[0], ToolRun) and not isinstance(loop.runs[0], ChatResponse)
