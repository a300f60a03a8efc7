"""Convert a Hugging Face Gemma 4 checkpoint to MLX, optionally quantized.

    python convert.py --q-bits 4                      # google/gemma-4-E4B-it -> models/gemma-4-E4B-it-4bit
    python convert.py --hf-path DIR_OR_REPO --mlx-path DST [--q-bits N] [--q-group-size G] [--dtype D] [--force]
    python convert.py --hf-path google/gemma-4-e2b-it-assistant --q-bits 4   # an assistant drafter, the same way

docs/QUANTIZATION.md says what each setting quantizes and what it costs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from mlx_gemma4.errors import Gemma4Error


def _size(s: str) -> int:
    """'500MB', '5GB', '1024' (bytes); at least one byte."""
    s = s.strip().upper()
    for unit, mult in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024), ("B", 1)):
        if s.endswith(unit):
            n = int(float(s[: -len(unit)]) * mult)
            break
    else:
        n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size of at least one byte (e.g. 5GB, 500MB)")
    return n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Convert a Gemma 4 checkpoint to MLX (safetensors), optionally quantized.")
    p.add_argument("--hf-path", default="google/gemma-4-E4B-it",
                   help="local HF checkpoint dir or hub repo id (default google/gemma-4-E4B-it)")
    p.add_argument("--mlx-path", default=None,
                   help="output dir (default models/<name>-<bits>bit, or models/<name>-<dtype> unquantized)")
    p.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=None,
                   help="quantize the bulk of the weights to this many bits (default: no quantization)")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=None,
                   help="quantization group size (default 64)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of everything left unquantized, scales included (default bfloat16)")
    p.add_argument("--ple-bits", type=int, choices=[0, 4, 8], default=None,
                   help="bits of the per-layer embedding table when quantizing (default 8; 0: keep it in --dtype)")
    p.add_argument("--tower-bits", type=int, choices=[0, 4, 8], default=None,
                   help="bits of the vision/audio encoder layers when quantizing (default 8; 0: keep them in "
                        "--dtype)")
    p.add_argument("--force", action="store_true",
                   help="replace --mlx-path when it holds an earlier output of this converter (nothing else)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help=argparse.SUPPRESS)
    p.add_argument("--weights-only", action="store_true",
                   help="convert a local checkpoint that has no tokenizer files (load() needs them: copy "
                        "tokenizer.json in later; load_model() does not)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, other libraries' too")
    args = p.parse_args(argv)
    unused = [f for f, v in (("--q-group-size", args.q_group_size), ("--ple-bits", args.ple_bits),
                             ("--tower-bits", args.tower_bits)) if v is not None]
    if args.q_bits is None and unused:   # (a whole conversion to an output that ignores them: refused now)
        p.error(f"{' and '.join(unused)} only matter{'' if len(unused) > 1 else 's'} when quantizing: add --q-bits N "
                f"(e.g. --q-bits 4), or leave {'them' if len(unused) > 1 else 'it'} out for an unquantized output "
                f"in --dtype.")
    return args


class Stopped(KeyboardInterrupt):
    """A termination signal, raised where the conversion is so that its temp dir is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Ctrl+C, kill, a closed terminal.
SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def _stop(signum: int, frame) -> None:
    for s in SIGNALS:   # a second signal must not cut the clean-up short (restored as main() ends)
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def main(argv=None) -> int:
    import threading

    log = logging.getLogger("convert")
    bar = None
    previous = {}
    caught: list[int] = []
    if threading.current_thread() is threading.main_thread():
        # While MLX is imported a signal is only noted (raised inside its extension's start-up it became an
        # ImportError traceback, or an abort); a signal the shell has us ignore (nohup's SIGHUP) stays ignored.
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}
        for s in previous:
            signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        args = parse_args(argv)
        # Our own lines at INFO; other libraries' only from WARNING (torch, when transformers loads it, prints its
        # cache statistics at INFO on exit: after the one line a stopped conversion promises), all with --verbose.
        ours = logging.DEBUG if args.verbose else logging.INFO
        logging.basicConfig(level=min(ours, logging.WARNING) if args.verbose else logging.WARNING,
                            format="%(levelname)s %(message)s")
        for name in ("convert", "mlx_gemma4"):
            logging.getLogger(name).setLevel(ours)
        from tqdm import tqdm

        from mlx_gemma4.conversion import convert, missing_tokenizer

        for s in previous:
            signal.signal(s, _stop)
        if caught:
            raise Stopped(caught[0])

        missing = missing_tokenizer(args.hf_path)
        if missing and not args.weights_only:   # known now: a whole conversion would end in a model load() refuses
            log.error("%s has no tokenizer files (tokenizer.json or tokenizer.model): load() would refuse the "
                      "converted model. Copy them from the model's hub page into %s, or pass --weights-only to "
                      "convert the weights alone.", missing, missing)
            return 2

        def progress(done: int, total: int, name: str) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, unit="tensor", desc="Converting")
            bar.set_postfix_str(name[-40:], refresh=False)
            bar.update(done - bar.n)
            if done >= total:  # drawn whole before the converter logs what it wrote
                bar.close()

        try:
            dst = convert(args.hf_path, args.mlx_path, q_bits=args.q_bits, q_group_size=args.q_group_size or 64,
                          dtype=args.dtype, force=args.force, ple_bits=args.ple_bits,
                          tower_bits=args.tower_bits,
                          max_shard_bytes=args.max_shard_size, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        name = "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"Interrupted ({name}): conversion stopped, no partial output left behind.", file=sys.stderr)
        return 128 + signum
    except Gemma4Error as e:
        log.error("%s", e)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("Done: %s", dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
