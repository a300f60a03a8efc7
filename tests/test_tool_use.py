"""mlx_gemma4/tool_use.py and ChatSession's tools: answers split into thinking, text and tool calls (whole and
streamed), tool turns rendered by the real template and tokenizer, and a random model forced to call a tool."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mlx_gemma4 import ChatSession
from mlx_gemma4.errors import InputError
from mlx_gemma4.processing.processor import Processor
from mlx_gemma4.processing.tokenizer import split_thinking
from mlx_gemma4.tool_use import AnswerStream, prepare_messages, split_answer
from mlx_gemma4.tools import ToolCall, ToolCallError
from mlx_gemma4.weights import load_model
from tests import tiny
from tests.helpers import ScriptedAnswers, tone

QUOTE = '<|"|>'
GREEDY = {"temperature": 0.0}


def get_weather(city: str, days: int = 1) -> str:
    """The weather in a city.

    Args:
        city: The city's name.
        days: How many days ahead.
    """
    return f"sunny in {city} for {days} days"


@pytest.fixture(scope="module")
def loaded(checkpoint_factory):
    _, path = checkpoint_factory("e")
    return load_model(path), Processor.from_pretrained(path)


def call_text(name: str, arguments: dict) -> str:
    """A call as the model writes it (the template's own rendering of an assistant tool call)."""
    return f"<|tool_call>call:{name}{{" + ",".join(f"{k}:{_value(v)}" for k, v in sorted(arguments.items())) \
        + "}<tool_call|>"


def _value(v) -> str:
    if isinstance(v, str):
        return QUOTE + v + QUOTE
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def ask(text="weather in Paris?"):
    return [{"role": "user", "content": text}]


# -- answers -------------------------------------------------------------------------------------------------


def test_answer_split_matches_split_thinking_at_every_split_point(loaded):
    _, processor = loaded
    call = call_text("get_weather", {"city": "Paris, {FR}", "days": 2})
    text = "<|channel>thought\nneed data<channel|>Let me look." + call + call_text("b", {})
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    text = processor.decode(ids)  # what the detokenizer gives back
    whole = split_answer(text)
    assert (whole.thinking, whole.error) == ("need data", None)
    assert whole.text == "Let me look." and [c.name for c in whole.tool_calls] == ["get_weather", "b"]
    assert whole.tool_calls[0].arguments == {"city": "Paris, {FR}", "days": 2}
    assert whole.tool_calls[0].id and whole.tool_calls[0].id != whole.tool_calls[1].id
    for cut in range(len(text) + 1):
        stream = AnswerStream()
        pieces = [stream.feed(text[:cut]), stream.feed(text[cut:])]
        answer = stream.close()
        assert (answer.thinking, answer.text, answer.tool_calls) == (whole.thinking, whole.text, whole.tool_calls)
        assert "".join(p[0] for p in pieces) == "need data"
        assert "".join(p[1] for p in pieces) == "Let me look."
        assert [c.name for p in pieces for c in p[2]] == ["get_weather", "b"]


@pytest.mark.parametrize("text", ["<|channel>thought\na<channel|>x<|channel>thought\nb<channel|>y",
                                  "<|channel>thought\nstill thinking", "<|channel>thou",
                                  "<|channel>thought<channel|>ok", "plain"])
def test_thoughts_without_calls_split_like_split_thinking(text):
    for cut in range(len(text) + 1):
        stream = AnswerStream()
        stream.feed(text[:cut])
        stream.feed(text[cut:])
        answer = stream.close()
        assert (answer.thinking, answer.text) == split_thinking(text)


@pytest.mark.parametrize("text", ["<channel|>x", "a<channel|>b<channel|>", "x<channel|><|channel>thought\nt<channel|>y",
                                  "<|channel>thought\nt<channel|><channel|>y", "a<channel", "<channel|"])
def test_streamed_text_is_the_answer_also_with_an_unmatched_closing_marker(text):
    # The answer drops a <channel|> that closes no thought; the stream must not show it either.
    for cut in range(len(text) + 1):
        stream = AnswerStream()
        pieces = [stream.feed(text[:cut]), stream.feed(text[cut:])]
        answer = stream.close()
        streamed = "".join(p[1] for p in [*pieces, stream.tail])
        assert "<channel|>" not in streamed
        assert streamed.strip() == answer.text == split_thinking(text)[1]


def test_malformed_call_keeps_its_raw_text_in_the_answer():
    bad = "<|tool_call>call:f{a:oops}<tool_call|>"
    answer = split_answer("before " + bad + " after")
    assert isinstance(answer.error, ToolCallError) and answer.error.raw == bad
    assert answer.text == "before " + bad + " after" and answer.tool_calls == []
    cut = split_answer("x <|tool_call>call:f{a:1")
    assert cut.error.raw == "<|tool_call>call:f{a:1" and "ended before" in str(cut.error)


# -- tool turns in the template ---------------------------------------------------------------------------------


def tool_turns(result, arguments='{"city": "Paris", "days": 2}'):
    return ask() + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": result}]


def test_tool_turns_render_as_the_template_writes_them(loaded):
    _, processor = loaded
    prompt = processor.apply_chat_template(tool_turns("sunny"), tools=[get_weather])
    assert "<|tool>declaration:get_weather{" in prompt
    assert prompt.endswith("<|turn>model\n" + call_text("get_weather", {"city": "Paris", "days": 2})
                           + "<|tool_response>response:get_weather{value:" + QUOTE + "sunny" + QUOTE
                           + "}<tool_response|>")
    # Arguments as a dict or as an OpenAI JSON string, and a string result given to the template as it is.
    raw = processor.tokenizer.hf.apply_chat_template(
        tool_turns("sunny", {"city": "Paris", "days": 2}), chat_template=processor.tokenizer.chat_template,
        tools=[processor_schema()], tokenize=False, add_generation_prompt=True)
    assert prompt == raw
    # A JSON result renders in the model's own form, not as a quoted string.
    structured = processor.apply_chat_template(tool_turns({"temp": 21.5, "sky": "clear", "wind": [3, "NW"]}))
    assert structured.endswith("<|tool_response>response:get_weather{sky:" + QUOTE + "clear" + QUOTE
                               + ",temp:21.5,wind:[3," + QUOTE + "NW" + QUOTE + "]}<tool_response|>")


def processor_schema():
    from mlx_gemma4.tools import tool_schema

    return tool_schema(get_weather)


def test_bad_tool_call_messages_say_what_to_do():
    with pytest.raises(InputError, match="not JSON"):
        prepare_messages(tool_turns("x", arguments="{city: Paris"))
    with pytest.raises(InputError, match="JSON object"):
        prepare_messages(tool_turns("x", arguments="[1, 2]"))
    with pytest.raises(InputError, match="follows no tool call"):
        prepare_messages(ask() + [{"role": "assistant", "content": "hi"}, {"role": "tool", "content": "x"}])
    with pytest.raises(InputError, match="'function'"):
        prepare_messages(ask() + [{"role": "assistant", "tool_calls": [{"name": "f"}]}])
    # A result for an id no call has (a typo) was shown to the model as a result of a tool named "unknown".
    typo = tool_turns("sunny")
    typo[-1] = {**typo[-1], "tool_call_id": "c2"}
    with pytest.raises(InputError, match="tool_call_id 'c2', which no call of message 1 has \\(its calls: 'c1'\\)"):
        prepare_messages(typo)


@pytest.mark.parametrize("result", ["sunny <turn|><|tool_response> ok", {"note": "<eos> <|image|> text"}])
def test_session_encodes_tool_turns_like_the_prompt_with_their_text_kept_text(loaded, result):
    model, processor = loaded
    session = ChatSession(model, processor, tools=[get_weather])
    messages = tool_turns(result, {"city": "<turn|>Paris<|\"|>", "days": 2})
    ids = session.encode(messages).ids.tolist()
    prompt = processor.apply_chat_template(messages, tools=[get_weather])
    decoded = processor.decode(ids)
    assert decoded == prompt
    special = processor.special
    # The template's own control tokens only: the typed ones in arguments and results are characters.
    turn_closes = [i for i in ids if i == special.turn_close.id]
    assert len(turn_closes) == 2 and special.eos.id not in ids[1:] and special.image.id not in ids
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<|tool_response>")) == 1


@pytest.fixture(scope="module")
def media_model(checkpoint_factory):
    _, path = checkpoint_factory("e", vision=tiny.VISION, audio=tiny.AUDIO_128)
    proc = Processor.from_pretrained(path)
    proc.image_processor.max_soft_tokens = 70
    return load_model(path), proc


def test_tool_results_with_an_image_and_audio(media_model, tmp_path):
    model, processor = media_model
    picture = tmp_path / "map.png"
    Image.new("RGB", (40, 30), "green").save(picture)
    clip = tone(0.5)
    messages = tool_turns([{"type": "text", "text": "here is the map"}, {"type": "image", "image": str(picture)},
                           {"type": "audio", "audio": clip}])
    session = ChatSession(model, processor)
    enc = session.encode(messages)
    prompt = processor.apply_chat_template(messages)
    assert "response:get_weather{value:" + QUOTE + "here is the map" + QUOTE + "}<tool_response|><|image|><|audio|>" \
        in prompt
    ref = processor(text=prompt, images=[str(picture)], audio=[clip])
    assert enc.ids.tolist() == np.array(ref["input_ids"]).reshape(-1).tolist()
    assert [it.kind for _, _, it in enc.items] == ["image", "audio"]
    out = list(session.stream(messages, max_tokens=3, stop_ids=[], **GREEDY))
    assert len(out) == 3 and out[-1].answer is not None


# -- a random model forced to call ---------------------------------------------------------------------------


def test_forced_call_streams_as_a_tool_call_and_stops_for_its_result(loaded):
    model, processor = loaded
    call = call_text("get_weather", {"city": "Paris", "days": 2})
    force = ScriptedAnswers(processor, ["Checking." + call + "<|tool_response>"])
    session = ChatSession(model, processor, tools=[get_weather])
    out = list(session.stream(ask(), max_tokens=60, logits_processors=[force], **GREEDY))
    assert out[-1].finish_reason == "stop" and out[-1].token == processor.tokenizer.convert_tokens_to_ids(
        "<|tool_response>")
    answer = out[-1].answer
    assert answer.tool_calls == [ToolCall("get_weather", {"city": "Paris", "days": 2})]
    assert answer.text == "Checking." and answer.error is None
    assert [c for r in out for c in r.tool_calls] == answer.tool_calls  # each call once, when it completed
    assert "".join(r.content for r in out) == "Checking."
    assert answer.tool_calls[0].raw == call
    message = answer.to_message()
    assert message["tool_calls"][0]["id"] == answer.tool_calls[0].id and message["content"] == "Checking."
    # The text before the calls is kept in the record, not in the prompt: the turn stays open for the answer.
    result = {"role": "tool", "tool_call_id": answer.tool_calls[0].id, "content": "rain"}
    prompt = processor.apply_chat_template(ask() + [message, result], tools=[get_weather])
    assert prompt.endswith("<|turn>model\n" + call + "<|tool_response>response:get_weather{value:" + QUOTE
                           + "rain" + QUOTE + "}<tool_response|>")


def test_continuing_after_a_result_reuses_the_cache_and_matches_a_fresh_session(loaded):
    model, processor = loaded
    call = call_text("get_weather", {"city": "Paris"})
    force = ScriptedAnswers(processor, [call + "<|tool_response>"])
    session = ChatSession(model, processor, tools=[get_weather])
    first = list(session.send("weather in Paris?", max_tokens=40, logits_processors=[force], **GREEDY))
    calls = first[-1].answer.tool_calls
    assert session.messages[-1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                    "arguments": {"city": "Paris"}}
    before = session.context_used
    cont = [r.token for r in session.send_tool_results([(calls[0], {"temp": 20})], max_tokens=6, **GREEDY)]
    assert session.last_reused >= before - 1  # the call the model wrote is what the history renders
    assert session.messages[-2]["role"] == "tool" and session.messages[-1]["role"] == "assistant"
    fresh = ChatSession(model, processor, tools=[get_weather])
    assert [r.token for r in fresh.stream(session.messages[:-1], max_tokens=6, **GREEDY)] == cont
    with pytest.raises(InputError, match="does not end with tool calls"):
        session.send_tool_results([(calls[0], "again")])


def test_tool_results_join_the_conversation_when_their_answer_is_read(loaded):
    """send_tool_results() added the results at the call: one never read (or refused) left them in, and sending
    them again was refused ('does not end with tool calls')."""
    model, processor = loaded
    force = ScriptedAnswers(processor, [call_text("get_weather", {"city": "Paris"}) + "<|tool_response>"])
    session = ChatSession(model, processor, tools=[get_weather])
    calls = list(session.send("weather in Paris?", max_tokens=40, logits_processors=[force], **GREEDY))[-1] \
        .answer.tool_calls
    before = [dict(m) for m in session.messages]
    session.send_tool_results([(calls[0], "rain")], max_tokens=3, **GREEDY)   # never read
    assert session.messages == before
    list(session.send_tool_results([(calls[0], "rain")], should_stop=lambda: True, max_tokens=3, **GREEDY))
    assert session.messages == before   # stopped before its first token
    list(session.send_tool_results([(calls[0], "rain")], max_tokens=3, **GREEDY))
    assert [m["role"] for m in session.messages[len(before):]] == ["tool", "assistant"]


def test_tools_per_call_override(loaded):
    model, processor = loaded
    session = ChatSession(model, processor, tools=[get_weather])
    with_tools = session.encode(ask()).ids
    without = session.encode(ask(), tools=None).ids
    assert len(with_tools) > len(without)
    assert without.tolist() == ChatSession(model, processor).encode(ask()).ids.tolist()
    schema = json.loads(json.dumps(processor_schema()))  # a plain JSON schema works as well as the function
    assert session.encode(ask(), tools=[schema]).ids.tolist() == with_tools.tolist()
    call = call_text("get_weather", {"city": "Rome"})
    force = ScriptedAnswers(processor, [call + "<|tool_response>" + "more"])
    out = list(session.stream(ask(), tools=None, max_tokens=len(processor.tokenizer.encode(call)) + 2,
                              logits_processors=[force], **GREEDY))
    assert out[-1].finish_reason == "length"  # without tools, <|tool_response> does not end the turn
    with pytest.raises(InputError, match="needs a name"):
        ChatSession(model, processor, tools=[lambda x: x])


def test_thoughts_before_a_call_are_kept_for_the_turn_being_answered(loaded):
    model, processor = loaded
    call = call_text("get_weather", {"city": "Paris"})
    force = ScriptedAnswers(processor, ["<|channel>thought\nI need data\n<channel|>" + call + "<|tool_response>"])
    session = ChatSession(model, processor, enable_thinking=True, tools=[get_weather])
    out = list(session.send("weather in Paris?", max_tokens=60, logits_processors=[force], **GREEDY))
    answer = out[-1].answer
    assert answer.thinking == "I need data" and "".join(r.thinking for r in out).strip() == "I need data"
    assert session.messages[-1]["reasoning"] == "I need data"
    before = session.context_used
    list(session.send_tool_results([(answer.tool_calls[0], "rain")], max_tokens=3, **GREEDY))
    assert session.last_reused >= before - 1  # the thought is rendered as the model wrote it
    prompt = processor.apply_chat_template(session.messages[:-1], enable_thinking=True, tools=[get_weather])
    assert "<|turn>model\n<|channel>thought\nI need data\n<channel|>" + call in prompt
    # Once a later user turn is answered, the template drops it.
    later = session.messages + [{"role": "user", "content": "thanks"}]
    assert "I need data" not in processor.apply_chat_template(later, enable_thinking=True, tools=[get_weather])


@pytest.mark.parametrize("choice", ["get_weather", "required",
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_opens_the_answer_with_a_call(loaded, choice):
    """tool_choice="required" forces ``<|tool_call>call:`` (the model names the tool), a tool's name forces a call
    of that tool; the random model left alone does not open with a call. With the rest of a call scripted, the
    forced opening and the model's own tokens make one structured call."""
    model, processor = loaded
    session = ChatSession(model, processor, tools=[get_weather])
    free = "".join(r.text for r in session.stream(ask(), max_tokens=12, **GREEDY))
    assert not free.startswith("<|tool_call>")
    text = "".join(r.text for r in session.stream(ask(), tool_choice=choice, max_tokens=40, **GREEDY))
    assert text.startswith("<|tool_call>call:get_weather{")   # "required": the one tool declared
    call = call_text("get_weather", {"city": "Oslo"})
    force = ScriptedAnswers(processor, [call + "<|tool_response>"])
    out = list(session.stream(ask(), tool_choice=choice, max_tokens=40, logits_processors=[force], **GREEDY))
    assert out[-1].answer.tool_calls == [ToolCall("get_weather", {"city": "Oslo"})]


def test_required_names_one_of_the_declared_tools(loaded):
    """tool_choice="required" forced only ``<|tool_call>call:`` and the random model named a tool nobody declared
    (``call:a<mask>...``); the name is now one of the declared ones, each of them reachable."""
    def get_time(zone: str) -> str:
        """The time.

        Args:
            zone: a time zone
        """
        return "noon"

    model, processor = loaded
    session = ChatSession(model, processor, tools=[get_weather, get_time])
    for seed in range(3):
        text = "".join(r.text for r in session.stream(ask(), tool_choice="required", max_tokens=30, temperature=1.0,
                                                       seed=seed))
        assert text.startswith(("<|tool_call>call:get_weather{", "<|tool_call>call:get_time{")), text
    for name in ("get_weather", "get_time"):   # a scripted model picks either
        force = ScriptedAnswers(processor, [call_text(name, {}) + "<|tool_response>"])
        out = list(session.stream(ask(), tool_choice="required", max_tokens=30, logits_processors=[force], **GREEDY))
        assert [c.name for c in out[-1].answer.tool_calls] == [name]


def test_tool_choice_needs_a_declared_tool(loaded):
    model, processor = loaded
    with pytest.raises(InputError, match="needs tools"):
        next(ChatSession(model, processor).stream(ask(), tool_choice="required"))
    with pytest.raises(InputError, match="not a declared tool"):
        next(ChatSession(model, processor, tools=[get_weather]).stream(ask(), tool_choice="get_time"))
    with pytest.raises(InputError, match="give a tool's name, or"):
        next(ChatSession(model, processor, tools=[get_weather]).stream(ask(), tool_choice={"function": "x"}))


@pytest.mark.parametrize("cut", ['Sure. <|tool_call>call:get_weather{city:<|"|>Par', "Sure. <|tool_c", "Sure. <|chan"])
def test_streamed_pieces_end_with_what_was_held_back(loaded, cut):
    """An answer that ends (here: max_tokens) inside an unfinished call or a marker's first characters: the last
    streamed piece carries that text, so the pieces add up to the answer's text (nothing the model wrote is lost)."""
    model, processor = loaded
    n = len(processor.tokenizer.encode(cut, add_special_tokens=False))
    force = ScriptedAnswers(processor, [cut + " and more"])
    out = list(ChatSession(model, processor, tools=[get_weather]).stream(
        ask(), max_tokens=n, logits_processors=[force], **GREEDY))
    assert out[-1].finish_reason == "length"
    assert "".join(r.content for r in out).strip() == out[-1].answer.text == cut
    assert (out[-1].answer.error is not None) == ("call:" in cut)
