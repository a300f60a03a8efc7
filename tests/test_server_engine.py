"""The server's app factory served in-process, with a logits processor the test steers through the Engine's
``generation`` keywords: tool calls, thoughts and stop strings on forced tokens through the real tokenizer,
template and detokenizer; a client that leaves mid-answer cancels it; the line of waiting requests."""

from __future__ import annotations

import json
import logging
import signal
import threading
import urllib.error
import urllib.request

import pytest

from tests.server_helpers import Steer, ThreadServer, request, wait_until

openai = pytest.importorskip("openai")

MODEL = "tiny"


@pytest.fixture(scope="module")
def steer():
    return Steer()


@pytest.fixture(scope="module")
def served(converted_towers, steer):
    from mlx_gemma4 import ChatSession, load
    from mlx_gemma4.server import Engine, Limits, create_app

    engine = Engine(lambda: ChatSession(*load(converted_towers)), max_waiting=1,
                    generation={"logits_processors": [steer]})
    engine.wait_ready()
    server = ThreadServer(create_app(engine, model_id=MODEL, limits=Limits(max_tokens=400)))
    yield engine, server
    server.close()
    engine.close()


@pytest.fixture
def client(served, steer):
    steer.reset()
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def processor(converted_towers):
    from mlx_gemma4.processing.processor import Processor

    return Processor.from_pretrained(converted_towers)


def ids(processor, text: str, end: str = "<turn|>") -> list[int]:
    """``text`` as the model would write it, then ``end`` (end of turn, or ``<|tool_response>`` after calls)."""
    return processor.tokenizer.encode(text + end, add_special_tokens=False)


CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:[1,2],opts:{metric:true}}<tool_call|>'
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "array"},
                                                    "opts": {"type": "object"}}, "required": ["city"]}}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_call_comes_back_structured_and_its_result_goes_in(client, served, steer, processor, stream):
    engine, _ = served
    steer.force = ids(processor, "Let me check." + CALL, end="<|tool_response>")
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    kw = dict(model=MODEL, messages=asked, max_tokens=200, tools=[WEATHER])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert [c.index for c in calls] == [0]
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls, [choice.finish_reason]
    assert content == "Let me check."
    assert finish == ["tool_calls"]
    assert [c.function.name for c in calls] == ["get_weather"] and calls[0].id.startswith("call_")
    arguments = json.loads(calls[0].function.arguments)
    assert arguments == {"city": "Paris", "days": [1, 2], "opts": {"metric": True}}

    # The client runs the tool and sends the result back, as OpenAI clients do (arguments and result as JSON text).
    steer.reset()
    call = {"id": calls[0].id, "type": "function",
            "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}
    followed = asked + [{"role": "assistant", "content": content, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp": 21, "sky": "clear"}'}]
    after = client.chat.completions.create(model=MODEL, messages=followed, max_tokens=3, tools=[WEATHER])
    ours = asked + [{"role": "assistant", "content": content, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": {"temp": 21, "sky": "clear"}}]
    expected = engine.call(lambda session: len(session.encode(ours, tools=[WEATHER]).ids))
    assert after.usage.prompt_tokens == expected  # the call and its structured result are in the prompt
    assert after.usage.prompt_tokens_details.cached_tokens > 0


def test_tool_choice_makes_the_answer_a_call(client, steer, processor):
    """tool_choice naming a tool opens the answer with a call of it (the model writes the arguments: scripted
    here); "required" opens it with a call, the model naming the tool (the random model then writes no valid call,
    which comes back as text)."""
    steer.force = ids(processor, CALL, end="<|tool_response>")
    choice = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Paris?"}], max_tokens=200, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    steer.reset()
    free = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                          max_tokens=30, tools=[WEATHER]).choices[0].message
    assert not (free.content or "").startswith("<|tool_call>") and not free.tool_calls
    forced = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                            max_tokens=30, tools=[WEATHER], tool_choice="required").choices[0]
    assert forced.message.tool_calls or forced.message.content.startswith("<|tool_call>call:")


def test_tool_choice_none_never_calls(client, steer, processor):
    """tool_choice="none" dropped the tools from the prompt, and a model that called one anyway (a conversation
    with earlier calls invites it) came back with tool_calls and finish_reason "tool_calls". Now the tools stay
    declared, as OpenAI does, and the call-opening token is never sampled."""
    steer.force = ids(processor, CALL, end="<|tool_response>")
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Paris?"}], max_tokens=200, temperature=0,
              tools=[WEATHER])
    called = client.chat.completions.create(**kw).choices[0]
    assert called.finish_reason == "tool_calls"
    steer.reset()
    steer.force = ids(processor, CALL, end="<|tool_response>")
    refused = client.chat.completions.create(tool_choice="none", **kw)
    assert not refused.choices[0].message.tool_calls and refused.choices[0].finish_reason != "tool_calls"
    assert "<|tool_call>" not in refused.choices[0].message.content
    assert refused.usage.prompt_tokens == client.chat.completions.create(**kw).usage.prompt_tokens  # declared

def test_a_call_of_an_undeclared_tool_comes_back_as_text(client, steer, processor):
    """A model that writes a call of a tool the request did not declare (no tools, or another name) came back with
    tool_calls naming a function the client does not have; now it is the answer's text, finished as text."""
    for tools in (None, [TIME]):
        steer.reset()
        steer.force = ids(processor, CALL)
        choice = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                                max_tokens=200, temperature=0,
                                                **({"tools": tools} if tools else {})).choices[0]
        assert not choice.message.tool_calls and choice.finish_reason == "stop"
        assert choice.message.content.startswith(CALL)


TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone.",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_parallel_tool_calls_false_ends_the_answer_at_the_first_call(client, steer, processor, stream):
    """OpenAI's parallel_tool_calls=false promises at most one call; the model may write two in a row (it was
    accepted and ignored: both came back)."""
    forced = ids(processor, CALL + '<|tool_call>call:get_time{tz:<|"|>CET<|"|>}<tool_call|>', end="<|tool_response>")
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Paris?"}], max_tokens=200, tools=[WEATHER, TIME])
    for parallel, names in ((True, ["get_weather", "get_time"]), (False, ["get_weather"])):
        steer.reset()
        steer.force = forced
        if stream:
            chunks = list(client.chat.completions.create(stream=True, parallel_tool_calls=parallel, **kw))
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            choice = client.chat.completions.create(parallel_tool_calls=parallel, **kw).choices[0]
            calls, finish = choice.message.tool_calls, [choice.finish_reason]
        assert [c.function.name for c in calls] == names and finish == ["tool_calls"]
    assert steer.calls < len(forced)  # the model stopped after the first call too


def test_thoughts_are_reasoning_content(client, steer, processor):
    steer.force = ids(processor, "<|channel>thought\nIt is cold there.<channel|>Bring a coat.")
    message = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                             max_tokens=200, reasoning_effort="high").choices[0].message
    assert message.content == "Bring a coat."
    assert message.model_extra["reasoning_content"] == "It is cold there."


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_string_ends_the_answer(client, steer, processor, stream):
    forced = ids(processor, "one two three STOP four five six seven eight nine ten")
    steer.force = forced
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=200, stop=["STOP", "zzz"])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        usage = [c.usage for c in chunks if c.usage][0]
    else:
        whole = client.chat.completions.create(**kw)
        content, finish, usage = whole.choices[0].message.content, whole.choices[0].finish_reason, whole.usage
    assert content == "one two three " and finish == "stop"
    assert steer.calls < len(forced)  # the model stopped there too, not at the end of the forced text
    # The tokens up to the one that completed the stop string: one more or one less as the threads raced.
    upto = next(n for n in range(1, len(forced) + 1) if "STOP" in processor.tokenizer.decode(forced[:n]))
    assert usage.completion_tokens == upto


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_n_answers_are_n_choices(client, steer, processor, stream):
    """'n' was refused with a 400. Each choice is its own answer (a stop string ends only the choice it is in),
    seeded choice i is what seed + i gives alone, and usage counts the prompt once and every choice's tokens."""
    forced = ids(processor, "one two three STOP four five six seven eight nine ten")
    steer.force = forced
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=200, stop="STOP", n=3,
              stream_options={"include_usage": True} if stream else None)

    def create(**kw):
        if not stream:
            got = client.chat.completions.create(**kw)
            return ([c.index for c in got.choices], [c.message.content for c in got.choices],
                    [c.finish_reason for c in got.choices], got.usage)
        chunks = list(client.chat.completions.create(stream=True, **kw))
        n = kw.get("n") or 1
        parts = [[c.choices[0] for c in chunks if c.choices and c.choices[0].index == i] for i in range(n)]
        assert all(p[0].delta.role == "assistant" and p[-1].finish_reason for p in parts)
        order = [c.choices[0].index for c in chunks if c.choices]
        assert order == sorted(order)  # one choice after another
        return (sorted(set(order)), ["".join(c.delta.content or "" for c in p) for p in parts],
                [p[-1].finish_reason for p in parts], chunks[-1].usage if kw.get("stream_options") else None)

    index, contents, finishes, usage = create(**kw)
    assert index == [0, 1, 2] and contents == ["one two three "] * 3 and finishes == ["stop"] * 3
    assert steer.calls < 2 * len(forced)  # every choice stopped at STOP, not at the end of the forced text
    steer.reset()
    steer.no_stop = processor.eos_token_ids  # every choice runs to max_tokens
    kw.update(stop=None, max_tokens=6, temperature=1.0, seed=11, n=2,
              stream_options={"include_usage": True} if stream else None)
    _, both, finishes, usage = create(**kw)
    alone = [create(**{**kw, "n": None, "seed": 11 + i}) for i in range(2)]
    assert both == [a[1][0] for a in alone] and both[0] != both[1] and finishes == ["length"] * 2
    assert usage.prompt_tokens == alone[0][3].prompt_tokens and usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12


