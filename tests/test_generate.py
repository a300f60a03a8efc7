"""Generation: greedy tokens equal transformers' greedy generate; stats and stops (chat sessions: test_chat.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4.errors import ContextLengthError
from mlx_gemma4 import generate, stream_generate
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


def test_ttft_counts_the_prompts_preprocessing(loaded, monkeypatch):
    """TTFT and prompt tok/s started after the processor had read and preprocessed the media, so an image's or a
    clip's preprocessing never showed (a chat's TTFT counted it). A fake clock: the processor takes 10 "seconds"."""
    from types import SimpleNamespace

    from mlx_gemma4 import generation

    hf, model, processor = loaded
    now = [0.0]
    monkeypatch.setattr(generation, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    class SlowProcessor:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, **kw):
            now[0] += 10.0
            return self.inner(**kw)

    [r] = list(stream_generate(model, SlowProcessor(processor), "hello there", max_tokens=1, stop_ids=[]))
    assert r.ttft >= 10.0 and r.prompt_tps <= r.prompt_tokens / 10.0


def test_peak_memory_is_this_calls(loaded):
    """peak_memory_gb was MLX's peak since the process started: a big array freed before the call still showed."""
    hf, model, processor = loaded
    big = mx.zeros((100_000_000,), dtype=mx.float32)   # 0.4 GB
    mx.eval(big)
    del big
    [r] = list(stream_generate(model, processor, "hello there", max_tokens=1, stop_ids=[]))
    assert 0 < r.peak_memory_gb < 0.3


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


def test_prompt_past_context_is_a_clear_error(loaded):
    hf, model, processor = loaded
    limit = model.config.text_config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="context"):
        generate(model, processor, "a b " * limit, max_tokens=2)
    with pytest.raises(ContextLengthError):
        model(mx.zeros((1, limit + 1), dtype=mx.int32))


def test_repetition_penalty_sees_generated_tokens(loaded):
    hf, model, processor = loaded
    inputs = processor(text="hello there")
    plain = [r.token for r in stream_tokens(model, processor, inputs, max_tokens=30, stop_ids=[])]
    assert len(set(plain)) < len(plain)  # greedy decoding of the tiny random model repeats itself
    penalized = [r.token for r in stream_tokens(model, processor, inputs, max_tokens=30, stop_ids=[],
                                                repetition_penalty=1e4, repetition_context_size=64)]
    assert len(set(penalized)) == len(penalized)  # every generated token is in the penalty window


def test_verbose_prints_the_stats(loaded, capsys):
    hf, model, processor = loaded
    text = generate(model, processor, "hello there", max_tokens=4, stop_ids=[], verbose=True)
    out = capsys.readouterr().out
    assert out.startswith(text) and "generation: 4 tokens" in out and "peak memory:" in out
