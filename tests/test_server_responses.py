"""mlx_gemma4/server/responses.py and requests.py without a server: the answer split into thoughts, text and tool
calls wherever the stream is cut, stop strings, and the request checks."""

from __future__ import annotations

import base64
import json

import pytest

from mlx_gemma4.errors import InputError
from mlx_gemma4.server.requests import Limits, MediaStore, RequestError, parse_chat
from mlx_gemma4.server.responses import Answer, message

TEXT = ('<|channel>thought\nplan: call it<channel|>Sure, '
        '<|tool_call>call:f{q:<|"|>a, {b}<|"|>,n:[1,{x:2}]}<tool_call|> and done.')


def run(pieces: list[str], stop: list[str] | None = None) -> tuple[dict, Answer]:
    answer = Answer(stop)
    deltas = [d for p in pieces for d in answer.feed(p)] + answer.close()
    return message(deltas), answer


def test_whole_answer_split_into_parts():
    msg, answer = run([TEXT])
    assert msg["reasoning_content"] == "plan: call it"
    assert msg["content"] == "Sure,  and done."
    assert [json.loads(c["function"]["arguments"]) for c in msg["tool_calls"]] == [{"q": "a, {b}", "n": [1, {"x": 2}]}]
    assert answer.calls[0].name == "f"


def test_every_split_point_gives_the_same_message():
    whole, _ = run([TEXT])
    for cut in range(len(TEXT) + 1):
        for cut2 in (cut, min(len(TEXT), cut + 7)):
            msg, _ = run([TEXT[:cut], TEXT[cut:cut2], TEXT[cut2:]])
            strip = {k: v for k, v in msg.items() if k != "tool_calls"}
            assert strip == {k: v for k, v in whole.items() if k != "tool_calls"}, (cut, cut2)
            assert [c["function"] for c in msg["tool_calls"]] == [c["function"] for c in whole["tool_calls"]]


def test_stop_string_across_pieces_and_held_back_text():
    answer = Answer(["END"])
    assert answer.feed("abc E") == [{"content": "abc "}]  # "E" may start the stop string
    assert answer.feed("Nx") == [{"content": "ENx"}]      # it did not
    assert answer.feed("yy EN") == [{"content": "yy "}]
    assert answer.feed("D more") == [] and answer.stopped
    assert answer.feed("after") == [] and answer.close() == []


def test_malformed_or_unfinished_call_stays_text():
    bad = "A <|tool_call>call:f{x:}<tool_call|> B <|tool_call>call:g{}<tool_call|>C"
    for cut in range(len(bad) + 1):
        msg, answer = run([bad[:cut], bad[cut:]])
        assert msg["content"] == "A <|tool_call>call:f{x:}<tool_call|> B C", cut
        assert [c.name for c in answer.calls] == ["g"]
    msg, _ = run(["A <|tool_call>call:f{x:1"])
    assert msg["content"] == "A <|tool_call>call:f{x:1" and "tool_calls" not in msg


@pytest.fixture
def store(tmp_path):
    return MediaStore(tmp_path)


def parse(store, **body):
    return parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, model_id="m",
                      limits=Limits(max_tokens=64), media=store)


def test_request_becomes_chat_messages_and_options(store):
    png = base64.b64encode(b"\x89PNG fake").decode()
    req = parse(store, messages=[
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}], max_tokens=9, temperature=0, seed=3,
        stop="x", stream=True, stream_options={"include_usage": True})
    system, user, assistant, tool = req.messages
    assert system == {"role": "system", "content": "rules"}
    image = user["content"][1]
    assert image["type"] == "image" and open(image["image"], "rb").read() == b"\x89PNG fake"
    assert assistant["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    assert tool == {"role": "tool", "tool_call_id": "c1", "content": "42"}
    assert req.options == {"max_tokens": 9, "temperature": 0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": 3}
    assert req.stop == ["x"] and req.stream and req.include_usage
    again = parse(store, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}])
    assert again.messages[0]["content"][0]["image"] == image["image"]  # same bytes, same file: the cache sees it


@pytest.mark.parametrize("body,fragment", [
    (dict(messages="hi"), "non-empty list"),
    (dict(max_completion_tokens=65), "limit of 64"),
    (dict(top_p=2), "'top_p'"),
    (dict(stop=["a", "b", "c", "d", "e"]), "up to 4"),
    (dict(stream="yes"), "'stream' must be true or false"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(tool_choice={"type": "function", "function": {"name": "g"}},
          tools=[{"type": "function", "function": {"name": "f"}}]), "not among 'tools'"),
    (dict(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{bad"}}]}, {"role": "tool", "content": "1"}]), "not valid JSON"),
    (dict(reasoning_effort="max"), "reasoning_effort"),
])
def test_bad_requests_name_the_problem(store, body, fragment):
    with pytest.raises(RequestError) as e:
        parse(store, **body)
    assert fragment in str(e.value) and isinstance(e.value, InputError) and e.value.status == 400


def test_paths_only_when_allowed(store, tmp_path):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/x/y.png"}}]}]}
    assert parse(store, **body).messages[0]["content"][0]["image"] == "/x/y.png"
    with pytest.raises(RequestError, match="--allow-paths"):
        parse_chat({"model": "m", **body}, model_id="m", limits=Limits(allow_paths=False), media=store)
