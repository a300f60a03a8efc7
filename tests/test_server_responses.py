"""mlx_gemma4/server/responses.py, requests.py and cli.py without a server: a chat session's responses as deltas,
stop strings across pieces, the request checks, and what the bind address allows."""

from __future__ import annotations

import base64
import os
import json

import pytest

from mlx_gemma4.chat import ChatResponse
from mlx_gemma4.errors import InputError
from mlx_gemma4.server.body import Limits, RequestError, parse_body
from mlx_gemma4.server.messages import MediaStore
from mlx_gemma4.server.requests import parse_chat
from mlx_gemma4.server.responses import Answer, finish_reason, message
from mlx_gemma4.tools import ToolCall


def piece(content: str = "", thinking: str = "", calls: tuple = (), finish: str | None = None) -> ChatResponse:
    return ChatResponse(thinking + content, 7, prompt_tokens=3, prompt_tps=1.0, generation_tokens=1,
                        generation_tps=1.0, ttft=0.1, peak_memory_gb=0.0, finish_reason=finish, thinking=thinking,
                        content=content, tool_calls=list(calls))


def test_thinking_text_and_calls_become_deltas_and_a_message():
    call = ToolCall("f", {"q": "a, {b}", "n": [1, {"x": 2}]}, id="call_1")
    answer = Answer()
    deltas = [answer.feed(piece(thinking="plan")), answer.feed(piece("Sure, ")), answer.feed(piece(calls=[call])),
              answer.feed(piece(finish="stop"))]
    assert deltas[0] == [{"reasoning_content": "plan"}] and deltas[1] == [{"content": "Sure, "}]
    assert deltas[2] == [{"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {
        "name": "f", "arguments": json.dumps(call.arguments)}}]}]
    msg = message([d for ds in deltas for d in ds])
    assert msg["content"] == "Sure, " and msg["reasoning_content"] == "plan"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == call.arguments
    assert finish_reason(answer, piece(finish="stop")) == "tool_calls"


def test_stop_string_across_pieces_and_held_back_text():
    answer = Answer(["END"])
    assert answer.feed(piece("abc E")) == [{"content": "abc "}]  # "E" may start the stop string
    assert answer.feed(piece("Nx")) == [{"content": "ENx"}]      # it did not
    assert answer.feed(piece("yy EN")) == [{"content": "yy "}]
    assert answer.feed(piece("D more")) == [] and answer.stopped
    assert answer.feed(piece("after", finish="stop")) == []
    assert finish_reason(answer, piece(finish="length")) == "stop"


def test_held_back_text_is_flushed_at_the_end_and_before_a_call():
    answer = Answer(["END"])
    assert answer.feed(piece("x EN")) == [{"content": "x "}]
    call = ToolCall("f", {}, id="c")
    assert answer.feed(piece(calls=[call]))[0] == {"content": "EN"}
    answer = Answer(["END"])
    answer.feed(piece("x EN"))
    assert answer.feed(piece("", finish="length")) == [{"content": "EN"}]


