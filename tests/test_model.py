"""Whole-model parity with transformers' Gemma4ForConditionalGeneration on prompts with images, video frames and
audio, built by our Processor and fed unchanged (as torch tensors) to the reference.

Tolerance 5e-4 absolute on logits of magnitude ~2, looser than the text-only 1e-4: the towers' soft tokens match
to ~1e-6, but at soft-token positions the residual stream starts small and the random layers amplify float32
rounding (transformers' own eager and sdpa attention paths differ by 7.6e-5 on the two-image prompt; we differ from
eager by 2.3e-4). A wrong merge, mask or position moves these logits by 1e-2 or more.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma4.config import ModelConfig
from mlx_gemma4.errors import ContextLengthError, InputError
from mlx_gemma4.model import Gemma4
from mlx_gemma4.processing.processor import Processor
from mlx_gemma4.weights import load_model
from tests import tiny
from tests.helpers import MODEL_ATOL, blocky_image, ids_of, reference_logits, tone


@pytest.fixture(scope="module")
def e_model(checkpoint_factory):
    hf, path = checkpoint_factory("e", vision=tiny.VISION, audio=tiny.AUDIO_128)
    return hf, load_model(path), Processor.from_pretrained(path)


@pytest.fixture(scope="module")
def large_model(checkpoint_factory):
    # 26B/31B-style: standardized, clipped vision and bidirectional attention among vision tokens.
    hf, path = checkpoint_factory("dense", vision=tiny.VISION_LARGE)
    return hf, load_model(path), Processor.from_pretrained(path)


def _check(hf, model, inputs):
    ours = np.array(model(**inputs))
    ref = reference_logits(hf, inputs)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=MODEL_ATOL, rtol=0)
    return ours


@pytest.mark.parametrize("which", ["e_model", "large_model"])
def test_one_image(request, which):
    hf, model, proc = request.getfixturevalue(which)
    inputs = proc(text="<bos>look <|image|> what is it?", images=[blocky_image(64, 48, 0)], max_soft_tokens=70)
    _check(hf, model, inputs)


@pytest.mark.parametrize("which", ["e_model", "large_model"])
def test_two_images_of_different_sizes(request, which):
    hf, model, proc = request.getfixturevalue(which)
    inputs = proc(text="first <|image|> then <|image|> compare",
                  images=[blocky_image(96, 32, 1), blocky_image(40, 80, 2)], max_soft_tokens=70)
    _check(hf, model, inputs)


@pytest.mark.parametrize("which", ["e_model", "large_model"])
def test_video_frames(request, which):
    hf, model, proc = request.getfixturevalue(which)
    frames = [blocky_image(48, 48, s) for s in range(3)]
    inputs = proc(text="clip: <|video|> describe", videos=[frames])
    _check(hf, model, inputs)


@pytest.mark.parametrize("seconds", [0.3, 1.1, 2.5])
def test_audio(e_model, seconds):
    hf, model, proc = e_model
    inputs = proc(text="listen <|audio|> transcribe", audio=[tone(seconds)])
    _check(hf, model, inputs)


def test_audio_with_image(e_model):
    hf, model, proc = e_model
    inputs = proc(text="<|image|> and <|audio|>", images=[blocky_image(32, 32, 3)], audio=[tone(0.7, 300)],
                  max_soft_tokens=70)
    _check(hf, model, inputs)


def test_chunked_prefill_with_vision_blocks_matches_full(large_model):
    hf, model, proc = large_model
    inputs = proc(text="a <|image|> b <|image|> c", images=[blocky_image(48, 48, 4), blocky_image(64, 32, 5)],
                  max_soft_tokens=70)
    full = np.array(model(**inputs))
    cache = model.make_cache()
    last = np.array(model.prefill(inputs, cache, chunk_size=5))  # chunks grow to cover whole images
    np.testing.assert_allclose(last, full[0, -1], atol=MODEL_ATOL, rtol=0)
    # And the text after it continues exactly: prefill from `start`, then the compiled step.
    more = mx.array([[7, 9, 11]], dtype=mx.int32)
    ids = mx.concatenate([mx.array(inputs["input_ids"]), more], axis=1)
    ref = np.array(model(**{**inputs, "input_ids": ids}))[0, -3:]
    L = inputs["input_ids"].shape[1]
    got = [np.array(model.prefill({"input_ids": ids[:, : L + 2]}, cache, start=L))]
    got.append(np.array(model.step(more[:, 2:], cache))[0, 0])
    np.testing.assert_allclose(np.stack(got), ref[1:], atol=MODEL_ATOL, rtol=0)


def test_prefill_chunks_never_split_a_vision_block(large_model):
    """A chunk that would end inside an image grows to the image's end (its tokens attend to each other)."""
    hf, model, proc = large_model
    inputs = proc(text="a <|image|> b <|image|> c", images=[blocky_image(48, 48, 4), blocky_image(64, 32, 5)],
                  max_soft_tokens=70)
    reported = []
    model.prefill(inputs, model.make_cache(), chunk_size=5, progress=lambda done, total: reported.append(done))
    ends = reported[1:]  # the first report is (0, L), before any chunk
    is_image = np.array(inputs["input_ids"])[0] == model.config.image_token_id
    assert ends and not any(is_image[e - 1] and is_image[e] for e in ends)
    assert any(b - a > 5 for a, b in zip([0, *ends], ends))  # some chunk did grow


