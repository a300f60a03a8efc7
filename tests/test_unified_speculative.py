"""Gemma 4 12B (gemma4_unified) with its drafter (gemma4_unified_assistant), as a pair, through the public API.

The target is the tiny random 12B-style checkpoint of tests/tiny_unified.py cut to [sliding, full] layers, with
its patch and waveform embedders; the drafter is built from its layers (helpers.mimic) so that drafts are often
kept, and often not. Both go through our converter and loaders. Greedy answers with the drafter are the plain
answers token for token, for text and for prompts with an image longer than the sliding window (its tokens see
each other in every layer) and audio, and transformers' assisted generation keeps the same drafts per round.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlx_gemma4 import ChatSession, InputError, generate, load, load_assistant, stream_generate
from mlx_gemma4.conversion import convert
from tests import helpers, tiny, tiny_unified as tu
from tests.fixtures_tokenizer import make_tokenizer

NEW = 40
GREEDY = dict(max_tokens=NEW, stop_ids=[], temperature=0.0, max_soft_tokens=70)
TEXT = "tell me a long story about the sea, the ships on it, the fish below and the birds above, then stop"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers target, transformers drafter, our target, its processor, our drafter, the drafter's dir)."""
    hf = tu.make_model(seed=3, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    # The drafter's window is one below the target's, as in tests/test_speculative.py (the reference's drafter
    # then always has its window of K/V at hand).
    hf_a = tiny.make_assistant("dense", unified=True, hidden_size=64, intermediate_size=96, sliding_window=7)
    helpers.mimic(hf, hf_a)
    tmp = tmp_path_factory.mktemp("unified-pair")
    hf.save_pretrained(tmp / "target", safe_serialization=True)
    make_tokenizer(tmp / "target")
    hf_a.save_pretrained(tmp / "drafter", safe_serialization=True)
    model, processor = load(convert(tmp / "target", tmp / "target-mlx", dtype="float32"))
    drafter_dir = convert(tmp / "drafter", tmp / "drafter-mlx", dtype="float32")
    return hf, hf_a, model, processor, load_assistant(drafter_dir, target=model), drafter_dir


MEDIA = {
    "text": dict(),
    "image": dict(images=[helpers.blocky_image(96, 64, 0)]),
    "audio": dict(audio=[helpers.tone(0.6)]),
    "image and audio": dict(images=[helpers.blocky_image(64, 96, 1)], audio=[helpers.tone(0.4, 300)]),
}


def _prompt(processor, media: dict) -> str:
    parts = [{"type": "image"}] * len(media.get("images", [])) + [{"type": "audio"}] * len(media.get("audio", []))
    return processor.apply_chat_template([{"role": "user", "content": [*parts, {"type": "text", "text": TEXT}]}],
                                         add_generation_prompt=True)


def _stream(model, processor, prompt: str, media: dict, **kw) -> tuple[list[int], object]:
    responses = list(stream_generate(model, processor, prompt, **media, **GREEDY, **kw))
    return [r.token for r in responses], responses[-1]


@pytest.mark.parametrize("case", list(MEDIA))
def test_greedy_with_the_drafter_is_greedy_without_it(pair, case):
    _, _, model, processor, draft, _ = pair
    media = MEDIA[case]
    prompt = _prompt(processor, media)
    inputs = processor(text=prompt, **media, max_soft_tokens=70)
    window = model.config.text_config.sliding_window
    assert inputs["input_ids"].shape[1] > 3 * window
    if "images" in media:   # one image block longer than the window: its tokens see each other in every layer
        assert model.config.text_config.vision_block_layers == "every"
        assert (np.array(inputs["input_ids"]) == model.config.image_token_id).sum() > window
    plain, _ = _stream(model, processor, prompt, media)
    for k in (1, 2, 3, 4, None):
        tokens, last = _stream(model, processor, prompt, media, assistant=draft, draft_tokens=k)
        assert tokens == plain, k
        assert last.finish_reason == "length"
        if k:
            assert 0 < last.accepted_tokens < last.drafted_tokens, k
    assert generate(model, processor, prompt, **media, **GREEDY, assistant=draft, draft_tokens=3) == \
        generate(model, processor, prompt, **media, **GREEDY)


@pytest.mark.parametrize("case, k", [("text", 1), ("image", 3), ("image and audio", 2)])
def test_the_references_assisted_generation_keeps_the_same_drafts(pair, case, k, monkeypatch):
    """transformers' generate(..., assistant_model=) with the gemma4_unified target and its drafter: the same tokens
    and the same drafts kept in every round (the drafter reads the target's K/V after the image block as the
    reference's does)."""
    hf, hf_a, model, processor, draft, _ = pair
    media = MEDIA[case]
    prompt = _prompt(processor, media)
    inputs = processor(text=prompt, **media, max_soft_tokens=70)
    tokens, _, kept = helpers.run_rounds(model, inputs, max_tokens=NEW, assistant=draft, draft_tokens=k)
    as_torch = {key: torch.from_numpy(np.array(v).astype(np.int64) if np.array(v).dtype.kind in "iu" else np.array(v))
                for key, v in inputs.items() if key != "num_soft_tokens_per_image"}
    ref, ref_kept = helpers.reference_assisted(hf, hf_a, k, monkeypatch, NEW, **as_torch)
    assert tokens == ref
    assert kept == ref_kept
    assert 0 in kept and max(kept) >= min(k, 2), kept   # rounds of no, partial and (nearly) full acceptance


def test_chat_session_with_an_image_and_the_drafter_answers_as_without_it(pair, monkeypatch):
    """Two turns (the second reuses the cache, image block included): the same answers with the drafter."""
    _, _, model, processor, draft, _ = pair
    monkeypatch.setattr(processor.image_processor, "max_soft_tokens", 70)   # the tiny model's context is 512
    plain, spec = ChatSession(model, processor), ChatSession(model, processor, assistant=draft, draft_tokens=2)
    image = helpers.blocky_image(96, 48, 4)
    for text, media in (("what is this?", dict(images=[image])), ("and what else is in it?", {})):
        want = [r.token for r in plain.send(text, **media, max_tokens=24, stop_ids=[])]
        responses = list(spec.send(text, **media, max_tokens=24, stop_ids=[]))
        assert [r.token for r in responses] == want
        assert responses[-1].accepted_tokens > 0
        assert spec.cache[0].offset == plain.cache[0].offset
    assert spec.last_reused > 12


def test_load_assistant_fits_the_drafter_to_its_unified_target(pair, tmp_path):
    from mlx_gemma4.weights import load_model

    _, _, model, _, _, drafter_dir = pair
    draft = load_assistant(drafter_dir, target=model)
    assert draft.config.model_type == "gemma4_unified_assistant"
    # A 12B-style target of another size: a narrower hidden state and smaller global heads.
    other = tu.make_text_model(hidden_size=32, global_head_dim=16)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(InputError, match="target hidden size of 64, the model has 32") as e:
        load_assistant(drafter_dir, target=load_model(tmp_path / "other"))
    assert "full_attention head size is 32, the model's 16" in str(e.value)
