"""Generation: greedy tokens equal transformers' greedy generate; chat sessions reuse the cache exactly."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4.errors import ContextLengthError
from mlx_gemma4 import ChatSession, generate, stream_generate
from mlx_gemma4.generation import stream_tokens
from mlx_gemma4.processing.processor import Processor
from mlx_gemma4.weights import load_model


@pytest.fixture(scope="module", params=["e", "moe"])
def loaded(request, checkpoint_factory):
    hf, path = checkpoint_factory(request.param)
    return hf, load_model(path), Processor.from_pretrained(path)


def test_greedy_generation_equals_transformers(loaded):
    hf, model, processor = loaded
    prompt = "the quick brown fox jumps over the lazy dog " * 3
    inputs = processor(text=prompt)
    ids = np.array(inputs["input_ids"])
    ours = [r.token for r in stream_tokens(model, processor, inputs, max_tokens=20, stop_ids=[], prefill_chunk=5)]
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, ids.shape[1]:].tolist()


def test_stream_generate_text_and_stats(loaded):
    hf, model, processor = loaded
    pieces = list(stream_generate(model, processor, "hello there", max_tokens=8, stop_ids=[]))
    assert len(pieces) == 8 and pieces[-1].finish_reason == "length"
    assert all(p.finish_reason is None for p in pieces[:-1])
    last = pieces[-1]
    assert last.prompt_tokens == np.array(processor(text="hello there")["input_ids"]).size
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.ttft > 0
    text = generate(model, processor, "hello there", max_tokens=8, stop_ids=[])
    assert text == "".join(p.text for p in pieces)


def test_stops_on_eos(loaded):
    hf, model, processor = loaded
    inputs = processor(text="hello there")
    first = next(iter(stream_tokens(model, processor, inputs, max_tokens=5, stop_ids=[])))
    out = list(stream_tokens(model, processor, inputs, max_tokens=5, stop_ids=[first.token]))
    assert len(out) == 1 and out[0].finish_reason == "stop" and out[0].text == ""


def test_should_stop_cancels(loaded):
    hf, model, processor = loaded
    out = list(stream_generate(model, processor, "hello", max_tokens=50, stop_ids=[], should_stop=lambda: True))
    assert len(out) == 1 and out[0].finish_reason == "cancelled"


def test_sampling_is_seeded(loaded):
    hf, model, processor = loaded
    kw = dict(max_tokens=10, stop_ids=[], temperature=1.0, top_p=0.9, top_k=50, seed=3)
    a = [r.token for r in stream_generate(model, processor, "hi", **kw)]
    b = [r.token for r in stream_generate(model, processor, "hi", **kw)]
    assert a == b


def _fresh_tokens(model, processor, session, n):
    prompt = processor.apply_chat_template(session.messages, add_generation_prompt=True)
    return [r.token for r in stream_generate(model, processor, prompt, max_tokens=n, stop_ids=[])]


def test_chat_second_turn_equals_fresh_prefill(loaded):
    hf, model, processor = loaded
    session = ChatSession(model, processor, system_prompt="be brief")
    first = [r.token for r in session.send("hello there, how are you", max_tokens=12, stop_ids=[])]
    assert len(first) == 12
    assert session.messages[-1]["role"] == "assistant"
    used = session.context_used
    second = [r for r in session.send("and what about tomorrow", max_tokens=10, stop_ids=[], prefill_chunk=4)]
    # Only the new turn (plus whatever the re-rendered answer changed) was prefilled.
    assert second[-1].prompt_tokens < used
    session.messages.pop()  # compare against a fresh run over the same conversation
    assert [r.token for r in second] == _fresh_tokens(model, processor, session, 10)


def test_chat_regenerate_and_drop_turns(loaded):
    hf, model, processor = loaded
    session = ChatSession(model, processor)
    a = [r.token for r in session.send("tell me a story", max_tokens=6, stop_ids=[])]
    b = [r.token for r in session.regenerate(max_tokens=6, stop_ids=[])]
    assert a == b  # greedy: the same answer again, from the restored snapshot
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    list(session.send("more", max_tokens=3, stop_ids=[]))
    session.drop_oldest_turns(1)
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.context_used == 0


def test_chat_partial_answer_kept_when_caller_stops(loaded):
    hf, model, processor = loaded
    session = ChatSession(model, processor)
    it = session.send("count to ten", max_tokens=20, stop_ids=[])
    next(it), next(it)
    it.close()
    assert session.messages[-1]["role"] == "assistant"
    list(session.send("go on", max_tokens=2, stop_ids=[]))  # and the session still works


def test_prompt_past_context_is_a_clear_error(loaded):
    hf, model, processor = loaded
    limit = model.config.text_config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="context"):
        generate(model, processor, "a b " * limit, max_tokens=2)
    with pytest.raises(ContextLengthError):
        model(mx.zeros((1, limit + 1), dtype=mx.int32))


def test_chat_turn_past_context_is_not_kept(loaded):
    hf, model, processor = loaded
    session = ChatSession(model, processor)
    with pytest.raises(ContextLengthError):
        list(session.send("word " * model.config.text_config.max_position_embeddings, max_tokens=2))
    assert session.messages == []


def test_chat_load_messages_resumes(loaded, tmp_path):

    hf, model, processor = loaded
    session = ChatSession(model, processor)
    session.load_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    out = [r.token for r in session.send("again", max_tokens=4, stop_ids=[])]
    fresh = ChatSession(model, processor)
    fresh.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert out == [r.token for r in fresh.send("again", max_tokens=4, stop_ids=[])]


def test_repetition_penalty_sees_generated_tokens(loaded):
    hf, model, processor = loaded
    inputs = processor(text="hello there")
    plain = [r.token for r in stream_tokens(model, processor, inputs, max_tokens=30, stop_ids=[])]
    assert len(set(plain)) < len(plain)  # greedy decoding of the tiny random model repeats itself
    penalized = [r.token for r in stream_tokens(model, processor, inputs, max_tokens=30, stop_ids=[],
                                                repetition_penalty=1e4, repetition_context_size=64)]
    assert len(set(penalized)) == len(penalized)  # every generated token is in the penalty window