def test_a_call_of_a_tool_the_request_did_not_declare_stays_text():
    """OpenAI returns only calls of declared tools: a call of another name (or any call where none may be made)
    comes back as the text the model wrote, and the answer finishes as text does."""
    declared, other = ToolCall("f", {}, raw="<|tool_call>call:f{}<tool_call|>", id="c1"), \
        ToolCall("g", {"x": 1}, raw="<|tool_call>call:g{x:1}<tool_call|>", id="c2")
    answer = Answer(callable_tools=frozenset({"f"}))
    deltas = answer.feed(piece("a ", calls=[other])) + answer.feed(piece(calls=[declared], finish="stop"))
    assert deltas[0] == {"content": "a " + other.raw} and deltas[1]["tool_calls"][0]["function"]["name"] == "f"
    for callable_tools in (frozenset(), frozenset({"f"})):
        answer = Answer(["END"], callable_tools=callable_tools)
        deltas = answer.feed(piece(calls=[other])) + answer.feed(piece(" END x", finish="stop"))
        assert message(deltas) == {"role": "assistant", "content": other.raw + " "}
        assert finish_reason(answer, piece(finish="stop")) == "stop"


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
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}], max_tokens=9, temperature=0, seed=3,
        stop="x", stream=True, stream_options={"include_usage": True})
    system, user, assistant, tool = req.messages
    assert system == {"role": "system", "content": "rules"}
    image = user["content"][1]
    assert image["type"] == "image" and open(image["image"], "rb").read() == b"\x89PNG fake"
    assert assistant["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    assert tool == {"role": "tool", "tool_call_id": "c1", "content": {"temp": 21}}  # JSON text as its value
    assert req.options == {"max_tokens": 9, "temperature": 0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": 3}
    assert req.stop == ["x"] and req.stream and req.include_usage
    # top_p 0: only the most likely token, greedy (it was read as top_p 1: sampling from the whole distribution)
    greedy = parse(store, top_p=0, temperature=1.5).options
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0
    assert parse(store, top_p=0.5, temperature=1.5).options["temperature"] == 1.5
    # Any 64-bit seed, as OpenAI takes it: a negative one is its unsigned bits; but -1 is "any seed" (llama.cpp's;
    # clients send it for that: it was one fixed seed, the same answer every time).
    assert [parse(store, seed=v).options["seed"] for v in (-2, -2**63, 2**64 - 1)] == [2**64 - 2, 2**63, 2**64 - 1]
    assert "seed" not in parse(store, seed=-1).options
    # A named tool_choice forces that call with every tool still declared, as OpenAI does (only the named one was
    # declared: the prompt differed from the conversation's other requests, and earlier calls named undeclared tools).
    tools = [{"type": "function", "function": {"name": n}} for n in ("f", "g")]
    named = parse(store, tools=tools, tool_choice={"type": "function", "function": {"name": "g"}})
    assert [t["function"]["name"] for t in named.tools] == ["f", "g"] and named.options["tool_choice"] == "g"
    with pytest.raises(RequestError, match="'seed' must be a whole number"):
        parse(store, seed=2**64)
    # An assistant turn sent back as OpenAI writes one that declined (a 'refusal' part): its words, as text.
    declined = parse(store, messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "refusal", "refusal": "I can't."}]}, {"role": "user", "content": "y"}]).messages[1]
    assert declined == {"role": "assistant", "content": [{"type": "text", "text": "I can't."}]}
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
    (dict(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
     "it is an assistant message"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
                 {"type": "function", "function": {"name": "g", "parameters": "{}"}}]),
     "'tools[1].function.parameters' must be a JSON Schema object like {\"type\": \"object\", \"properties\": "
     "{...}}; got a string"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]), "parameters' must be"),
    (dict(chat_template_kwargs=["enable_thinking"]), "'chat_template_kwargs' must be an object"),
    (dict(chat_template_kwargs="enable_thinking=true"), "'chat_template_kwargs' must be an object"),
    (dict(chat_template_kwargs={"enable_thinkng": True}), "Unknown key(s) 'enable_thinkng' in 'chat_template_kwargs'"),
    # Accepted and ignored in silence: the model never saw the functions, the bias was not applied, no audio came.
    (dict(functions=[{"name": "f", "parameters": {"type": "object"}}]), "send the functions as 'tools'"),
    (dict(function_call="auto"), "legacy 'functions' / 'function_call'"),
    (dict(logit_bias={"50256": -100}), "'logit_bias' is not supported"),
    (dict(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}), "answers in text only"),
    (dict(web_search_options={}), "does not search the web"),
    # No content was an empty message, answered: a misspelt key lost the user's text in silence.
    (dict(messages=[{"role": "user", "text": "hi"}]), "messages[0] (user) has no 'content'; give it a string or a "
                                                      "list of parts (keys sent: 'role', 'text')."),
    (dict(messages=[{"role": "developer", "content": None}, {"role": "user", "content": "x"}]),
     "messages[0] (developer) has no 'content'"),
    (dict(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c"}]),
     "messages[2] (tool) has no 'content'"),
])
def test_bad_requests_name_the_problem(store, body, fragment):
    with pytest.raises(RequestError) as e:
        parse(store, **body)
    assert fragment in str(e.value) and isinstance(e.value, InputError) and e.value.status == 400


