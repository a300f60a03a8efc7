"""Both implementations' converted checkpoints of a size, made from generated weights: no Hugging Face checkpoint on
disk (e2e.py --direct).

The weights are those ``tests/random_checkpoint.py`` would write for the size (``write(..., repeat_noise=True)``,
seed 0, bfloat16), made on demand by ``generated_tensors``; only config.json and the tokenizer files are written
(a few MB, ``hf-SIZE-settings``). Then:

- ours: ``mlx_gemma4.conversion.convert`` on that folder with the generated tensors handed in as its sources: the
  same code and the same files as ``convert.py`` on the written checkpoint.
- mlx-lm: what ``mlx_lm.convert -q`` does, with mlx-lm's own functions: its loader builds its model class from the
  folder's config.json (``load_model``, no weights), its ``sanitize`` maps the same generated tensors (lazy arrays,
  not its random init) onto it, the dtype rule of its converter applies, then its ``quantize_model`` and ``save``
  (which evaluates and writes one shard at a time). ``mlx_lm.load`` reads the result as any ``mlx_lm.convert``
  output.

Nothing is whole in host memory: ours streams row chunks, mlx-lm's save evaluates a shard (<= 5 GB of output) at
a time. The disk holds the two outputs and the settings folder.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tests import random_checkpoint as rc

IMPLS = ("ours", "mlx-lm")


def write_ours(settings: Path, tensors: dict, dst: Path, bits: int, group: int) -> Path:
    """convert.py's output for the checkpoint whose weights are ``tensors`` and whose other files are in
    ``settings``."""
    from mlx_gemma4.conversion import convert

    t0, shown = time.perf_counter(), set()

    def progress(done: int, total: int, name: str) -> None:
        tenth = 10 * done // total
        if tenth not in shown:
            shown.add(tenth)
            print(f"#   ours: {done}/{total} tensors ({name}), {time.perf_counter() - t0:.0f} s", flush=True)

    return convert(settings, dst, q_bits=bits or None, q_group_size=group, progress=progress, tensors=tensors)


def write_mlx_lm(settings: Path, tensors: dict, dst: Path, bits: int, group: int) -> Path:
    """``mlx_lm.convert [-q]``'s output for the same checkpoint, through mlx-lm's own loader, sanitize, quantize and
    save functions."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.utils import load_model, load_tokenizer, quantize_model, save

    step = _Steps("mlx-lm")
    model, config = load_model(settings, lazy=True, strict=False)   # its class for config.json; no weight files
    tokenizer = load_tokenizer(settings, eos_token_ids=config.get("eos_token_id"))
    weights = model.sanitize({k: t.array() for k, t in tensors.items()})
    model.load_weights(list(weights.items()))   # strict: every parameter, at its shape
    del weights
    step("model built from generated weights (lazy)")
    # mlx_lm.convert's dtype rule: the config's torch_dtype, else text_config's dtype; cast only when one is named.
    dtype = config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    if dtype in ("float16", "bfloat16", "float32"):
        keep = getattr(model, "cast_predicate", lambda _: True)
        cast = lambda k, v: v.astype(getattr(mx, dtype)) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v  # noqa: E731
        model.update(tree_map_with_path(cast, model.parameters()))
    if bits:
        model, config = quantize_model(model, config, group, bits)
        step(f"quantized to {bits} bits, group {group} (lazy)")
    n = len(tree_flatten(model.parameters()))
    save(dst, settings, model, tokenizer, config)
    step(f"saved {n} tensors")
    return dst


class _Steps:
    def __init__(self, name: str):
        self.name, self.t0 = name, time.perf_counter()

    def __call__(self, what: str) -> None:
        print(f"#   {self.name}: {what}, {time.perf_counter() - self.t0:.0f} s", flush=True)


WRITERS = {"ours": write_ours, "mlx-lm": write_mlx_lm}


def convert_all(size: str, work: Path, impls: list[str], bits: int, group: int) -> dict[str, Path]:
    """Each implementation's checkpoint of ``size`` under ``work`` (one already there is reused)."""
    text, vision, audio = rc.SIZES[size]
    settings = work / f"hf-{size}-settings"
    if not (settings / "config.json").exists():
        rc.write_settings(settings, text, "bfloat16", vision, audio, tokenizer=True)
    tensors = rc.generated_tensors(text, "bfloat16", vision_config=vision, audio_config=audio)
    print(f"# {size}: {len(tensors)} generated tensors, {sum(t.nbytes for t in tensors.values()) / 1e9:.1f} GB "
          "in bfloat16 (not written)", flush=True)
    out = {}
    for impl in impls:
        dst = work / (f"{size}-direct-{impl}-{bits}bit" if bits else f"{size}-direct-{impl}-bf16")
        if not (dst / "config.json").exists():
            shutil.rmtree(dst, ignore_errors=True)
            t0 = time.perf_counter()
            WRITERS[impl](settings, tensors, dst, bits, group)
            gb = sum(f.stat().st_size for f in dst.iterdir()) / 1e9
            print(f"# {impl} written directly in {time.perf_counter() - t0:.0f} s ({gb:.2f} GB)", flush=True)
        out[impl] = dst
    return out
