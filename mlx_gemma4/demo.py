"""A tiny random-weight Gemma 4 for trying things offline (``gemma4-chat --demo``) and for tests.

Everything real is kept except the sizes: the tokenizer is a small byte-fallback BPE built the way transformers'
``GemmaTokenizer`` builds Gemma's, with Gemma 4's special token strings, its tokenizer_config.json keys, the
Gemma 4 chat template and a processor_config.json shaped like the published E4B one. The model is E-style
(per-layer embeddings, KV sharing, double-wide MLP) with small vision and audio towers. Its output is random.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

VOCAB = 400
# Special tokens sit at their real ids where those fit the small vocabulary; the others are squeezed in.
SPECIAL_IDS = {
    "pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4,
    "think": 98, "channel_open": 100, "channel_close": 101, "turn_open": 105, "turn_close": 106,
    "boi": 255, "boa": 256, "image": 380, "audio": 381, "eoi": 382, "eoa": 383, "video": 384,
}

# Special token strings of Gemma 4, keyed like SPECIAL_IDS.
SPECIAL_STRINGS = {
    "pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>", "mask": "<mask>",
    "think": "<|think|>", "channel_open": "<|channel>", "channel_close": "<channel|>",
    "turn_open": "<|turn>", "turn_close": "<turn|>",
    "boi": "<|image>", "eoi": "<image|>", "image": "<|image|>",
    "boa": "<|audio>", "eoa": "<audio|>", "audio": "<|audio|>", "video": "<|video|>",
}
# Tool-use tokens: real ids 46..52 fit the small vocabulary as they are.
TOOL_TOKENS = {
    "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48, "<tool_call|>": 49,
    "<|tool_response>": 50, "<tool_response|>": 51, '<|"|>': 52,
}

_ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'\"-()[]{}<>/|_=+*#\n")
_MERGES = [
    ("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("e", "r"), ("▁", "a"), ("o", "n"), ("r", "e"),
    ("a", "t"), ("e", "n"), ("▁", "s"), ("▁", "w"), ("o", "r"), ("i", "s"), ("▁", "i"), ("▁", "h"),
    ("l", "l"), ("▁h", "e"), ("▁he", "ll"), ("▁hell", "o"), ("▁w", "or"), ("▁wor", "l"), ("▁worl", "d"),
    ("i", "ng"), ("n", "g"), ("▁i", "s"), ("▁a", "n"), ("▁an", "d"), ("▁", "▁"), ("\n", "\n"),
]


def _vocab(special_ids: dict[str, int], size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    reserved: dict[int, str] = {}
    for name, idx in special_ids.items():
        reserved[idx] = SPECIAL_STRINGS[name]
    for tok, idx in TOOL_TOKENS.items():
        if idx in reserved:
            raise ValueError(f"tool token {tok} collides with {reserved[idx]} at id {idx}")
        reserved[idx] = tok
    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + _ALPHABET
    for a, b in _MERGES:
        if a + b not in pieces:
            pieces.append(a + b)
    free = (i for i in range(size) if i not in reserved)
    vocab = {tok: idx for idx, tok in reserved.items()}
    for piece in pieces:
        try:
            vocab[piece] = next(free)
        except StopIteration:
            raise ValueError(f"vocabulary size {size} is too small for {len(pieces)} pieces") from None
    for idx in free:  # fill the rest so ids are contiguous, as the real vocabulary is
        vocab[f"<unused{idx}>"] = idx
    return vocab, _MERGES


def _backend(vocab: dict[str, int], merges: list[tuple[str, str]], add_bos: bool):
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Same pipeline as transformers' GemmaTokenizer (which rebuilds it from the class when loading).
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [s for s in vocab if s.startswith("<") and not s.startswith(("<0x", "<unused"))]
    specials = [s for s in specials if s in SPECIAL_STRINGS.values() or s in TOOL_TOKENS]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in sorted(specials, key=vocab.get)])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", vocab["<bos>"])])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tok


def _tokenizer_config() -> dict:
    # The published google/gemma-4-*-it tokenizer_config.json, key for key.
    return {
        "audio_token": "<|audio|>", "backend": "tokenizers", "boa_token": "<|audio>", "boi_token": "<|image>",
        "bos_token": "<bos>", "eoa_token": "<audio|>", "eoc_token": "<channel|>", "eoi_token": "<image|>",
        "eos_token": "<eos>", "eot_token": "<turn|>", "escape_token": '<|"|>', "etc_token": "<tool_call|>",
        "etd_token": "<tool|>", "etr_token": "<tool_response|>", "extra_special_tokens": ["<|video|>"],
        "image_token": "<|image|>", "mask_token": "<mask>", "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>", "padding_side": "left", "processor_class": "Gemma4Processor",
        "soc_token": "<|channel>", "sot_token": "<|turn>", "stc_token": "<|tool_call>", "std_token": "<|tool>",
        "str_token": "<|tool_response>", "think_token": "<|think|>", "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
    }


def _processor_config() -> dict:
    # Shaped like google/gemma-4-E4B-it's processor_config.json.
    return {
        "processor_class": "Gemma4Processor",
        "image_seq_length": 280, "audio_seq_length": 750, "audio_ms_per_token": 40,
        "image_processor": {
            "image_processor_type": "Gemma4ImageProcessor", "do_convert_rgb": True, "do_normalize": False,
            "do_rescale": True, "do_resize": True, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
            "image_seq_length": 280, "max_soft_tokens": 280, "patch_size": 16, "pooling_kernel_size": 3,
            "resample": 3, "rescale_factor": 0.00392156862745098,
        },
        "feature_extractor": {
            "feature_extractor_type": "Gemma4AudioFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
            "padding_value": 0.0, "return_attention_mask": True, "frame_length_ms": 20.0, "hop_length_ms": 10.0,
            "min_frequency": 0.0, "max_frequency": 8000.0, "preemphasis": 0.0, "preemphasis_htk_flavor": True,
            "fft_overdrive": False, "dither": 0.0, "input_scale_factor": 1.0, "mel_floor": 0.001,
            "per_bin_mean": None, "per_bin_stddev": None, "padding_side": "right",
        },
        "video_processor": {
            "video_processor_type": "Gemma4VideoProcessor", "do_convert_rgb": True, "do_normalize": True,
            "do_rescale": True, "do_resize": True, "do_sample_frames": True, "image_mean": [0.0, 0.0, 0.0],
            "image_std": [1.0, 1.0, 1.0], "max_soft_tokens": 70, "num_frames": 32, "patch_size": 16,
            "pooling_kernel_size": 3, "resample": 3, "rescale_factor": 0.00392156862745098,
            "return_metadata": False,
        },
    }



def write_tokenizer(path: Path | str, special_ids: dict[str, int] = SPECIAL_IDS, *, vocab_size: int = VOCAB,
                    add_bos: bool = True, chat_template: bool = True, processor_config: bool = True) -> Path:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and processor_config.json into ``path``."""
    from .processing.tokenizer import bundled_chat_template

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab(special_ids, vocab_size)
    _backend(vocab, merges, add_bos).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False))
    if chat_template:
        (path / "chat_template.jinja").write_text(bundled_chat_template())
    if processor_config:
        (path / "processor_config.json").write_text(json.dumps(_processor_config(), indent=2))
    return path


