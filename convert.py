"""Convert a Hugging Face Gemma 4 checkpoint to MLX, optionally quantized.

    python convert.py --q-bits 4                      # google/gemma-4-E4B-it -> models/gemma-4-E4B-it-4bit
    python convert.py --hf-path DIR_OR_REPO --mlx-path DST [--q-bits N] [--q-group-size G] [--dtype D] [--force]

docs/QUANTIZATION.md says what each setting quantizes and what it costs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlx_gemma4.errors import Gemma4Error


def _size(s: str) -> int:
    """'500MB', '5GB', '1024' (bytes)."""
    s = s.strip().upper()
    for unit, mult in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Convert a Gemma 4 checkpoint to MLX (safetensors), optionally quantized.")
    p.add_argument("--hf-path", default="google/gemma-4-E4B-it", help="local HF checkpoint dir or hub repo id")
    p.add_argument("--mlx-path", default=None, help="output dir (default models/<name>-<bits>bit)")
    p.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=None,
                   help="quantize the bulk of the weights to this many bits (default: no quantization)")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of everything left unquantized, scales included")
    p.add_argument("--ple-bits", type=int, choices=[0, 4, 8], default=8,
                   help="bits of the per-layer embedding table when quantizing (0: keep it in --dtype)")
    p.add_argument("--tower-bits", type=int, choices=[0, 4, 8], default=8,
                   help="bits of the vision/audio encoder layers when quantizing (0: keep them in --dtype)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --mlx-path")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from tqdm import tqdm

    from mlx_gemma4.conversion import convert

    bar = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="tensor", desc="Converting")
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.update(done - bar.n)

    try:
        dst = convert(args.hf_path, args.mlx_path, q_bits=args.q_bits, q_group_size=args.q_group_size,
                      dtype=args.dtype, force=args.force, ple_bits=args.ple_bits, tower_bits=args.tower_bits,
                      max_shard_bytes=args.max_shard_size, progress=progress)
    except Gemma4Error as e:
        if bar is not None:
            bar.close()
        logging.getLogger("convert").error("%s", e)
        return 2
    if bar is not None:
        bar.close()
    logging.getLogger("convert").info("Done: %s", dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
