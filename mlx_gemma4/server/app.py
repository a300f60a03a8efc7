"""The OpenAI-compatible HTTP app (Starlette): ``GET /v1/models``, ``POST /v1/chat/completions``, ``GET /health``.

``create_app`` takes an ``Engine`` (the model's thread) so a program that already holds a model, or a test, can
serve it in-process with any ASGI server; ``mlx_gemma4.server.cli`` is the command line around it.

A request is checked and its media decoded before it joins the engine's line; errors found then, and errors the
model thread finds before the first token (an image that does not decode, a conversation over the context), come
back as 4xx JSON errors in OpenAI's shape, for streamed requests too. The response says how many requests were
ahead (``X-Requests-Ahead`` header, ``timings.requests_ahead``) and how long it waited (``timings.queued_ms``); a
full line gives 503 at once. A client that goes away cancels its job, waiting or generating.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ContextLengthError, InputError
from . import responses as out
from .engine import Done, Engine, Job, Piece
from .body import Limits, RequestError, parse_body
from .messages import MediaStore, name_saved_media
from .requests import ChatRequest, parse_chat

log = logging.getLogger(__name__)


def create_app(engine: Engine, *, model_id: str, limits: Limits | None = None, api_key: str | None = None,
               media_dir: str | Path | None = None, default_thinking: bool = False,
               cors_origins: Sequence[str] = ()) -> Starlette:
    """The ASGI app serving ``engine``'s model as ``model_id``.

    ``api_key``: when set, every ``/v1`` request must carry ``Authorization: Bearer <api_key>``. ``media_dir``:
    where decoded images and audio are kept for the app's lifetime (a temporary folder, removed at shutdown, when
    None). ``default_thinking``: whether the model thinks when a request does not say (``reasoning_effort`` or
    ``chat_template_kwargs.enable_thinking``). ``cors_origins``: the web pages (``http://localhost:3000``, or
    ``*`` for any) whose scripts may call the API from a browser; none by default.
    """
    limits = limits or Limits()
    temp = tempfile.TemporaryDirectory(prefix="gemma4-serve-") if media_dir is None else None
    # Every request in the line (the running one and max_waiting behind it) may hold a body's worth of media.
    keep = max(2**30, 2 * (engine.max_waiting + 2) * limits.max_request_bytes)
    media = MediaStore(Path(temp.name if temp else media_dir), keep_bytes=keep)
    created = int(time.time())

    def authorize(request: Request) -> None:
        if not api_key:  # an empty key (GEMMA4_API_KEY= exported empty) is no key, as the command line reads it
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        # The scheme's case is free (RFC 9110: "bearer" is "Bearer"), and so is the space around the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise RequestError("Missing or wrong API key: send 'Authorization: Bearer <key>' with the key the server "
                               "was started with.", status=401, code="invalid_api_key")   # OpenAI's type and code

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-gemma4"}

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok" if engine.ready else "loading", "model": model_id,
                             "pending": engine.pending}, status_code=200 if engine.ready else 503)

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        if not request.path_params["name"]:  # GET /v1/models/ (a base URL that ends in a slash) is the list
            return await models(request)
        authorize(request)
        if request.path_params["name"] != model_id:
            raise RequestError(f"No model {request.path_params['name']!r} here; this server serves {model_id!r}.",
                               status=404, code="model_not_found")
        return JSONResponse(model_card())

    async def chat(request: Request) -> Response:
        authorize(request)
        body = parse_body(await _read_body(request, limits.max_request_bytes), request.headers.get("content-type"))
        req = await run_in_threadpool(parse_chat, body, model_id=model_id, limits=limits, media=media,
                                      default_thinking=default_thinking)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Piece | Done] = asyncio.Queue()

        def emit(event: Piece | Done) -> None:  # called on the model thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
                pass

        job = Job(req.messages, req.options, emit, enable_thinking=req.enable_thinking, tools=req.tools, n=req.n)
        engine.submit(job)
        reply = _Reply(job, req, model_id)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            if req.stream:
                first = await _next(events, watcher)  # so an error before the first token is still a 4xx
                if first is None:
                    job.cancel.set()
                    return Response(status_code=499)
                if isinstance(first, Done) and first.error is not None:
                    raise name_saved_media(first.error, req, media)
                watcher.cancel()  # from here StreamingResponse watches the connection itself
                # The background task also runs when the client leaves before the stream's first chunk was asked
                # for (the generator's own cleanup would never run then).
                return StreamingResponse(reply.sse(first, events), media_type="text/event-stream",
                                         headers=reply.headers(), background=BackgroundTask(job.cancel.set))
            while True:
                event = await _next(events, watcher)
                if event is None:  # the client went away: free the model for the next request
                    job.cancel.set()
                    return Response(status_code=499)
                if isinstance(event, Done):
                    if event.error is not None:
                        raise name_saved_media(event.error, req, media)
                    return JSONResponse(reply.completion(), headers=reply.headers())
                reply.take(event)
        except BaseException:
            job.cancel.set()
            raise
        finally:
            watcher.cancel()

    def with_errors(handler):
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestError as e:
                # A busy or stopping server: clients that honour Retry-After (the openai client does) try again.
                headers = {"Retry-After": "1"} if e.status == 503 else None
                return JSONResponse(e.body(), status_code=e.status, headers=headers)
            except ContextLengthError as e:
                return JSONResponse(RequestError(str(e), param="messages", code="context_length_exceeded").body(),
                                    status_code=400)
            except InputError as e:
                return JSONResponse(RequestError(str(e), param="messages").body(), status_code=400)
            except ClientDisconnect:   # gone while sending its body: nobody to answer, nothing failed here
                log.info("%s %s: the client left before its request was read", request.method, request.url.path)
                return Response(status_code=499)
            except Exception as e:  # the model failed: the client gets JSON too; the traceback goes to the log
                log.exception("request failed")
                return JSONResponse(RequestError(f"The server failed to answer ({type(e).__name__}: {e}); see its "
                                                 "log.", status=500, kind="server_error").body(), status_code=500)
        return wrapped

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        hint = " An OPTIONS request is a browser's cross-origin check: start the server with --cors-origin " \
               "for the page's origin." if request.method == "OPTIONS" and not cors_origins else ""
        return JSONResponse(RequestError(f"{exc.detail}: {request.method} {request.url.path}. This server offers "
                                         f"GET /v1/models and POST /v1/chat/completions.{hint}", status=exc.status_code,
                                         code="not_found" if exc.status_code == 404 else None).body(),
                            status_code=exc.status_code)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if temp is not None:
            temp.cleanup()

    routes = [Route("/health", health), Route("/v1/models", with_errors(models)),
              Route("/v1/models/{name:path}", with_errors(model)),
              Route("/v1/chat/completions", with_errors(chat), methods=["POST"])]
    # Any request header: the openai package for JavaScript adds its own (x-stainless-*) to every request.
    cors = [Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["*"], expose_headers=["X-Requests-Ahead"])] if cors_origins else []
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan,
                     middleware=cors)


class _Reply:
    """One request's answer as it is built: per choice the text split into deltas and the last stats; the ids."""

    def __init__(self, job: Job, req: ChatRequest, model_id: str) -> None:
        self.job, self.req, self.model_id = job, req, model_id
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        callable_tools = frozenset(t["function"]["name"] for t in req.tools or ()) \
            if req.options.get("tool_choice") != "none" else frozenset()
        self.answers = [out.Answer(req.stop, one_call=not req.parallel_tool_calls, callable_tools=callable_tools)
                        for _ in range(job.n)]
        self.deltas: list[list[dict[str, Any]]] = [[] for _ in range(job.n)]
        self.last: list[Any] = [None] * job.n
        self.cached = 0                     # the first choice's: the later ones find the whole prompt cached

    def headers(self) -> dict[str, str]:
        return {"X-Requests-Ahead": str(self.job.ahead)}

    def take(self, piece: Piece) -> list[dict[str, Any]]:
        """The deltas of one streamed response of choice ``piece.index`` (a stop string found in it, or the one
        tool call allowed, ends that choice)."""
        i, r = piece.index, piece.response
        if self.answers[i].stopped:
            # Tokens the model thread made before it saw the stop: not the answer's, and not counted (usage
            # counted one more or one less as threads raced: streamed and not, the same answer differed).
            return []
        if self.last[i] is None and i == 0:
            self.cached = piece.cached_tokens
        self.last[i] = r
        deltas = self.answers[i].feed(r)
        if self.answers[i].stopped:
            self.job.ended[i].set()
        self.deltas[i] += deltas
        return deltas

    def _stats(self) -> dict[str, Any]:
        job = self.job
        now = time.perf_counter()
        started = job.started_at or now
        usage = out.usage(self.last[0], self.cached)
        usage["completion_tokens"] = sum(out.usage(last, 0)["completion_tokens"] for last in self.last)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"usage": usage,
                "timings": out.timings(self.last[0], started - job.queued_at, (job.finished_at or now) - started,
                                       job.ahead)}

    def _finish(self, i: int) -> str:
        return out.finish_reason(self.answers[i], self.last[i])

    def completion(self) -> dict[str, Any]:
        choices = [{"index": i, "message": out.message(self.deltas[i]), "finish_reason": self._finish(i)}
                   for i in range(self.job.n)]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": choices, **self._stats()}

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, index: int = 0, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def sse(self, first: Piece | Done, events: asyncio.Queue) -> AsyncIterator[str]:
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            event, at = first, 0            # at: the choice being streamed
            while isinstance(event, Piece):
                while event.index > at:     # the choice before is complete: its last chunk, the next one's first
                    yield self._chunk({}, self._finish(at), index=at)
                    at += 1
                    yield self._chunk({"role": "assistant", "content": ""}, index=at)
                for delta in self.take(event):
                    yield self._chunk(delta, index=at)
                event = await events.get()
            if event.error is not None:  # failed after the first token: the status line is long gone
                err = event.error
                body = err.body() if isinstance(err, RequestError) else \
                    {"error": {"message": str(err), "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(body)}\n\n"
                return
            stats = self._stats()
            for i in range(at, self.job.n):  # a choice that gave no piece (none does now) still ends
                if i > at:
                    yield self._chunk({"role": "assistant", "content": ""}, index=i)
                yield self._chunk({}, self._finish(i), index=i, timings=stats["timings"])
            if self.req.include_usage:
                yield self._chunk(None, usage=stats["usage"], timings=stats["timings"])
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancel.set()  # a client that went away mid-stream frees the model


async def _read_body(request: Request, cap: int) -> bytes:
    too_big = RequestError(f"The request body is over this server's limit of {cap / 2**20:g} MiB; send smaller "
                           "or fewer media (or start the server with a higher --max-request-mb).", status=413,
                           code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(events: asyncio.Queue, watcher: asyncio.Future) -> Piece | Done | None:
    """The job's next event, or None if the client disconnects first."""
    get = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    return None