def test_instructions_alone_are_answered(client, steer, processor):
    """A system (or developer) message alone, as a summariser sends it, was refused: 'the last message must be a
    user message'. OpenAI answers it; the model's turn follows the instructions."""
    steer.force = ids(processor, "The sky is blue.")
    for role in ("system", "developer"):
        got = client.chat.completions.create(model=MODEL, max_tokens=50, messages=[
            {"role": role, "content": "Summarise in one line: the sky is blue because of Rayleigh scattering."}])
        assert got.choices[0].message.content == "The sky is blue." and got.choices[0].finish_reason == "stop"


def test_client_leaving_mid_stream_cancels_the_answer(client, served, steer, processor):
    engine, _ = served
    steer.no_stop = processor.eos_token_ids
    steer.hold_at = 3
    steer.hold = lambda: engine.current.cancel  # the third token waits until the server has cancelled the job
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on and on."}],
                                            max_tokens=400, stream=True)
    next(iter(stream))
    assert steer.held.wait(300)
    stream.close()
    wait_until(lambda: engine.pending == 0, "the cancelled job to end")
    assert steer.calls <= steer.hold_at + 1  # far from the 400 tokens it was asked for
    steer.reset()
    after = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert after.usage.completion_tokens >= 1


def test_requests_wait_in_line_and_a_full_line_is_refused(client, served, steer):
    engine, server = served
    release = threading.Event()
    steer.hold = lambda: release  # the first request holds the model until the test lets it go
    results: dict[str, object] = {}

    def ask(name: str) -> None:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"question {name}"}], max_tokens=2)
        results[name] = (raw.headers["x-requests-ahead"], raw.parse().model_extra["timings"]["requests_ahead"])

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    assert steer.held.wait(300)
    second = threading.Thread(target=ask, args=("second",))
    second.start()
    wait_until(lambda: engine.pending == 2, "the second request to queue")
    # max_waiting=1: one generating, one waiting; a third is told at once that the server is busy.
    third = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "third"}]}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as busy:
        urllib.request.urlopen(third, timeout=300)
    assert busy.value.code == 503 and "busy" in json.loads(busy.value.read())["error"]["message"]
    assert busy.value.headers["Retry-After"] == "1"   # when to ask again
    assert request(server.url + "/health")[1]["pending"] == 2
    release.set()
    first.join()
    second.join()
    assert results == {"first": ("0", 0), "second": ("1", 1)}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_failing_model_gives_a_json_500_and_serves_on(client, steer, stream):
    steer.fail = RuntimeError("device lost")
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       stream=stream)
    assert "device lost" in e.value.body["message"] and e.value.body["type"] == "server_error"
    steer.reset()
    after = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert after.usage.completion_tokens >= 1


def test_an_empty_api_key_is_no_key(served):
    """GEMMA4_API_KEY exported empty: the command line warned that no key was set, but the app asked every request
    for the empty key, and no client could send it (401 for all)."""
    from mlx_gemma4.server import create_app

    open_server = ThreadServer(create_app(served[0], model_id=MODEL, api_key=""))
    try:
        assert request(open_server.url + "/v1/models")[0] == 200
    finally:
        open_server.close()


def test_the_model_list_with_a_trailing_slash(served):
    """GET /v1/models/ (a client whose base URL ends in a slash) was a 404 "No model '' here"."""
    listing = request(served[1].url + "/v1/models")
    assert request(served[1].url + "/v1/models/") == listing == (200, listing[1])
    assert [m["id"] for m in listing[1]["data"]] == [MODEL]
    assert request(served[1].url + "/v1/models/" + MODEL)[1]["id"] == MODEL


