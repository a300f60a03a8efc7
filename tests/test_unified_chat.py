"""Gemma 4 12B (gemma4_unified) end to end: our processor's outputs through the converted model, ChatSession and
the app.

The checkpoint is the tiny random one of tests/tiny_unified.py, converted by our converter, with the tests'
tokenizer and chat template; load() gives the 12B processor for it. Logits are compared with transformers'
Gemma4UnifiedForConditionalGeneration fed the same processor outputs (as tests/test_model.py does for gemma4);
greedy answers with transformers' greedy generate on the same prompt.
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
from tests.helpers import blocky_image

GREEDY = dict(stop_ids=[], temperature=0.0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    hf = tu.make_model(seed=3)
    src = tmp_path_factory.mktemp("unified-src")
    hf.save_pretrained(src, safe_serialization=True)
    make_tokenizer(src)
    return hf, convert(src, tmp_path_factory.mktemp("unified-mlx") / "out", dtype="float32")


def _reference(hf, inputs) -> np.ndarray:
    skip = ("mm_token_type_ids", "num_soft_tokens_per_image", "num_soft_tokens_per_video")
    return tu.reference_logits(hf, {k: np.array(v) for k, v in inputs.items() if k not in skip})


@pytest.mark.parametrize("case", ["image", "two images", "video", "audio", "audio and image"])
def test_processor_outputs_give_the_references_logits(converted, case):
    from tests.helpers import MODEL_ATOL, tone

    hf, path = converted
    model, processor = load(path)
    assert type(processor).__name__ == "UnifiedProcessor"
    kw = {
        "image": dict(text="look <|image|> what is it?", images=[blocky_image(96, 64, 0)]),
        "two images": dict(text="first <|image|> then <|image|> compare", images=[blocky_image(150, 48, 1),
                                                                                 blocky_image(48, 110, 2)]),
        "video": dict(text="clip: <|video|> describe", videos=[[blocky_image(64, 64, s) for s in range(3)]]),
        "audio": dict(text="listen <|audio|> transcribe", audio=[tone(0.9)]),
        "audio and image": dict(text="<|image|> and <|audio|>", images=[blocky_image(48, 48, 3)],
                                audio=[tone(0.5, 300)]),
    }[case]
    inputs = processor(**kw, max_soft_tokens=70)
    ours = np.array(model(**inputs))
    np.testing.assert_allclose(ours, _reference(hf, inputs), atol=MODEL_ATOL, rtol=0)


def test_chat_session_with_an_image_answers_as_transformers_generates(converted):
    hf, path = converted
    model, processor = load(path)
    processor.image_processor.max_soft_tokens = 70   # the tiny model's context is 512
    session = ChatSession(model, processor)
    image = blocky_image(96, 48, 4)
    ours = [r.token for r in session.send("what is this?", images=[image], max_tokens=8, **GREEDY)]
    prompt = processor.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image])
    assert (np.array(inputs["input_ids"]) == model.config.image_token_id).sum() > 8
    kw = {k: torch.from_numpy(np.array(v).astype(np.int64) if np.array(v).dtype.kind in "iu" else np.array(v))
          for k, v in inputs.items() if k not in ("num_soft_tokens_per_image",)}
    with torch.no_grad():
        ref = hf.generate(**kw, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, inputs["input_ids"].shape[1]:].tolist()


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
