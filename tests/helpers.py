"""What the test modules share: parity tolerances, our model built from a tiny reference, inputs and reference calls.

Test modules import from here (and from tests/tiny.py, tests/fixtures_tokenizer.py, tests/random_checkpoint.py for
the real-size configs), never from each other.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mlx_gemma4.config import ModelConfig
from mlx_gemma4.errors import InputError
from mlx_gemma4.model import Gemma4
from mlx_gemma4.weights import load_into, sanitize
from tests import tiny

# Text decoder against the reference, both in float32 with the same weights (tests/test_text.py says why 1e-4).
TEXT_ATOL = 1e-4
# Whole model with the towers' soft tokens in the prompt (tests/test_model.py says why it is looser).
MODEL_ATOL = 5e-4


def build(family: str, **text_overrides) -> tuple:
    """(transformers model, our Gemma4 carrying its weights) for a tiny text family of tests/tiny.py."""
    hf = tiny.make_model(family, **text_overrides)
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = Gemma4(cfg)
    weights = {k: mx.array(v.detach().numpy()) for k, v in hf.state_dict().items()}
    load_into(model, sanitize(weights, cfg, model))
    return hf, model


def build_4bit(family: str, quantize: Callable[[str, Any], bool]) -> Gemma4:
    """Our model of a tiny text family with the modules ``quantize(path, module)`` picks at 4 bits (group 64), its
    projections fused as load() leaves them."""
    _, model = build(family)
    nn.quantize(model, group_size=64, bits=4, class_predicate=quantize)
    model.language_model.fuse()
    return model


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    """(1, n) random ordinary token ids (no special ids) as a torch tensor."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 250, (1, n), generator=g)


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    """A sine at 16 kHz with a little noise, float32."""
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(1).standard_normal(t.size)).astype(
        np.float32)


