"""mlx_gemma4/processing/tokenizer.py against transformers' tokenizer and chat template rendering."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_gemma4.errors import ConfigError
from mlx_gemma4.processing.tokenizer import (
    Tokenizer, bundled_chat_template, find_chat_template, split_thinking,
)
from tests.fixtures_tokenizer import make_tokenizer
from tests.tiny import SPECIAL_IDS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_tokenizer(tmp_path_factory.mktemp("tok"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "gemma4", "text_config": {"eos_token_id": [1, 106], "bos_token_id": 2, "pad_token_id": 0},
        "image_token_id": 380, "boi_token_id": 255, "eoi_token_id": 382, "audio_token_id": 381,
        "boa_token_id": 256, "eoa_token_index": 383, "video_token_id": 384}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106, 50]}))
    return path


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def ref(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


TEXTS = [
    "hello world",
    "The  cat\tsat\n\non the mat.",
    "  leading and trailing  ",
    "naïve café, Straße, 日本語, emoji 🎉👍🏽, Ω≈ç√",
    "",
    "<|turn>user\nHi<turn|>\n<|turn>model\n",
    "look: <|image|> and <|audio|> then <|video|>",
    "<|channel>thought\nhmm<channel|>answer<turn|>",
    '<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|>',
    "not special: <|turn <turn| <|image| <bos",
]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tok, ref, text):
    assert tok.encode(text) == ref(text).input_ids
    assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
    assert tok.decode(tok.encode(text)) == ref.decode(ref(text).input_ids)


def test_bos_never_doubled(tok, ref):
    ids = tok.encode("<bos>hello")
    assert ids == ref("<bos>hello", add_special_tokens=False).input_ids
    assert ids == [SPECIAL_IDS["bos"]] + ref("hello", add_special_tokens=False).input_ids
    assert tok.encode("hello")[0] == SPECIAL_IDS["bos"]


def test_tokenizer_without_bos(tmp_path):
    from transformers import AutoTokenizer

    path = make_tokenizer(tmp_path, add_bos=False)
    ours, theirs = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(str(path))
    for text in ("hello", "<bos>hello"):
        assert ours.encode(text) == theirs(text).input_ids
    assert ours.encode("hello")[0] != SPECIAL_IDS["bos"]


def test_special_tokens_resolved(tok):
    names = {"bos": "bos", "eos": "eos", "pad": "pad", "think": "think", "channel_open": "channel_open",
             "channel_close": "channel_close", "turn_open": "turn_open", "turn_close": "turn_close",
             "image": "image", "boi": "boi", "eoi": "eoi", "audio": "audio", "boa": "boa", "eoa": "eoa",
             "video": "video"}
    got = tok.special.as_dict()
    assert {k: got[k].id for k in names} == {k: SPECIAL_IDS[v] for k, v in names.items()}
    assert got["image"].text == "<|image|>" and got["boi"].text == "<|image>" and got["eoi"].text == "<image|>"
    assert got["audio"].text == "<|audio|>" and got["boa"].text == "<|audio>" and got["eoa"].text == "<audio|>"
    assert got["video"].text == "<|video|>" and got["turn_close"].text == "<turn|>"


def test_eos_ids_from_config_generation_config_and_end_of_turn(tok, tmp_path):
    assert tok.eos_token_ids == [1, 106, 50]
    bare = Tokenizer.from_pretrained(make_tokenizer(tmp_path))  # no config.json: eos + end of turn
    assert bare.eos_token_ids == [SPECIAL_IDS["eos"], SPECIAL_IDS["turn_close"]]


def test_config_ids_must_agree_with_tokenizer(ckpt, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(ckpt))
    with pytest.raises(ConfigError, match="image_token_id"):
        Tokenizer(hf, config={"image_token_id": 381})
    # An id the tokenizer does not name is found through config.json.
    ok = Tokenizer(hf, config={"video_token_id": 384})
    assert ok.special.video.id == 384


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"])
@pytest.mark.parametrize("text", ["[1]", "null"])
def test_a_tokenizer_file_that_is_not_an_object_is_named(ckpt, tmp_path, name, text):
    """transformers' tokenizer (and our eos lookup) raised an AttributeError naming no file."""
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    (bad / name).write_text(text)
    with pytest.raises(ConfigError, match=f"{name} holds .*not a JSON object"):
        Tokenizer.from_pretrained(bad)


@pytest.mark.parametrize("eos", ["<turn|>", -1, True, [1, 2.5]])
def test_eos_ids_that_are_not_token_ids_are_named(ckpt, tmp_path, eos):
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    (bad / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id holds"):
        Tokenizer.from_pretrained(bad)


def test_a_chat_template_that_does_not_parse_is_a_config_error(ckpt, tmp_path):
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    (bad / "chat_template.jinja").write_text("{{ bos_token }}\n{% if %}")
    tok = Tokenizer.from_pretrained(bad)
    with pytest.raises(ConfigError, match="chat template does not parse .line 2"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json or tokenizer_config.json.*Copy both"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x00")
    with pytest.raises(ConfigError, match="tokenizer.model alone does not say how to read it"):
        Tokenizer.from_pretrained(tmp_path)


# -- chat template ---------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "items": {"type": "integer"}}}, "required": ["city"]}}}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi there"}],
    "system": [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi"}],
    "multi_turn": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."}],
    "thoughts_in_history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nEasy: four.<channel|>It is 4."},
        {"role": "user", "content": "And 3+3?"}],
    "multimodal": [{"role": "user", "content": [
        {"type": "image", "url": "cat.png"}, {"type": "text", "text": "What is this?"},
        {"type": "audio", "path": "a.wav"}, {"type": "video", "path": "v.mp4"}, {"type": "text", "text": " ok "}]}],
    "system_parts": [{"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
                     {"role": "user", "content": "Hi"}],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
        {"role": "assistant", "content": "It is sunny and 21C in Paris."}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, ref, name, thinking, gen):
    messages = CONVERSATIONS[name]
    tools = [WEATHER] if name.startswith("tool") else None
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen, enable_thinking=thinking, tools=tools)
    theirs = ref.apply_chat_template(messages, chat_template=bundled_chat_template(), tools=tools,
                                     add_generation_prompt=gen, enable_thinking=thinking, tokenize=False)
    assert ours == theirs
    assert tok.apply_chat_template(messages, add_generation_prompt=gen, enable_thinking=thinking, tools=tools,
                                   tokenize=True) == ref(theirs, add_special_tokens=False).input_ids