@pytest.mark.parametrize("family", ["e", "dense", "moe"])
def test_chunked_prefill_matches_full_forward(family, text_pair):
    hf, model = text_pair(family)
    ids = mx.array(ids_of(41, seed=2).numpy().astype(np.int32))
    full = np.array(model(ids))
    for chunk in (3, 8, 13, 64):  # smaller than, equal to and larger than the window (8), and the whole prompt
        cache = model.make_cache()
        last = model.prefill({"input_ids": ids[:, :40]}, cache, chunk_size=chunk)
        np.testing.assert_allclose(np.array(last), full[0, 39], atol=MODEL_ATOL, rtol=0)
        assert cache[0].offset == 40
        np.testing.assert_allclose(np.array(model.step(ids[:, 40:], cache))[0, 0], full[0, 40], atol=MODEL_ATOL, rtol=0)


@pytest.mark.parametrize("family", ["e", "dense"])
def test_prefill_writes_what_the_full_forward_writes(family, text_pair):
    """Prefill skips work whose output nobody reads (the KV-shared layers but at the last position, and all but
    the K/V of the layer before them); every cache still ends up as a forward over the whole prompt leaves it."""
    _, model = text_pair(family)
    ids = mx.array(ids_of(30, seed=4).numpy().astype(np.int32))
    want = model.make_cache()
    mx.eval(model(ids, cache=want))
    for chunk in (4, 8, 30):
        got = model.make_cache()
        model.prefill({"input_ids": ids}, got, chunk_size=chunk)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.offset == b.offset == 30
            for x, y in zip(a.state, b.state):
                np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5, rtol=0, err_msg=f"layer {i}")
    # And the work is skipped: the MLP of the layer before the KV-shared ones (of the last layer, without
    # sharing) runs once, at the last position, however many chunks.
    layer = model.language_model.layers[model.language_model.config.first_kv_shared_layer - 1]
    mlp, seen = layer.mlp, []

    class Spy(nn.Module):
        def __call__(self, x):
            seen.append(x.shape[1])
            return mlp(x)

    layer.mlp = Spy()
    try:
        model.prefill({"input_ids": ids}, model.make_cache(), chunk_size=8)
    finally:
        layer.mlp = mlp
    assert seen == [1]


def test_prefill_stops_between_chunks_when_asked(text_pair):
    hf, model = text_pair("e")
    ids = mx.array(ids_of(20, seed=3).numpy().astype(np.int32))
    asked = []

    def should_stop():
        asked.append(True)
        return len(asked) > 2

    cache = model.make_cache()
    assert model.prefill({"input_ids": ids}, cache, chunk_size=6, should_stop=should_stop) is None
    assert cache[0].offset == 12  # two whole chunks
    # What is in the cache is right: prefilling the rest gives the full forward's logits.
    last = model.prefill({"input_ids": ids}, cache, chunk_size=6, start=12)
    np.testing.assert_allclose(np.array(last), np.array(model(ids))[0, -1], atol=MODEL_ATOL, rtol=0)


