"""`gemma4-chat` / `python -m app`: parse the command line, pick the model, run the app."""

from __future__ import annotations

import argparse
import logging
import sys

from .model_source import ModelNotFound, load_fn, resolve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gemma4-chat", description="Chat with Gemma 4 in the terminal.")
    p.add_argument("--model", help="converted model directory or hub id (default: models/gemma-4-E4B-it-4bit)")
    p.add_argument("--demo", action="store_true", help="tiny random-weight model built in memory; output is random")
    p.add_argument("--resume", nargs="?", const=True, type=int, metavar="ID",
                   help="resume the last conversation (or the one with this id)")
    p.add_argument("--data-dir", help="where history and recordings live (default: the user data directory, "
                                      "or $GEMMA4_CHAT_HOME)")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--thinking", action="store_true", help="start with thinking on")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        choice = resolve(args.model, args.demo)
    except ModelNotFound as e:
        print(f"gemma4-chat: {e}", file=sys.stderr)
        return 2

    from .app import ChatApp
    from .backend import Backend, Settings
    from .history import History

    history = History(args.data_dir)
    logging.basicConfig(filename=history.dir / "gemma4-chat.log", level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings(system_prompt=args.system, enable_thinking=args.thinking, max_tokens=args.max_tokens,
                        temperature=args.temperature)
    backend = Backend(choice.name, load_fn(choice), demo=choice.kind == "demo", settings=settings)
    ChatApp(backend, history, resume=args.resume, offer_download=choice.kind == "download").run()
    history.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