def blocky_image(w: int, h: int, seed: int):
    """A ``w`` x ``h`` RGB PIL image of random 8-pixel blocks, smoothed (an image with some structure)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


def reference_logits(hf, inputs: dict) -> np.ndarray:
    """The reference's logits for our processor's output, converted to the torch types it expects."""
    kw = {}
    for k, v in inputs.items():
        a = np.array(v)
        kw[k] = torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a)
    if "input_features_mask" in kw:
        kw["input_features_mask"] = kw["input_features_mask"].bool()
    if "pixel_values_videos" in kw:
        kw["num_frames_per_video"] = torch.tensor([kw["pixel_values_videos"].shape[0]])
    with torch.no_grad():
        return hf(**kw).logits.numpy()


def reference_tokens(ref_tok) -> SimpleNamespace:
    """The token attributes of the reference processor (Gemma4Processor and Gemma4UnifiedProcessor alike), from the
    reference tokenizer, for calling its methods unbound."""
    return SimpleNamespace(
        image_token="<|image|>", boi_token=ref_tok.boi_token, eoi_token=ref_tok.eoi_token,
        audio_token=ref_tok.audio_token, boa_token=ref_tok.boa_token, eoa_token=ref_tok.eoa_token,
        video_token="<|video|>", all_special_multimodal_tokens=["<|image|>", "<|video|>", "<|audio|>"],
        image_token_ids=[ref_tok.image_token_id], audio_token_ids=[ref_tok.audio_token_id],
        video_token_ids=[ref_tok.convert_tokens_to_ids("<|video|>")])


def raises_naming(load: Callable[[Any], Any], src: Any, name: str, match: str = "") -> None:
    """``load(src)`` raises InputError whose message names ``name`` (and matches ``match``)."""
    with pytest.raises(InputError, match=match) as e:
        load(src)
    assert name in str(e.value)


def check_unusable_paths(load: Callable[[Any], Any], folder: Path, suffix: str, not_media: str) -> None:
    """What every media loader refuses with an InputError naming the path: a missing file, a directory, an empty
    file, a web URL (never downloaded; it was called a missing file, with its '//' folded), a data: URI, and text
    where media was expected (whose message matches ``not_media``)."""
    raises_naming(load, folder / f"missing{suffix}", f"missing{suffix}", "no such file")
    raises_naming(load, f"https://example.com/cat{suffix}", f"https://example.com/cat{suffix}", "is a URL")
    # A data: URI (the server takes them) was looked for as a file: "no such file. Check the path."
    raises_naming(load, "data:application/octet-stream;base64,AAAA", "data:application", "is a data: URI")
    raises_naming(load, folder, str(folder), "directory")
    (folder / f"empty{suffix}").write_bytes(b"")
    raises_naming(load, folder / f"empty{suffix}", f"empty{suffix}", "empty")
    (folder / f"notes{suffix}").write_text("hello, this is text\n" * 50)
    raises_naming(load, folder / f"notes{suffix}", f"notes{suffix}", not_media)


class ScriptedAnswers:
    """A logits processor that makes the model write given answers, one per model step of a conversation: the
    ``n``-th answer after the last user turn is forced token by token (answers start after ``<|turn>model\\n``
    or after the tool results of the step before), so a random model goes through the real tokenizer, template and
    detokenizer. It reads its position from the token history, so it keeps no state between calls."""

    def __init__(self, processor, answers: list[str]) -> None:
        tok = processor.tokenizer
        self.scripts = [tok.encode(a, add_special_tokens=False) for a in answers]
        self.turn_open = processor.special.turn_open.id
        self.model_label = len(tok.encode("model\n", add_special_tokens=False))
        self.result_open = tok.convert_tokens_to_ids("<|tool_response>")
        self.media_close = {t.id for t in (processor.special.eoi, processor.special.eoa) if t is not None}
        self.result_close = tok.convert_tokens_to_ids("<tool_response|>")

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        ids = np.array(history).tolist()
        turn = max(i for i, t in enumerate(ids) if t == self.turn_open)
        results = [i for i in range(turn, len(ids)) if ids[i] == self.result_close]
        # An answer starts after the model label, or after the last results and the media they carry.
        start = max([turn + 1 + self.model_label] + [i + 1 for i in range(turn, len(ids))
                                                     if ids[i] == self.result_close or ids[i] in self.media_close])
        # Several results of one step sit side by side: a step ends where a result is not followed by another.
        step = sum(1 for i in results if i + 1 == len(ids) or ids[i + 1] != self.result_open)
        at = len(ids) - start
        if step >= len(self.scripts) or at >= len(self.scripts[step]):
            return logits
        forced = np.full(logits.shape, -1e9, dtype=np.float32)
        forced[..., self.scripts[step][at]] = 0.0
        return mx.array(forced)


def assistant_from(hf_assistant):
    """Our Assistant carrying the weights of a transformers Gemma4AssistantForCausalLM, its projections fused as
    load_assistant leaves them."""
    from mlx_gemma4.assistant import Assistant, AssistantConfig

    ours = Assistant(AssistantConfig.from_dict(hf_assistant.config.to_dict()))
    weights = {k: mx.array(v.detach().numpy()) for k, v in hf_assistant.state_dict().items() if k != "lm_head.weight"}
    key = "masked_embedding.token_ordering"
    if key in weights:
        weights[key] = weights[key].astype(mx.int32)
    load_into(ours, weights)
    ours.fuse()
    return ours


def mimic(hf_target, hf_assistant) -> None:
    """Make a drafter that agrees with its target often, without training: for a target whose K/V producers are
    its only layers ([sliding, full]), the drafter takes the target's layers (it then runs the target's own
    forward at the drafted position, minus that position's own K/V), reads only the token embedding
    (pre_projection = [I, 0]) and passes its state on unchanged (post_projection = I)."""
    sd = hf_target.state_dict()
    with torch.no_grad():
        for name, p in [*hf_assistant.named_parameters(), *hf_assistant.named_buffers()]:
            src = "model.language_model." + name[len("model."):]
            if name.startswith("model.") and src in sd:
                p.copy_(sd[src])
        h = hf_assistant.config.backbone_hidden_size
        hf_assistant.pre_projection.weight.zero_()
        hf_assistant.pre_projection.weight[:, :h] = torch.eye(h)
        hf_assistant.post_projection.weight.copy_(torch.eye(h))


def reference_assisted(hf, hf_assistant, k: int, monkeypatch, max_new_tokens: int, **inputs) -> tuple[list, list]:
    """transformers' assisted greedy generation with ``k`` drafts per round: (the new tokens, the drafts it kept
    in each round after its first, which is its prefill). ``inputs``: torch tensors for ``hf.generate``.

    The reference cuts the target's K/V at the sequence length, which after a rejection still includes the first
    rejected draft's K/V (and, for sliding layers past the window, all rejected ones): its drafter then attends to
    a token that is not in the text. Here it gets the accepted positions only, as ours does."""
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator as Gen

    kept: list[int] = []
    update, candidates = Gen.update_candidate_strategy, Gen.get_candidates

    def record(self, input_ids, scores, n_matches):
        kept.append(int(n_matches))
        return update(self, input_ids, scores, n_matches)

    def accepted_kv_only(self, input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches, **kw):
        kv = getattr(model_outputs, "shared_kv_states", None)
        if kv is not None:
            extra = kv["full_attention"][0].shape[2] - (input_ids.shape[1] - 1)
            for t, (keys, values) in list(kv.items()):
                kv[t] = (keys[:, :, : keys.shape[2] - extra], values[:, :, : values.shape[2] - extra])
        return candidates(self, input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches, **kw)

    monkeypatch.setattr(Gen, "update_candidate_strategy", record)
    monkeypatch.setattr(Gen, "get_candidates", accepted_kv_only)
    # (the tiny drafters have no generation_config.json, so nothing sets a draft length otherwise)
    monkeypatch.setattr(hf_assistant.generation_config, "num_assistant_tokens", k)
    monkeypatch.setattr(hf_assistant.generation_config, "num_assistant_tokens_schedule", "constant")
    L = inputs["input_ids"].shape[1]
    threads = torch.get_num_threads()
    # Its many small steps: on a busy 2-core machine two torch threads took seconds where one takes a tenth.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=hf_assistant,
                              eos_token_id=None, pad_token_id=0)
    finally:
        torch.set_num_threads(threads)
    return out[0, L:].tolist(), kept[1:]


def run_rounds(model, inputs: dict, **kw) -> tuple[list[int], Any, list[int]]:
    """``generate_step(model, inputs, **kw)`` run to the end: its tokens, the loop, and (with a fixed
    ``draft_tokens``) the drafts kept in each round."""
    from mlx_gemma4.generation import generate_step

    loop = generate_step(model, inputs, **kw)
    kept: list[int] = []
    if kw.get("draft_tokens") is not None:   # (the automatic policy is shared across calls: left alone)
        record = loop.lengths.record
        loop.lengths.record = lambda k, m, s: (kept.append(m), record(k, m, s))
    return [t for t, _ in loop], loop, kept


def foreground_signals() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: Ctrl+C's default, as a terminal's foreground
    process has it (a shell starts background jobs, and so everything they start, with SIGINT ignored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
