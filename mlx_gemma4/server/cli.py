"""``gemma4-serve`` / ``python -m mlx_gemma4.server``: load one model and serve it over HTTP (OpenAI's API)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import math
import os
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from .body import Limits

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("gemma4-serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gemma4-serve", description="Serve a converted Gemma 4 model with an "
                                "OpenAI-compatible API (/v1/chat/completions, /v1/models).")
    p.add_argument("--model", required=True, help="converted model directory (or a hub id)")
    p.add_argument("--model-id", help="the name clients use in 'model' (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--api-key", default=os.environ.get("GEMMA4_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $GEMMA4_API_KEY, else no key)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="most tokens one answer may generate, and what a request without max_tokens gets "
                        "(default 4096)")
    p.add_argument("--max-request-mb", type=float, default=32.0,
                   help="largest request body in MiB, media included (default 32)")
    p.add_argument("--max-waiting", type=int, default=16,
                   help="requests that may wait behind the one generating; more get 503 at once (default 16)")
    p.add_argument("--allow-paths", action=argparse.BooleanOptionalAction, default=None,
                   help="accept media as file paths on this machine (default: only when bound to localhost)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let scripts of web pages from ORIGIN (e.g. http://localhost:3000; '*': any page, then "
                        "use --api-key) call the API from a browser; repeatable. Default: none")
    p.add_argument("--thinking", action="store_true", help="think before answering unless a request says not to")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens computed per pass (default 2048; smaller lowers the peak memory of long "
                        "prompts, at some speed)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="what the server logs (default info)")
    args = p.parse_args(argv)
    for name, lo, hi in (("port", 0, 65535), ("max_tokens", 1, None), ("max_waiting", 0, None),
                         ("prefill_chunk", 1, None)):
        value = getattr(args, name)
        if value < lo or (hi is not None and value > hi):
            p.error(f"--{name.replace('_', '-')} must be a whole number " + (f">= {lo}" if hi is None else
                                                                              f"from {lo} to {hi}") + f"; got {value}")
    if not (math.isfinite(args.max_request_mb) and args.max_request_mb > 0):
        p.error(f"--max-request-mb must be a finite number of MiB above 0 (e.g. 32); got {args.max_request_mb}")
    return args


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_problem(host: str, port: int) -> tuple[str, int] | None:
    """Why the server could not listen on ``host``:``port`` (and the exit code), checked before the model loads
    (minutes, for a large one) rather than after; None when it can."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"--host {host}: {e.strerror or e}. Give an address of this machine (127.0.0.1, 0.0.0.0).", 2
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use (another server?); stop it or pick another with "
                        "--port.", 3)
            return f"cannot listen on {host}:{port}: {e.strerror or e}.", 3
    return None


def limits(args: argparse.Namespace) -> Limits:
    """What a request may ask for; media paths only on a server bound to this machine, unless said otherwise."""
    allow = _is_loopback(args.host) if args.allow_paths is None else args.allow_paths
    return Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_tokens=args.max_tokens, allow_paths=allow)


class Server(uvicorn.Server):
    """uvicorn's server, which also stops ``engine`` when told to exit (Ctrl+C, SIGTERM). uvicorn's graceful
    shutdown waits for open responses: a streamed answer ran on to its max_tokens, and every request in line after
    it, before the process could exit (a service manager then killed it). Stopped, the engine ends the answer being
    written at its next token and the waiting ones at once, each with a 503 error the client reads."""

    def __init__(self, config: uvicorn.Config, engine: Engine, model_id: str) -> None:
        super().__init__(config)
        self.engine = engine
        self.model_id = model_id

    async def startup(self, sockets=None) -> None:
        """uvicorn's startup, then one line with the address clients use: the port bound (``--port 0`` asks the
        system for a free one, which the line said was 0)."""
        await super().startup(sockets=sockets)
        if self.started:
            port = next((s.getsockname()[1] for srv in self.servers for s in srv.sockets or ()), self.config.port)
            log.info("Serving %s at http://%s:%d/v1", self.model_id, self.config.host, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.engine.stop()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .. import ChatSession, load
    from ..errors import Gemma4Error
    from .app import create_app
    from .engine import Engine

    problem = address_problem(args.host, args.port)
    if problem is not None:
        print(f"gemma4-serve: {problem[0]}", file=sys.stderr)
        return problem[1]
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("Bound to %s without --api-key: anyone who can reach this port can use the model.", args.host)
    def session() -> ChatSession:
        model, processor = load(args.model)
        return ChatSession(model, processor, prefill_chunk=args.prefill_chunk)

    try:
        engine = Engine(session, max_waiting=args.max_waiting)
        engine.wait_ready()
    except Gemma4Error as e:
        print(f"gemma4-serve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl+C while the model loads on its thread, which cannot be stopped: an ordinary exit with it still
        # working aborted the process ("terminate called without an active exception") after a traceback.
        print("gemma4-serve: interrupted while loading the model.", file=sys.stderr, flush=True)
        os._exit(130)
    model_id = args.model_id or os.path.basename(os.path.normpath(args.model))
    app = create_app(engine, model_id=model_id, limits=limits(args), api_key=args.api_key,
                     default_thinking=args.thinking, cors_origins=args.cors_origin)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level), engine, model_id)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl+C, raised again by uvicorn once it has shut down
        pass
    finally:
        engine.close(timeout=10)
    return 0 if server.started else 3  # 3: could not start (the port is taken), as uvicorn.run says


if __name__ == "__main__":
    raise SystemExit(main())