def test_chat_template_format(tok):
    user = CONVERSATIONS["user"]
    assert tok.apply_chat_template(user) == "<bos><|turn>user\nHi there<turn|>\n<|turn>model\n"
    assert tok.apply_chat_template(user, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi there<turn|>\n<|turn>model\n")
    assert tok.apply_chat_template(CONVERSATIONS["system"], add_generation_prompt=False) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n")
    history = tok.apply_chat_template(CONVERSATIONS["thoughts_in_history"])
    assert "Easy: four." not in history and "<|channel>" not in history
    assert "<|turn>model\nIt is 4.<turn|>\n" in history
    mm = tok.apply_chat_template(CONVERSATIONS["multimodal"])
    assert "<|turn>user\n<|image|>What is this?<|audio|><|video|>ok<turn|>\n" in mm


def test_chat_template_tools(tok):
    prompt = tok.apply_chat_template(CONVERSATIONS["tool_round_trip"], tools=[WEATHER])
    assert prompt.startswith("<bos><|turn>system\n<|tool>declaration:get_weather{description:<|\"|>Current weather")
    assert "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:[1,2]}<tool_call|>" in prompt
    assert "<|tool_response>response:get_weather{value:<|\"|>sunny, 21C<|\"|>}<tool_response|>" in prompt
    # A pending tool call leaves the turn open on <|tool_response> for the runtime to fill.
    pending = tok.apply_chat_template(CONVERSATIONS["tool_round_trip"][:2], tools=[WEATHER])
    assert pending.endswith("<tool_call|><|tool_response>")


def test_template_lookup_order(tmp_path, caplog):
    path = make_tokenizer(tmp_path, chat_template=False)
    assert find_chat_template(path) is None
    with caplog.at_level(logging.INFO, logger="mlx_gemma4.processing.tokenizer"):
        assert Tokenizer.from_pretrained(path).chat_template == bundled_chat_template()
    assert "bundled" in caplog.text
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "T1{{ bos_token }}"}))
    assert find_chat_template(path) == "T1{{ bos_token }}"
    (path / "chat_template.json").write_text(json.dumps({"chat_template": "T2"}))
    assert find_chat_template(path) == "T2"
    (path / "chat_template.jinja").write_text("T3")
    assert find_chat_template(path) == "T3"
    assert Tokenizer.from_pretrained(path).apply_chat_template([{"role": "user", "content": "x"}]) == "T3"


# -- split_thinking ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Just an answer.", ("", "Just an answer.")),
    ("<|channel>thought\nLet me think.<channel|>The answer is 4.", ("Let me think.", "The answer is 4.")),
    ("<|channel>thought\nstep 1\nstep 2\n<channel|>\nDone<turn|>", ("step 1\nstep 2", "Done<turn|>")),
    ("<|channel>thought\n<channel|>Direct.", ("", "Direct.")),  # empty thought channel (26B/31B, thinking off)
    ("<|channel>thought\nhalf a thou", ("half a thou", "")),  # streaming, unfinished
    ("<|channel>", ("", "")),
    ("<|channel>thou", ("", "")),  # the label itself still streaming
    ("<|channel>thought", ("", "")),
    ("<|channel>thought\nA<channel|>x<|channel>thought\nB<channel|>y", ("A\nB", "xy")),
    ("", ("", "")),
])
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


def test_streaming_detokenizer_matches_decode(tok):
    text = "hello world, naïve 日本 🎉 <|turn>x"
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.make_detokenizer()
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == tok.decode(ids)


_BYTES = [0x41, 0x0A, 0x20, 0x80, 0x89, 0x9F, 0xA9, 0xAD, 0xB8, 0xC3, 0xE2, 0x96, 0x81, 0xE4, 0xF0, 0xFF]
_PIECES = ["▁", "a", "▁the", "\n", "▁▁", "ing", "<", "|", "<|channel>", "<channel|>", "<|turn>", "<eos>", "<pad>",
           "<|image|>", '<|"|>']


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from([f"<0x{b:02X}>" for b in _BYTES]), st.sampled_from(_PIECES),
                          st.sampled_from(["日本語", "é", "🎉👍🏽"])), max_size=12))
def test_streamed_pieces_join_into_the_full_decode(tok, parts):
    # Byte tokens that form characters across tokens, runs that are not valid UTF-8 (the decoder turns each of
    # their bytes into U+FFFD, valid characters in the run included), special tokens, spaces.
    ids = []
    for part in parts:
        known = tok.convert_tokens_to_ids(part)
        ids += [known] if known != tok.hf.unk_token_id else tok.encode(part, add_special_tokens=False)
    detok = tok.make_detokenizer()
    pieces = []
    for i in ids:
        detok.add_token(i)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    full = tok.decode(ids)
    assert "".join(pieces) == full
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in full