def test_browser_pages_need_cors_origin(served):
    """A chat front-end running in a browser asks with OPTIONS first (a preflight) and reads an answer only with
    Access-Control-Allow-Origin: without --cors-origin the preflight's 405 says what to do; with it, it passes."""

    from mlx_gemma4.server import create_app

    page = "http://localhost:3000"
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}

    def options(url, origin=page):
        req = urllib.request.Request(url + "/v1/chat/completions", headers={**preflight, "Origin": origin},
                                     method="OPTIONS")
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    status, _, body = options(served[1].url)
    assert status == 405 and "--cors-origin" in json.loads(body)["error"]["message"]
    browser = ThreadServer(create_app(served[0], model_id=MODEL, cors_origins=[page]))
    try:
        status, headers, _ = options(browser.url)
        assert status == 200 and headers["access-control-allow-origin"] == page
        assert "x-stainless-os" in headers["access-control-allow-headers"].lower()
        req = urllib.request.Request(browser.url + "/v1/models", headers={"Origin": page})
        with urllib.request.urlopen(req, timeout=300) as r:
            assert r.headers["access-control-allow-origin"] == page
        status, headers, _ = options(browser.url, origin="http://elsewhere.example")  # a page not let in
        assert status == 400 and "access-control-allow-origin" not in headers
    finally:
        browser.close()


def test_shutdown_ends_the_answer_being_written_and_the_waiting_ones(converted_towers, processor):
    """Ctrl+C or SIGTERM while a client streams: uvicorn waits for open responses, so the answer ran on to its
    max_tokens (and the requests in line after it) before the server could exit. gemma4-serve's server stops the
    engine: the stream ends at its next token with an error event, the waiting request gets a 503, the server
    exits."""
    from mlx_gemma4 import ChatSession, load
    from mlx_gemma4.server import Engine, Limits, create_app
    from mlx_gemma4.server.cli import Server

    steer = Steer()
    engine = Engine(lambda: ChatSession(*load(converted_towers)), generation={"logits_processors": [steer]})
    engine.wait_ready()
    served = ThreadServer(create_app(engine, model_id=MODEL, limits=Limits(max_tokens=400)),
                          make_server=lambda config: Server(config, engine, MODEL))
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    steer.no_stop = processor.eos_token_ids
    steer.hold_at = 3
    steer.hold = lambda: engine.current.cancel  # the third token waits until the shutdown has stopped the job
    stream = iter(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on."}],
                                                 max_tokens=400, stream=True))
    next(stream)
    assert steer.held.wait(300)
    waiting: list[BaseException] = []

    def ask() -> None:
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "next"}], max_tokens=3)
        except openai.APIStatusError as e:
            waiting.append(e)

    second = threading.Thread(target=ask)
    second.start()
    wait_until(lambda: engine.pending == 2, "the second request to queue")
    served.server.handle_exit(signal.SIGTERM, None)  # what the signal handler calls on the main thread
    with pytest.raises(openai.APIError, match="shutting down"):
        list(stream)
    second.join()
    assert [e.status_code for e in waiting] == [503] and "shutting down" in waiting[0].body["message"]
    served.thread.join(timeout=300)
    assert not served.thread.is_alive()
    assert steer.calls <= steer.hold_at + 1  # far from the 400 tokens it was asked for
    engine.close()


def test_the_serving_line_names_the_port_bound(served, caplog):
    """``--port 0`` asks the system for a free port; the "Serving ... at" line said port 0, which no client can
    use. It is logged once the server listens, with the port bound."""
    import logging

    from mlx_gemma4.server import create_app
    from mlx_gemma4.server.cli import Server

    with caplog.at_level(logging.INFO, logger="gemma4-serve"):
        srv = ThreadServer(create_app(served[0], model_id=MODEL), make_server=lambda c: Server(c, served[0], MODEL))
    try:
        port = int(srv.url.rsplit(":", 1)[1])
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Serving")]
        assert port != 0 and lines == [f"Serving {MODEL} at http://127.0.0.1:{port}/v1"]
    finally:
        srv.close()


def test_an_engine_given_a_loaded_model_says_what_it_takes(converted_towers):
    """Engine(load(DIR)) failed on the model's thread with "'tuple' object is not callable", re-raised by
    wait_ready(); the README's form takes a function that makes the session."""
    from mlx_gemma4 import ChatSession, InputError, load
    from mlx_gemma4.server import Engine

    loaded = load(converted_towers)
    with pytest.raises(InputError, match=r"Engine\(lambda: ChatSession\(\*load\(DIR\)\)\)"):
        Engine(loaded)
    engine = Engine(lambda: ChatSession(*loaded))
    assert engine.wait_ready(60)
    engine.close()


def test_a_client_gone_while_sending_its_body_is_no_server_failure(served, caplog):
    """A client that closed mid-upload was logged as 'request failed' with a ClientDisconnect traceback."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(served[1].url)
    with caplog.at_level(logging.INFO, logger="mlx_gemma4.server.app"):
        with socket.create_connection((url.hostname, url.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"messages\": [")
        wait_until(lambda: any("left before its request was read" in r.getMessage() for r in caplog.records),
                   "the server to notice the client left")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