def demo_config() -> dict:
    """config.json of the demo model: E-style text with small vision and audio towers."""
    ids = SPECIAL_IDS
    return {
        "model_type": "gemma4",
        "text_config": {
            "model_type": "gemma4_text", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "global_head_dim": 32, "sliding_window": 64, "num_kv_shared_layers": 2,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
            "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB, "use_double_wide_mlp": True,
            "final_logit_softcapping": 30.0, "max_position_embeddings": 4096, "eos_token_id": [1, 106],
        },
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                          "position_embedding_size": 256},
        "audio_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "subsampling_conv_channels": [128, 4], "output_proj_dims": 48},
        "boi_token_id": ids["boi"], "eoi_token_id": ids["eoi"], "image_token_id": ids["image"],
        "video_token_id": ids["video"], "boa_token_id": ids["boa"], "eoa_token_index": ids["eoa"],
        "audio_token_id": ids["audio"],
    }


def build_demo(seed: int = 0, path: Path | str | None = None):
    """(model, processor) of the demo model with random weights; the tokenizer files go to ``path`` (a temp dir
    by default)."""
    import mlx.core as mx

    from .config import ModelConfig
    from .model import Gemma4
    from .processing.processor import Processor

    mx.random.seed(seed)
    path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="gemma4-demo-"))
    write_tokenizer(path)
    config = demo_config()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    model = Gemma4(ModelConfig.from_dict(config))
    model.eval()
    mx.eval(model.parameters())
    return model, Processor.from_pretrained(path)