def test_json_nested_deeper_than_any_request_needs_is_a_400(store):
    """json.loads overflowed the stack on the body, and rendering the prompt on 900-deep tool arguments: a 500
    'RecursionError' for what is the client's mistake."""
    with pytest.raises(RequestError, match="not valid JSON [(]nested deeper than 64 levels[)]") as e:
        parse_body(b"[" * 100_000 + b"]" * 100_000)
    assert e.value.status == 400
    deep: object = "x"
    for _ in range(900):
        deep = {"a": deep}
    called = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": json.dumps(deep)}}]}]
    with pytest.raises(RequestError, match="the arguments of 'f' are not valid JSON [(]nested deeper than 64"):
        parse(store, messages=[*called, {"role": "tool", "tool_call_id": "c", "content": "1"}])
    called[1]["tool_calls"][0]["function"]["arguments"] = "{}"
    req = parse(store, messages=[*called, {"role": "tool", "tool_call_id": "c", "content": json.dumps(deep)}])
    assert req.messages[-1]["content"] == json.dumps(deep)  # a result that deep stays text


def test_an_empty_body_or_a_form_says_what_to_send():
    """An empty body read 'not valid JSON (Expecting value: line 1 column 1 (char 0))', and a form or upload did
    not say what it had been sent as."""
    for raw in (b"", b"  \n"):
        with pytest.raises(RequestError, match="The request body is empty; send a JSON object with 'model' and "
                                               "'messages' [(]Content-Type: application/json[)]"):
            parse_body(raw)
    with pytest.raises(RequestError, match="not valid JSON .*It was sent as 'multipart/form-data'[.]$"):
        parse_body(b"--x\r\nContent-Disposition: form-data", "multipart/form-data; boundary=x")
    with pytest.raises(RequestError) as e:
        parse_body(b"{bad", "application/json")
    assert "sent as" not in str(e.value)
    # JSON is read whatever the header says (curl -d sends it as a form).
    assert parse_body(b'{"a": 1}', "application/x-www-form-urlencoded") == {"a": 1}


def test_base64_as_clients_write_it(store):
    """`base64` on Linux wraps its output at 76 columns (so does MIME): curl -d "...$(base64 cat.png)..." was a
    400, as were unpadded and URL-safe base64 and a clip sent as a data: URI, as images are."""
    raw = bytes(range(256)) * 4

    def saved(part):
        return open(parse(store, messages=[{"role": "user", "content": [part]}]).messages[0]["content"][0][
            part["type"].removeprefix("input_").removesuffix("_url")], "rb").read()

    wrapped = base64.encodebytes(raw).decode()
    assert "\n" in wrapped[:-1]
    for text in (wrapped, base64.b64encode(raw).decode().rstrip("="), base64.urlsafe_b64encode(raw).decode()):
        assert saved({"type": "image_url", "image_url": {"url": "data:image/png;base64," + text}}) == raw
        assert saved({"type": "input_audio", "input_audio": {"data": text, "format": "wav"}}) == raw
    assert saved({"type": "input_audio", "input_audio": {"data": "data:audio/wav;base64," + wrapped,
                                                         "format": "wav"}}) == raw
    with pytest.raises(RequestError, match=r"messages\[0\]\.content\[0\]: the base64 data does not decode "
                                           r"\('\$' is no base64 character\); send the file's bytes in base64"):
        saved({"type": "input_audio", "input_audio": {"data": "UklG$RiQ=", "format": "wav"}})
    with pytest.raises(RequestError, match="input_audio.data is a data: URI that is not base64"):
        saved({"type": "input_audio", "input_audio": {"data": "data:audio/wav,RIFF", "format": "wav"}})