def test_placeholders_without_media_are_an_error(e_model):
    hf, model, proc = e_model
    ids = proc(text="x <|image|>", images=[blocky_image(32, 32, 0)], max_soft_tokens=70)["input_ids"]
    with pytest.raises(InputError, match="no image inputs"):
        model(ids)


def test_text_only_model_refuses_images(checkpoint_factory):
    hf, path = checkpoint_factory("moe")
    model = load_model(path)
    with pytest.raises(InputError, match="no vision tower"):
        model(mx.array([[2, 5, 380, 6]], dtype=mx.int32), pixel_values=mx.zeros((1, 9, 768)),
              image_position_ids=mx.zeros((1, 9, 2), dtype=mx.int32))


def test_model_takes_the_processors_keys_and_refuses_others(e_model):
    _, model, processor = e_model
    inputs = processor(text="hello there")
    assert "mm_token_type_ids" in inputs  # returned by the processor, accepted (and not needed) by the model
    np.testing.assert_array_equal(np.array(model(**inputs)), np.array(model(inputs["input_ids"])))
    with pytest.raises(InputError, match="pixel_value"):
        model(inputs["input_ids"], pixel_value=mx.zeros((1, 3)))


@pytest.mark.parametrize("ids, match", [
    (mx.array([[2, 5, 400]], dtype=mx.int32), "outside this model's vocabulary of 400"),   # one past the end
    (mx.array([[2, -3, 6]], dtype=mx.int32), "outside this model's vocabulary"),
    (mx.array([[2.0, 5.0]]), "whole-number token ids"),
    (mx.zeros((1, 0), dtype=mx.int32), "input_ids is empty"),
    (mx.zeros((1, 2, 3), dtype=mx.int32), r"shape \[1, L\]"),
    ([[2, 5], [6]], "array of token ids"),
])
def test_bad_input_ids_are_named_not_gathered_out_of_bounds(e_model, ids, match):
    # An id past the vocabulary used to give logits from whatever the gather read; an empty or ragged one a
    # TypeError deep in the decoder.
    _, model, _ = e_model
    with pytest.raises(InputError, match=match):
        model(ids)


def test_input_ids_as_lists_and_numpy_give_the_same_logits(e_model):
    _, model, _ = e_model
    want = np.array(model(mx.array([[2, 5, 6, 7]], dtype=mx.int32)))
    for ids in ([[2, 5, 6, 7]], np.array([[2, 5, 6, 7]], dtype=np.int64), [2, 5, 6, 7]):
        np.testing.assert_array_equal(np.array(model(ids)), want)


@pytest.mark.parametrize("cache", [[1, 2], [], "cache", None])
def test_a_cache_that_is_not_make_caches_is_named(e_model, cache):
    _, model, _ = e_model
    ids = mx.array([[2, 5, 6]], dtype=mx.int32)
    if cache is None:   # another model's cache: the right kinds, the wrong count
        cache = model.make_cache()[:-1]
    with pytest.raises(InputError, match="make_cache"):
        model(ids, cache=cache)


def test_a_prompt_past_the_context_is_refused_before_the_towers_run(e_model, monkeypatch):
    _, model, proc = e_model
    inputs = proc(text="x <|image|>" + " y" * 500, images=[blocky_image(32, 32, 0)], max_soft_tokens=70)
    monkeypatch.setattr(model, "_encode_images", lambda *a: pytest.fail("the vision tower ran"))
    with pytest.raises(ContextLengthError):
        model(**inputs)


def test_pixel_values_without_their_positions_are_named(e_model):
    _, model, proc = e_model
    inputs = proc(text="x <|image|>", images=[blocky_image(32, 32, 0)], max_soft_tokens=70)
    with pytest.raises(InputError, match="image_position_ids"):
        model(inputs["input_ids"], pixel_values=inputs["pixel_values"])


