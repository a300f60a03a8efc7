"""Gemma 4 12B (gemma4_unified) in a chat: ChatSession and the app take a converted 12B-style checkpoint for text.

The checkpoint is the tiny random one of tests/tiny_unified.py, converted by our converter, with the tests'
tokenizer and chat template. Greedy answers are transformers' greedy generate on the same prompt.
"""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4 import ChatSession, load
from mlx_gemma4.conversion import convert
from tests import tiny_unified as tu
from tests.app_helpers import send
from tests.app_helpers import until as wait_for
from tests.fixtures_tokenizer import make_tokenizer

GREEDY = dict(stop_ids=[], temperature=0.0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    hf = tu.make_model(seed=3)
    src = tmp_path_factory.mktemp("unified-src")
    hf.save_pretrained(src, safe_serialization=True)
    make_tokenizer(src)
    return hf, convert(src, tmp_path_factory.mktemp("unified-mlx") / "out", dtype="float32")


def test_chat_session_answers_as_transformers_generates(converted):
    hf, path = converted
    model, processor = load(path)
    assert model.config.unified
    session = ChatSession(model, processor, system_prompt="be brief")
    first = [r.token for r in session.send("hello there, how are you", max_tokens=10, **GREEDY)]
    ids = session.encode(session.messages[:-1], add_generation_prompt=True).ids.reshape(1, -1)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(np.asarray(ids).astype(np.int64)), max_new_tokens=10,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    assert first == ref[0, ids.shape[1]:].tolist()
    # The second turn reuses the cache and answers as a fresh session over the whole conversation does.
    second = [r.token for r in session.send("and then?", max_tokens=6, **GREEDY)]
    assert session.last_reused > 10
    fresh = ChatSession(model, processor, system_prompt="be brief")
    assert [r.token for r in fresh.stream(session.messages[:-1], max_tokens=6, **GREEDY)] == second


def test_app_chats_with_a_12b_style_model(converted, tmp_path):
    from app.app import ChatApp
    from app.backend import Backend, Settings
    from app.history import History
    from app.model_source import load_fn, resolve
    from app.widgets.messages import ModelMessage

    _, path = converted

    async def go():
        choice = resolve(str(path))
        app = ChatApp(Backend(choice.name, load_fn(choice), settings=Settings(temperature=0.0, max_tokens=8)),
                      History(tmp_path))
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: app.backend.loaded)
            await send(pilot, "hello world")
            chat = app.chat_screen
            await wait_for(pilot, lambda: not chat.generating and chat.query(ModelMessage))
            assert app.backend.session.context_used > 5
            assert isinstance(app.backend.model.embed_audio.embedding_projection.weight, mx.array)

    asyncio.run(go())
