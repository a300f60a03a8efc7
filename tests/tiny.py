"""Tiny random-weight Gemma 4 reference checkpoints built with transformers (the reference implementation).

Each family the real models use is covered: E-style (PLE, KV sharing with sliding and full producers,
double-wide MLP), dense with attention_k_eq_v and global KV heads (31B-style), and MoE (26B-A4B-style).
Vision and audio towers are optional. Token ids are those of the real vocabulary; the vocabulary itself is
small, so special ids are remapped into it (see SPECIAL_IDS) and written into the config.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mlx_gemma4.demo import SPECIAL_IDS, VOCAB  # noqa: E402  (special ids squeezed into a small vocabulary)

_TEXT_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, rms_norm_eps=1e-6, final_logit_softcapping=30.0, max_position_embeddings=512,
    pad_token_id=0, eos_token_id=[1, 106], bos_token_id=2,
)

TEXT_FAMILIES = {
    # E2B/E4B-style: PLE, last 3 layers share K/V (both a sliding and a full producer), double-wide MLP.
    "e": dict(
        _TEXT_BASE, num_hidden_layers=7, sliding_window=8, global_head_dim=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                     "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=3, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        use_double_wide_mlp=True,
    ),
    # 31B-style: K = V on full layers, separate (fewer) global KV heads, no PLE.
    "dense": dict(
        _TEXT_BASE, num_hidden_layers=4, sliding_window=8, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    # 26B-A4B-style: MoE block beside the dense MLP, k_eq_v.
    "moe": dict(
        _TEXT_BASE, num_hidden_layers=3, sliding_window=8, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8,
        top_k_experts=2, moe_intermediate_size=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
}

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    head_dim=16, patch_size=16, pooling_kernel_size=3, position_embedding_size=128,
)
# 26B/31B-style vision: standardize, clipped linears.
VISION_LARGE = dict(VISION, standardize=True, use_clipped_linears=True)
AUDIO = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[8, 4],
    output_proj_dims=48, attention_chunk_size=4, attention_context_left=5, attention_context_right=0,
)
# For whole-model tests with real 128-bin log-mel features: the reference sizes its input projection as
# channels[0] // 4 * channels[1], which only fits 128 bins when channels[0] is 128 (as in the real models).
AUDIO_128 = dict(AUDIO, subsampling_conv_channels=[128, 4])


def make_config(family: str = "e", vision: dict | None = None, audio: dict | None = None, **text_overrides):
    from transformers import Gemma4Config

    text = copy.deepcopy(TEXT_FAMILIES[family])
    text.update(text_overrides)
    if vision is not None and family != "e":
        text["use_bidirectional_attention"] = "vision"
    return Gemma4Config(
        text_config=text, vision_config=vision, audio_config=audio,
        boi_token_id=SPECIAL_IDS["boi"], eoi_token_id=SPECIAL_IDS["eoi"], image_token_id=SPECIAL_IDS["image"],
        video_token_id=SPECIAL_IDS["video"], boa_token_id=SPECIAL_IDS["boa"], eoa_token_index=SPECIAL_IDS["eoa"],
        audio_token_id=SPECIAL_IDS["audio"],
    )


def randomize(model, seed: int) -> None:
    """Give every parameter and buffer that the default init leaves at 1 or 0 a random value, so parity tests
    see norms, scalars and clip bounds doing real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "scale" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("position_embedding_table", "pos_embedding")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g) * (p.shape[-1] ** 0.5) / 8)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith(("input_min", "output_min")):
                b.fill_(-3.0)
            elif name.endswith(("input_max", "output_max")):
                b.fill_(3.0)


def make_model(family: str = "e", vision: dict | None = None, audio: dict | None = None, seed: int = 0,
               **text_overrides):
    """A float32 Gemma4ForConditionalGeneration in eval mode with random weights."""
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    config = make_config(family, vision, audio, **text_overrides)
    config._attn_implementation = "eager"
    model = Gemma4ForConditionalGeneration(config).float().eval()
    randomize(model, seed)
    return model


def save_checkpoint(model, path: Path) -> Path:
    """save_pretrained in safetensors, as a published checkpoint would be."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_assistant_config(family: str = "e", hidden_size: int = 48, num_hidden_layers: int = 2,
                          ordered: bool = False, num_centroids: int = 8, top_k: int = 2, unified: bool = False,
                          **text_overrides):
    """A Gemma4AssistantConfig for a drafter of the tiny target ``family``: its layers read the target's K/V, so
    head sizes (and, for k_eq_v targets, the global K/V heads) follow the target's. ``unified``: the
    gemma4_unified_assistant spelling (a gemma4_unified_text config without the PLE keys)."""
    from transformers import Gemma4AssistantConfig, Gemma4UnifiedAssistantConfig

    t = TEXT_FAMILIES[family]
    types = ["sliding_attention"] * (num_hidden_layers - 1) + ["full_attention"]
    text = dict(
        vocab_size=t["vocab_size"], hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
        global_head_dim=t["global_head_dim"], num_global_key_value_heads=t.get("num_global_key_value_heads"),
        attention_k_eq_v=t.get("attention_k_eq_v", False), sliding_window=t["sliding_window"], layer_types=types,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, rms_norm_eps=1e-6,
        max_position_embeddings=t["max_position_embeddings"], final_logit_softcapping=None,
        pad_token_id=0, eos_token_id=[1, 106], bos_token_id=2,
    )
    text.update(text_overrides)
    if unified:
        del text["hidden_size_per_layer_input"], text["vocab_size_per_layer_input"]
        text["model_type"] = "gemma4_unified_text"
    kind = Gemma4UnifiedAssistantConfig if unified else Gemma4AssistantConfig
    return kind(text_config=text, backbone_hidden_size=t["hidden_size"],
                                 use_ordered_embeddings=ordered, num_centroids=num_centroids,
                                 centroid_intermediate_top_k=top_k)


def make_assistant(family: str = "e", seed: int = 1, **kw):
    """A float32 Gemma4AssistantForCausalLM in eval mode with random weights (and, with ``ordered``, a random
    token ordering for the centroid-masked head)."""
    from transformers import Gemma4AssistantForCausalLM, Gemma4UnifiedAssistantForCausalLM

    torch.manual_seed(seed)
    config = make_assistant_config(family, **kw)
    config._attn_implementation = "eager"
    kind = Gemma4UnifiedAssistantForCausalLM if kw.get("unified") else Gemma4AssistantForCausalLM
    model = kind(config).float().eval()
    randomize(model, seed)
    if config.use_ordered_embeddings:
        g = torch.Generator().manual_seed(seed)
        model.masked_embedding.token_ordering.copy_(torch.randperm(config.text_config.vocab_size, generator=g))
    return model
