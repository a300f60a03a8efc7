"""The assistant drafter against transformers' Gemma4AssistantForCausalLM, given the same target states; loading
and the fit check."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4 import ChatSession, ConfigError, InputError, load_assistant
from mlx_gemma4.assistant import AssistantConfig
from mlx_gemma4.generation import generate_step
from tests import helpers, tiny


def _target_states(hf, n: int, token: int):
    """The reference target's shared K/V, last hidden state and the embedding of ``token`` after ``n`` prompt
    tokens, and the reference drafter's inputs made of them."""
    ids = helpers.ids_of(n)
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True, return_shared_kv_states=True)
        embed = hf.get_input_embeddings()(torch.tensor([[token]]))
    return out.shared_kv_states, out.hidden_states[-1][:, -1:], embed


def _our_kv(ours, shared, cut=None):
    kv = {}
    for t, (k, v) in shared.items():
        n = ours.visible(t, k.shape[2]) if cut is None else cut(t, k.shape[2])
        kv[t] = (mx.array(k[:, :, -n:].numpy()), mx.array(v[:, :, -n:].numpy()))
    return kv


@pytest.mark.parametrize("family", ["e", "dense", "dense-unified"])
@pytest.mark.parametrize("ordered", [False, True], ids=["tied-head", "centroid-head"])
def test_drafter_logits_match_the_reference(text_pair, family, ordered):
    """gemma4_assistant for E-style and dense targets; gemma4_unified_assistant (the 12B's drafter: the same
    model over a gemma4_unified_text config) against a dense k_eq_v target's states."""
    family, unified = family.split("-")[0], family.endswith("unified")
    hf, _ = text_pair(family)
    hf_a = tiny.make_assistant(family, ordered=ordered, unified=unified)
    ours = helpers.assistant_from(hf_a)
    n = 20   # more than the window (8) + 1: the drafter's sliding layers see only the last window + 1
    shared, hidden, embed = _target_states(hf, n, token=77)
    with torch.no_grad():
        ref = hf_a(inputs_embeds=torch.cat([embed, hidden], -1), position_ids=torch.tensor([[n]]),
                   shared_kv_states=shared)
    logits, projected = ours(mx.array(embed.numpy()), mx.array(hidden.numpy()), n, _our_kv(ours, shared))
    np.testing.assert_allclose(np.array(logits), ref.logits.numpy(), atol=helpers.TEXT_ATOL)
    np.testing.assert_allclose(np.array(projected), ref.last_hidden_state.numpy(), atol=helpers.TEXT_ATOL)
    # The cheap path drafts the same token.
    token, again = ours.draft_token(mx.array(embed.numpy()), mx.array(hidden.numpy()), n, _our_kv(ours, shared))
    assert int(token) == int(ref.logits[0, -1].argmax())
    np.testing.assert_allclose(np.array(again), np.array(projected), atol=1e-6)
    # The window is sharp: one position fewer in the sliding layers changes the logits.
    window = hf_a.config.text_config.sliding_window
    narrower = _our_kv(ours, shared, cut=lambda t, m: window if t == "sliding_attention" else m)
    other, _ = ours(mx.array(embed.numpy()), mx.array(hidden.numpy()), n, narrower)
    assert np.abs(np.array(other) - ref.logits.numpy()).max() > 1e-3


def test_load_assistant_reads_a_checkpoint_and_checks_the_fit(tmp_path, text_pair):
    _, target = text_pair("e")
    hf_a = tiny.make_assistant("e", ordered=True)
    hf_a.save_pretrained(tmp_path / "drafter", safe_serialization=True)
    draft = load_assistant(tmp_path / "drafter", target=target)
    ref = helpers.assistant_from(hf_a)
    for (name, a), (_, b) in zip(sorted(dict(_flat(draft)).items()), sorted(dict(_flat(ref)).items())):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=name)

    draft.config.backbone_hidden_size = 32
    with pytest.raises(InputError, match="target hidden size of 32"):
        draft.check_fits(target)


