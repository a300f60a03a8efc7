"""`gemma4-chat` / `python -m app`: parse the command line, pick the model, run the app."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .model_source import DEFAULT_NAME, ModelNotFound, drafter_dir, load_fn, resolve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gemma4-chat", description="Chat with Gemma 4 in the terminal.")
    p.add_argument("--model", help=f"converted model directory, the name of one found before, or a hub id "
                                   f"(default: {DEFAULT_NAME} wherever it was converted)")
    p.add_argument("--demo", action="store_true", help="tiny random-weight model built in memory; output is random")
    p.add_argument("--resume", nargs="?", const=True, type=int, metavar="ID",
                   help="resume the last conversation (or the one with this id)")
    p.add_argument("--data-dir", help="where models, settings, history and recordings live (default: the user "
                                      "data directory, or $GEMMA4_CHAT_HOME)")
    # No defaults here: what is not given comes from the saved settings.
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--thinking", action="store_true", default=None, help="start with thinking on")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--assistant", default=None, metavar="DIR",
                   help="a converted assistant drafter (convert.py --hf-path google/gemma-4-e2b-it-assistant): "
                        "answers decode speculatively, with the same text; saved as a setting ('' turns it off)")
    args = p.parse_args(argv)
    from .screens.settings import FIELDS, allowed, fits  # the ranges the settings screen accepts

    for key, *_ in FIELDS:
        value = getattr(args, key, None)
        if value is not None and not fits(key, value):
            p.error(f"--{key.replace('_', '-')} must be {allowed(key)}; got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .history import HistoryError, data_dir

    try:
        data = data_dir(args.data_dir)
    except HistoryError as e:
        print(f"gemma4-chat: {e}", file=sys.stderr)
        return 2
    try:
        choice = resolve(args.model, args.demo, data)
    except ModelNotFound as e:
        print(f"gemma4-chat: {e}", file=sys.stderr)
        return 2

    from .app import ChatApp
    from .backend import Backend
    from .history import History
    from .settings_store import SettingsStore

    # Demo conversations (random text) are kept apart from real ones.
    history = History(data / "demo" if choice.kind == "demo" else data)
    try:
        handler: logging.Handler = logging.FileHandler(data / "gemma4-chat.log")
    except OSError:  # a read-only data folder: the app says so itself and runs without a log file
        handler = logging.NullHandler()
    logging.basicConfig(level=logging.INFO, handlers=[handler],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = SettingsStore(data)
    given = {"system_prompt": args.system, "enable_thinking": args.thinking, "max_tokens": args.max_tokens,
             "temperature": args.temperature}
    if args.assistant is not None:
        given["assistant"], problem = drafter_dir(args.assistant)
        if problem:  # refused before it is saved: a wrong path kept as a setting would fail every later start
            print(f"gemma4-chat: --assistant {args.assistant}: {problem}. Pass the folder convert.py wrote for the "
                  "drafter, or --assistant '' to turn it off.", file=sys.stderr)
            return 2
    # The command line's settings hold for this run only; but --assistant DIR is kept for the next runs once the
    # model has loaded with it (it fits), and --assistant '' turns the drafter off for good at once.
    one_run = {k: v for k, v in given.items() if v is not None}
    stored = store.load()
    settings = dataclasses.replace(stored, **one_run)
    if args.assistant == "":
        del one_run["assistant"]
        store.save(dataclasses.replace(stored, assistant=""))
    backend = Backend(choice.name, load_fn(choice, data), demo=choice.kind == "demo", settings=settings)
    lenient_terminal_input()
    app = ChatApp(backend, history, resume=args.resume, offer_download=choice.kind == "download",
                  settings_store=store, one_run=one_run)
    app.run()
    history.close()
    return app.return_code or 0   # (a crash ended with exit code 0)


def lenient_terminal_input() -> None:
    """Bytes from the terminal that are not UTF-8 (a binary paste, a cut multi-byte character, a terminal in
    another locale) become U+FFFD instead of ending the app: Textual decodes its input strictly, and a
    UnicodeDecodeError in its input thread closed the app and lost the unsent prompt (Textualize/textual#6456)."""
    import codecs
    import functools

    try:
        from textual.drivers import linux_driver
    except ImportError:   # (Windows: another driver)
        return
    linux_driver.getincrementaldecoder = lambda encoding: functools.partial(
        codecs.getincrementaldecoder(encoding), errors="replace")


if __name__ == "__main__":
    sys.exit(main())
