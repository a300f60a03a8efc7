"""Configuration dataclasses built from a Hugging Face Gemma 4 ``config.json``.

Reference: transformers ``models/gemma4/configuration_gemma4.py``. Two spellings of the text config exist:
published checkpoints carry ``global_head_dim`` / ``num_global_key_value_heads``; ``save_pretrained`` writes a
``per_layer_config`` mapping layer index -> overrides. Both resolve to the same per-layer head sizes here.
gemma4_unified (the 12B) and its text-only form read into the same dataclasses, its embedders into their own.
Every field is checked as it is read (config_checks.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_checks import Section, check, check_heads, check_rope, fail
from .errors import ConfigError

logger = logging.getLogger(__name__)

SLIDING = "sliding_attention"
FULL = "full_attention"

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def _layer_overrides(per_layer_config: dict | None, n: int) -> dict[int, dict]:
    """save_pretrained's per_layer_config (layer index -> head_dim / num_key_value_heads), checked."""
    out = {}
    for k, v in (per_layer_config or {}).items():
        where = f"text_config.per_layer_config[{k!r}]"
        if not (isinstance(k, (str, int)) and str(k).isdigit() and int(k) < n):
            fail(where, k, f"keyed by a layer index below num_hidden_layers ({n})")
        if not isinstance(v, dict):
            fail(where, v, "a JSON object")
        for key in ("head_dim", "num_key_value_heads"):
            if key in v:
                check(f"{where}.{key}", v[key], int)
        out[int(k)] = v
    return out


@dataclass
class TextConfig(Section):
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    sliding_window: int = 512
    sliding_window_pattern: int | None = None
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: str | None = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 0
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    per_layer_config: dict | None = None
    # Where vision blocks attend bidirectionally: "sliding" (gemma4: sliding layers, inside the window) or "every"
    # (gemma4_unified: every layer, whole block; the reference's forward masks it so). Set by ModelConfig.
    vision_block_layers: str = field(default="sliding", init=False)
    # Derived in __post_init__ (one entry per layer).
    layer_head_dims: list[int] = field(init=False)
    layer_kv_heads: list[int] = field(init=False)
    kv_producers: list[int] = field(init=False)  # index of the layer whose K/V each layer attends to

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None:
            period = self.sliding_window_pattern or 6
            self.layer_types = [SLIDING if (i + 1) % period else FULL for i in range(n)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != n:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {n}.")
        bad = set(self.layer_types) - {SLIDING, FULL}
        if bad:
            raise ConfigError(f"Unknown layer types {sorted(bad)}; Gemma 4 uses {SLIDING!r} and {FULL!r}.")
        if self.layer_types[-1] != FULL:
            logger.warning("Last layer must be full attention (as in the reference); forcing it.")
            self.layer_types[-1] = FULL
        rope = dict(_DEFAULT_ROPE)
        rope.update(self.rope_parameters or {})
        self.rope_parameters = rope
        for t in (SLIDING, FULL):
            check_rope(f"text_config.rope_parameters.{t}", rope[t], ("default", "proportional"))
        if self.use_bidirectional_attention not in (None, "vision", "all"):
            fail("text_config.use_bidirectional_attention", self.use_bidirectional_attention,
                  'null, "vision" or "all"')
        if self.use_bidirectional_attention == "all":
            # Embedding models (every token sees every other): config.json stores the window a causal model would
            # have; the reference halves it (plus one) on load. A chat model never has this.
            raise ConfigError("config.json sets use_bidirectional_attention='all': that is an embedding model (no "
                              "causal decoding), not a Gemma 4 chat model. Use a chat checkpoint such as "
                              "google/gemma-4-12B-it.")

        # Per-layer head sizes: save_pretrained's per_layer_config where the file has one, else the published spelling.
        global_dim = self.global_head_dim or 512  # the reference's default when the key is absent
        global_kv = self.num_global_key_value_heads if self.attention_k_eq_v else None
        overrides = _layer_overrides(self.per_layer_config, n)
        if self.per_layer_config is None:   # present but empty: every layer at head_dim, as in the reference
            overrides = {
                i: {"head_dim": global_dim, **({"num_key_value_heads": global_kv} if global_kv else {})}
                for i, t in enumerate(self.layer_types)
                if t == FULL
            }
        self.layer_head_dims = [overrides.get(i, {}).get("head_dim", self.head_dim) for i in range(n)]
        self.layer_kv_heads = [
            overrides.get(i, {}).get("num_key_value_heads", self.num_key_value_heads) for i in range(n)
        ]
        for i, (dim, kv) in enumerate(zip(self.layer_head_dims, self.layer_kv_heads)):
            check_heads(f"text_config layer {i}", self.num_attention_heads, kv, dim)
        full = [i for i, t in enumerate(self.layer_types) if t == FULL]
        if full:
            self.global_head_dim = self.layer_head_dims[full[0]]
            self.num_global_key_value_heads = self.layer_kv_heads[full[0]]

        # KV sharing: the last `num_kv_shared_layers` layers attend to the K/V of the last earlier layer of their type.
        first_shared = n - self.num_kv_shared_layers
        if not 0 < first_shared <= n:
            raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers} must be below num_hidden_layers={n}.")
        last_of_type = {t: i for i, t in enumerate(self.layer_types[:first_shared])}
        self.kv_producers = []
        for i, t in enumerate(self.layer_types):
            if i < first_shared:
                self.kv_producers.append(i)
            elif t not in last_of_type:
                raise ConfigError(f"Layer {i} shares K/V but no earlier layer of type {t!r} produces any.")
            else:
                self.kv_producers.append(last_of_type[t])

        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size.")
        if self.enable_moe_block and self.top_k_experts > self.num_experts:
            raise ConfigError(f"config.json: text_config.top_k_experts ({self.top_k_experts}) exceeds num_experts "
                              f"({self.num_experts}). Fix that entry or download the checkpoint again.")

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_kv_shared(self, i: int) -> bool:
        return self.kv_producers[i] != i

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))