def test_a_drafter_for_another_head_size_does_not_fit(text_pair):
    _, target = text_pair("e")
    draft = helpers.assistant_from(tiny.make_assistant("e", head_dim=8))
    with pytest.raises(InputError, match="sliding_attention head size is 8"):
        draft.check_fits(target)


def test_an_assistant_that_is_not_a_drafter_is_an_input_error(text_pair):
    """A path passed where load_assistant's result goes was an AttributeError ('str' has no 'check_fits')."""
    _, target = text_pair("e")
    with pytest.raises(InputError, match="load_assistant"):
        generate_step(target, {"input_ids": mx.array([[2, 5, 6]], dtype=mx.int32)}, assistant="models/drafter")
    with pytest.raises(InputError, match="load_assistant"):
        ChatSession(target, None, assistant="models/drafter")


@pytest.mark.parametrize("target", [5, "models/gemma-4-E4B-it-4bit", None])
def test_a_target_that_is_not_a_model_is_an_input_error(drafters, target):
    """load_assistant(DIR, target=processor) or a path was an AttributeError ('... has no attribute config')."""
    draft = drafters("e")
    with pytest.raises(InputError, match="target must be the model"):
        draft.check_fits(target if target is not None else object())


def test_assistant_config_refuses_other_models(tmp_path):
    with pytest.raises(ConfigError, match="assistant drafter"):
        AssistantConfig.from_dict({"model_type": "gemma4", "text_config": {}})
    bad = tiny.make_assistant_config("e", ordered=True, num_centroids=7).to_dict()
    with pytest.raises(ConfigError, match="num_centroids"):
        AssistantConfig.from_dict(bad)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant"}))
    with pytest.raises(ConfigError, match="text_config"):
        load_assistant(tmp_path)


def _flat(module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def test_convert_writes_a_drafter_that_loads_plain_and_quantized(tmp_path, text_pair, caplog):
    from mlx_gemma4.conversion import convert
    from mlx_gemma4.generation import generate_step

    _, target = text_pair("e")
    hf_a = tiny.make_assistant("e", hidden_size=64, ordered=True)
    hf_a.save_pretrained(tmp_path / "src", safe_serialization=True)
    ref = helpers.assistant_from(hf_a)

    with caplog.at_level("WARNING", logger="mlx_gemma4"):
        plain = load_assistant(convert(tmp_path / "src", tmp_path / "f32", dtype="float32"), target=target)
    assert "tokenizer" not in caplog.text   # a drafter needs none of its own: no warning that it has none
    for (name, a), (_, b) in zip(sorted(_flat(plain)), sorted(_flat(ref))):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=name)

    caplog.clear()
    with caplog.at_level("WARNING", logger="mlx_gemma4"):
        dst = convert(tmp_path / "src", tmp_path / "q4", q_bits=4, q_group_size=32, dtype="float32")
        assert not caplog.text
        # Settings for parts a drafter does not have say so (they change nothing), and the output is the same.
        again = convert(tmp_path / "src", tmp_path / "q4-flags", q_bits=4, q_group_size=32, dtype="float32",
                        ple_bits=4, tower_bits=0)
    assert "--ple-bits changes nothing" in caplog.text and "--tower-bits changes nothing" in caplog.text
    assert (again / "config.json").read_text() == (dst / "config.json").read_text()
    quant = json.loads((dst / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4 and quant["masked_embedding.centroids"] is False
    q4 = load_assistant(dst, target=target)
    assert "scales" in q4.model.layers[0].mlp.gate_up_proj and "scales" in q4.model.embed_tokens
    # Quantized drafts are other drafts, never other tokens: the output is the target's.
    inputs = {"input_ids": mx.array(helpers.ids_of(20).numpy().astype(np.int32))}
    expected = [t for t, _ in generate_step(target, inputs, max_tokens=16)]
    assert [t for t, _ in generate_step(target, inputs, max_tokens=16, assistant=q4, draft_tokens=3)] == expected