def test_every_field_of_the_openai_client_is_known(store):
    """The openai package's newer fields ('prompt_cache_options', 'prompt_cache_retention', 'moderation') were
    400s as misspelt names. Each field the installed client can send is read: accepted, or refused by name."""
    params = pytest.importorskip("openai.types.chat.completion_create_params")
    for name in params.CompletionCreateParamsBase.__annotations__:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], name: None}
        try:
            parse_chat(body, model_id="m", limits=Limits(), media=store)
        except RequestError as e:
            assert "Unknown field" not in str(e), name
    parse(store, prompt_cache_options={"ttl": "30m"}, prompt_cache_retention="24h")  # caching here is automatic
    with pytest.raises(RequestError, match="does not run moderation on requests or answers; drop .moderation."):
        parse(store, moderation={"input": True})


def test_half_a_character_is_a_400_naming_where_it_is(store):
    """A lone UTF-16 surrogate (JSON's "\\ud83d" without its pair: an emoji cut in half) parsed into a string no
    tokenizer takes: the request failed on the model thread with a 500 TypeError."""
    with pytest.raises(RequestError, match=r"messages\[0\]\.content holds a lone UTF-16 surrogate \(\\ud83d\)") as e:
        parse_body(b'{"messages": [{"role": "user", "content": "smile \\ud83d!"}]}')
    assert e.value.status == 400 and "send whole characters" in str(e.value)
    assert parse_body(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a whole pair is one character
    called = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": '{"q": "\\udc00"}'}}]}]
    with pytest.raises(RequestError, match=r"arguments of 'f' are not valid JSON \(q holds a lone UTF-16"):
        parse(store, messages=[*called, {"role": "tool", "tool_call_id": "c", "content": "1"}])
    called[1]["tool_calls"][0]["function"]["arguments"] = "{}"
    result = '{"r": "\\ud800"}'
    assert parse(store, messages=[*called, {"role": "tool", "tool_call_id": "c", "content": result}]).messages[-1][
        "content"] == result  # a result that cannot be read as JSON stays text (whole characters)


def _image_at(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


def test_paths_only_when_allowed(store, tmp_path):
    (tmp_path / "y.png").write_bytes(b"png")
    body = _image_at(str(tmp_path / "y.png"))
    assert parse(store, **body).messages[0]["content"][0]["image"] == str(tmp_path / "y.png")
    with pytest.raises(RequestError, match="--allow-paths"):
        parse_chat({"model": "m", **body}, model_id="m", limits=Limits(allow_paths=False), media=store)


def test_a_missing_path_is_a_400_in_the_server_s_words(store, tmp_path):
    """The processor's message was the app's ("drag the file in again"), which means nothing to an API client."""
    for url in (str(tmp_path / "gone.png"), f"file://{tmp_path}/gone.png", str(tmp_path)):
        with pytest.raises(RequestError) as e:
            parse(store, **_image_at(url))
        assert e.value.status == 400 and "messages[0].content[0].image_url" in str(e.value), str(e.value)
        assert "no file on the server's machine" in str(e.value) and "drag" not in str(e.value)


def test_the_processor_s_message_for_a_missing_file_is_neutral(tmp_path):
    from mlx_gemma4.errors import MissingFileError
    from mlx_gemma4.processing.files import media_path

    with pytest.raises(MissingFileError, match="no such file. Check the path.$") as e:
        media_path(tmp_path / "gone.png", "image")
    assert isinstance(e.value, InputError) and e.value.path == str(tmp_path / "gone.png")


@pytest.mark.parametrize("flags,allowed", [([], True), (["--host", "::1"], True), (["--host", "0.0.0.0"], False),
                                           (["--host", "0.0.0.0", "--allow-paths"], True),
                                           (["--no-allow-paths"], False)])
def test_media_paths_follow_the_bind_address(flags, allowed):
    from mlx_gemma4.server.cli import limits, parse_args

    args = parse_args(["--model", "m", *flags])
    assert args.host == (flags[1] if flags[:1] == ["--host"] else "127.0.0.1")
    assert limits(args).allow_paths is allowed and limits(args).max_tokens == 4096


@pytest.mark.parametrize("flags,fragment", [
    (["--port", "70000"], "--port must be a whole number from 0 to 65535; got 70000"),
    (["--max-request-mb", "nan"], "--max-request-mb must be a finite number"),
    (["--max-request-mb", "inf"], "--max-request-mb must be a finite number"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be a whole number >= 1; got 0")])
def test_bad_command_line_values_are_refused_before_the_model_loads(flags, fragment, capsys):
    """Found only when uvicorn bound the port or the limits were built, after the model had loaded: a traceback."""
    from mlx_gemma4.server.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "m", *flags])
    assert e.value.code == 2 and fragment in capsys.readouterr().err


def test_media_store_keeps_recent_files_within_its_budget(tmp_path):
    """A long-running server does not fill the disk: past its budget the least recently used files go; the file
    just saved and files saved again (used) stay; equal bytes are one file."""
    store = MediaStore(tmp_path, keep_bytes=250)
    blobs = [bytes([i]) * 100 for i in range(4)]
    first = store.save(blobs[0], ".png")
    os.utime(first, ns=(1, 1))  # the oldest by far
    second = store.save(blobs[1], ".png")
    os.utime(second, ns=(2, 2))
    assert store.save(blobs[0], ".png") == first  # used again: now the newest (by its access time) ...
    assert first.stat().st_atime_ns > second.stat().st_atime_ns
    assert first.stat().st_mtime_ns == 1   # ... and unchanged for the chat session, which keys media by mtime
    third = store.save(blobs[2], ".wav")  # 300 bytes > 250: the least recently used (second) goes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, third.name])
    os.utime(first, ns=(3, 3))  # (explicit times: a coarse file-system clock could tie the two)
    os.utime(third, ns=(4, 4))
    fourth = store.save(blobs[3], ".png")
    assert fourth.exists() and third.exists() and not first.exists()
    assert fourth.read_bytes() == blobs[3]
    big = store.save(b"x" * 1000, ".png")  # larger than the budget alone: kept, everything else goes
    assert [p.name for p in tmp_path.iterdir()] == [big.name]


def test_image_detail_is_each_images_token_budget(store):
    """OpenAI's image_url.detail: 'low' the smallest budget, 'high' the largest, 'auto' (or none) the model's
    default, each image its own (the chat part's max_soft_tokens; one budget per request, the most detailed asked,
    encoded every image of the conversation again at 1,120 tokens); anything else a 400 naming the part."""
    png = f"data:image/png;base64,{base64.b64encode(b'png').decode()}"

    def budgets(*details):
        parts = [{"type": "image_url", "image_url": {"url": png} if d is None else {"url": png, "detail": d}}
                 for d in details]
        req = parse(store, messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}])
        assert all(set(p) <= {"type", "image", "max_soft_tokens"} for p in req.messages[0]["content"][:-1])
        return [p.get("max_soft_tokens") for p in req.messages[0]["content"][:-1]]

    assert budgets() == [] and budgets(None) == [None] and budgets("auto") == [None]
    assert budgets("low", "high", "auto", None) == [70, 1120, None, None]
    with pytest.raises(RequestError, match=r"messages\[0\]\.content\[1\]\.image_url\.detail must be 'low', 'high' "
                                           r"or 'auto'; got 'ultra'"):
        budgets("low", "ultra")


def test_file_urls_are_percent_decoded(store, tmp_path):
    """file:///tmp/my%20img.png named a file 'my%20img.png' (a 400: no such file)."""
    (tmp_path / "my img.png").write_bytes(b"png")
    for url in (f"file://{tmp_path}/my%20img.png", f"file://localhost{tmp_path}/my%20img.png",
                f"{tmp_path}/my img.png"):
        assert parse(store, **_image_at(url)).messages[0]["content"][0]["image"] == str(tmp_path / "my img.png")


def test_stream_options_are_checked_as_the_top_level_is(store):
    """{'include_usage': 'yes'} was taken as true and a misspelt key inside stream_options was dropped in silence."""
    assert parse(store, stream=True, stream_options={"include_usage": True}).include_usage
    assert not parse(store, stream=True, stream_options={"include_usage": False}).include_usage
    with pytest.raises(RequestError, match="'include_usage' must be true or false; got 'yes'"):
        parse(store, stream=True, stream_options={"include_usage": "yes"})
    with pytest.raises(RequestError, match="Unknown field.*'include_usgae' in 'stream_options'"):
        parse(store, stream=True, stream_options={"include_usgae": True})