@dataclass
class VisionConfig(Section):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        self.rope_parameters = {"rope_type": "axial", "rope_theta": 100.0, **(self.rope_parameters or {})}
        check_rope("vision_config.rope_parameters", self.rope_parameters)
        check_heads("vision_config", self.num_attention_heads, self.num_key_value_heads, self.head_dim)


@dataclass
class AudioConfig(Section):
    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: list[int] = field(default_factory=lambda: [128, 32])
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    def __post_init__(self) -> None:
        self.subsampling_conv_channels = list(self.subsampling_conv_channels)
        if len(self.subsampling_conv_channels) != 2:
            fail("audio_config.subsampling_conv_channels", self.subsampling_conv_channels,
                  "a list of two whole numbers (one per subsampling convolution)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config.json: audio_config.hidden_size ({self.hidden_size}) is not a multiple of its "
                              f"num_attention_heads ({self.num_attention_heads}). Fix them, or download it again.")


@dataclass
class EmbedderVisionConfig(Section):
    """gemma4_unified's vision_config: no tower, raw 48 x 48 pixel patches straight into an embedder (unified.py)."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    @property
    def patch_dim(self) -> int:
        """Raw values per model patch: (patch_size * pooling_kernel_size)^2 pixels x 3 channels."""
        return (self.patch_size * self.pooling_kernel_size) ** 2 * 3

    def __post_init__(self) -> None:
        if self.output_proj_dims != self.mm_embed_dim:
            raise ConfigError(f"config.json: vision_config.output_proj_dims ({self.output_proj_dims}) must equal "
                              f"mm_embed_dim ({self.mm_embed_dim}): the patch embedding feeds the projection. "
                              "Fix them, or download the checkpoint again.")


@dataclass
class EmbedderAudioConfig(Section):
    """gemma4_unified's audio_config: each soft token is ``audio_embed_dim`` raw waveform samples (640 = 40 ms at
    16 kHz) through the multimodal embedder."""

    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6


# What gemma4_unified's text config defaults to where it differs from gemma4's (config.json omits defaults).
_UNIFIED_TEXT_DEFAULTS = {"sliding_window": 1024, "max_position_embeddings": 262_144,
                          "use_bidirectional_attention": "vision"}
_MODEL_TYPES = {"gemma4": False, "gemma4_text": False, "gemma4_unified": True, "gemma4_unified_text": True}


@dataclass
class ModelConfig(Section):
    text_config: TextConfig
    vision_config: VisionConfig | None = None
    audio_config: AudioConfig | None = None
    # gemma4_unified (12B) has no towers: its vision_config / audio_config describe embedders (unified.py).
    vision_embedder_config: EmbedderVisionConfig | None = None
    audio_embedder_config: EmbedderAudioConfig | None = None
    model_type: str = "gemma4"
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    boa_token_id: int = 256_000
    eoa_token_id: int = 258_883
    audio_token_id: int = 258_881
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the config.json as read, written back by convert

    def __post_init__(self) -> None:
        if self.unified:
            self.text_config.vision_block_layers = "every"

    @property
    def unified(self) -> bool:
        """Encoder-free (gemma4_unified, the 12B): raw patches and waveform frames go straight into embedders."""
        return _MODEL_TYPES.get(self.model_type, False)

    @property
    def takes_images(self) -> bool:
        return self.vision_config is not None or self.vision_embedder_config is not None

    @property
    def takes_audio(self) -> bool:
        return self.audio_config is not None or self.audio_embedder_config is not None

    @property
    def tied_head(self) -> bool:
        """Whether the LM head is the token embedding (always, in the published models)."""
        return self.text_config.tie_word_embeddings and self.raw.get("tie_word_embeddings", True) is not False

    @classmethod
    def _normalize(cls, d: dict[str, Any]) -> dict[str, Any]:
        model_type = d.get("model_type")
        if model_type in ("gemma4_assistant", "gemma4_unified_assistant"):
            raise ConfigError(f"config.json has model_type={model_type!r}: this is an assistant drafter for "
                              "speculative decoding, not a model to chat with. Give the model it drafts for "
                              "instead, and the drafter beside it: in Python load_assistant(DIR) and "
                              "generate(..., assistant=draft); in the chat app gemma4-chat --model MODEL "
                              "--assistant DIR.")
        if model_type not in _MODEL_TYPES:
            raise ConfigError(
                f"config.json has model_type={model_type!r}; mlx-gemma4 only runs Gemma 4 checkpoints "
                f"({', '.join(map(repr, _MODEL_TYPES))}). Point it at a Gemma 4 model such as google/gemma-4-E4B-it."
            )
        hf_quant = d.get("quantization_config")
        if isinstance(hf_quant, dict) and "quant_method" in hf_quant:   # mlx-lm / mlx-vlm write one without it
            raise ConfigError(f"config.json says the weights are quantized with {hf_quant['quant_method']!r} (a "
                              "transformers quantization method), which mlx-gemma4 does not read. Use the unquantized "
                              "checkpoint (e.g. google/gemma-4-E4B-it); convert.py --q-bits 4 makes a small model "
                              "from it.")
        unified = _MODEL_TYPES[model_type]
        if model_type.endswith("_text"):   # a text-only checkpoint: the file is the text config
            return {"text_config": _text_defaults(d, unified), "model_type": model_type,
                    "quantization": d.get("quantization"), "raw": d}
        if "text_config" not in d:
            raise ConfigError(f"A {model_type!r} config.json needs a 'text_config' section; this file has none.")
        text = d["text_config"]
        # Generation EOS ids sometimes live at the top level only.
        if isinstance(text, dict) and "eos_token_id" not in text and "eos_token_id" in d:
            text = {**text, "eos_token_id": d["eos_token_id"]}
        out = {k: d[k] for k in ("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id",
                                 "boa_token_id", "audio_token_id") if d.get(k) is not None}
        eoa = d.get("eoa_token_id", d.get("eoa_token_index"))
        if eoa is not None:
            out["eoa_token_id"] = eoa
        towers = {k: None if d.get(k) in (None, {}) else d[k] for k in ("vision_config", "audio_config")}
        if unified:   # an empty section is the embedder with its defaults, as in the reference
            towers = {"vision_embedder_config": d.get("vision_config"), "audio_embedder_config": d.get("audio_config")}
        return {**out, **towers, "text_config": _text_defaults(text, unified), "model_type": model_type, "raw": d,
                "quantization": d.get("quantization") or d.get("quantization_config")}

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"No config.json at {path}, so it is not a Gemma 4 checkpoint. Pass the folder that "
                              "convert.py wrote (or a Hugging Face Gemma 4 checkpoint), or convert one with "
                              "convert.py.")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"Cannot read {path}: {e}. Re-download or re-convert the model.") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path} does not hold a JSON object.")
        return cls.from_dict(d)


def _text_defaults(text: Any, unified: bool) -> Any:
    """The text section with gemma4_unified's own defaults filled in where the file leaves them out."""
    if not unified or not isinstance(text, dict):
        return text
    return {**_UNIFIED_TEXT_DEFAULTS, **text}