def _memory_model(ple_dim: int, shared: int) -> Gemma4:
    """12 layers of 256 wide, float32, 4 heads over one K/V head, window 128: big enough that a layer's temporaries
    (about 10 MB at 512 tokens) dwarf what else a prefill allocates."""
    sliding, full = "sliding_attention", "full_attention"
    text = dict(model_type="gemma4_text", vocab_size=1024, hidden_size=256, intermediate_size=1024,
                num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=1, head_dim=64, global_head_dim=128,
                sliding_window=128, layer_types=[sliding, sliding, full] * 4, final_logit_softcapping=30.0,
                max_position_embeddings=4096, hidden_size_per_layer_input=ple_dim, vocab_size_per_layer_input=1024,
                num_kv_shared_layers=shared)
    model = Gemma4(ModelConfig.from_dict(text))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("ple_dim, shared", [(0, 0), (32, 6)], ids=["dense", "e-style"])
def test_prefill_transient_memory_is_a_few_layers_of_activations(ple_dim, shared):
    """Prefill's peak over what was allocated before it is bounded by the cache it leaves plus a few layers'
    temporaries, from the model's shapes: one layer's activations at L tokens are the residual stream, the q and
    K/V projections, the MLP's two intermediates (L x hidden, q, 2 kv, 2 intermediate wide) and the attention scores
    (heads x L x L); the per-layer inputs of the pass are alive throughout. The CPU backend's scheduler keeps about
    two layers' ops queued here (measured 2.0-2.1 layers); a temporary that outlives its layer (kept by a Python
    reference, say) adds its size once per layer and fails the bound (every layer's attention weights kept: 6)."""
    model = _memory_model(ple_dim, shared)
    tc = model.config.text_config
    L, item = 512, 4
    width = max(tc.head_dim, tc.global_head_dim)
    layer = item * (L * (tc.hidden_size + (tc.num_attention_heads + 2 * tc.num_key_value_heads) * width
                         + 2 * tc.intermediate_size) + tc.num_attention_heads * L * L)
    per_layer_inputs = 3 * item * L * tc.num_hidden_layers * tc.hidden_size_per_layer_input
    ids = mx.random.randint(3, tc.vocab_size, (1, L), key=mx.random.key(0)).astype(mx.int32)
    cache = model.make_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    mx.eval(model.prefill({"input_ids": ids}, cache))
    transient = mx.get_peak_memory() - start - sum(c.nbytes for c in cache)
    assert transient <= per_layer_inputs + 3 * layer, (transient / layer, layer)


def test_long_passes_wait_for_an_earlier_layer_never_the_one_just_queued(monkeypatch):
    """Layer by layer, prefill queues each layer and then waits for the one queued ``ahead`` before it: the device
    is never left without queued work by a wait, and no more than ``ahead + 1`` layers are in flight."""
    import mlx_gemma4.model as gm

    log = []

    class Recorder:
        def __getattr__(self, name):
            return getattr(mx, name)

        def async_eval(self, arrays):
            log.append(("queue", int(arrays[0].item())))

        def eval(self, arrays):
            log.append(("wait", int(arrays[0].item())))

    monkeypatch.setattr(gm, "mx", Recorder())
    assert gm._eval_each_layer(gm.EVAL_EACH_LAYER_FROM - 1) is None  # short passes stay one lazy graph
    for tokens, ahead in ((1059, 1), (2048, 1), (4096, 1), (512, 4), (64, 32)):
        log.clear()
        after_layer = gm._eval_each_layer(tokens)
        for i in range(40):
            after_layer(mx.array(i), None)
        waits = [i for kind, i in log if kind == "wait"]
        assert waits == list(range(40 - ahead)), (tokens, waits)
        for n, (kind, i) in enumerate(log):
            if kind == "wait":  # the wait comes right after queuing the layer `ahead` later
                assert log[n - 1] == ("queue", i + ahead)
