"""The HTTP side: OpenAI-compatible endpoints over an :class:`~jneox.serve.scheduler.Engine`, SSE
streaming, the chat page, and OpenAI-shaped errors for everything that goes wrong."""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError, GenerationRequest, parse_chat, parse_completion, parse_json
from .scheduler import Engine, Event, QueueFull

STATIC = Path(__file__).with_name("static")
RETRY_AFTER_S = 1


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Listener:
    """Carries one request's events from the engine thread into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self):
        while True:
            event = await self.queue.get()
            yield event
            if event.final:
                return


def create_app(engine: Engine, model_id: str = "jneox", api_key: str | None = None) -> FastAPI:
    """The server's app. ``engine`` must be started (``engine.start()``) before requests arrive."""
    app = FastAPI(title="jneox", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    window = engine.window
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):  # a bug: say so in the same shape, keep serving
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'" if given else
                           "this server needs an API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        check_key(request)
        return parse_json(await request.body())

    def submit(req: GenerationRequest, listener: Listener):
        try:
            return engine.submit(req.prompt_ids, req.params, listener)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry in a moment", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def run(request: Request, req: GenerationRequest, chunk, final, opening: bool = False):
        """Submit ``req`` and answer: SSE chunks made by ``chunk(id, text, finish_reason)`` (and first an
        opening one if ``opening``), or one JSON body made by ``final(id, text, finish_reason, usage)``."""
        listener = Listener(asyncio.get_running_loop())
        seq = submit(req, listener)
        rid = uuid.uuid4().hex[:24]

        if not req.stream:
            texts = []
            try:
                async for event in _until_disconnect(request, listener.events()):
                    texts.append(event.text)
                    if event.error:
                        raise APIError(500, event.error, type="server_error")
                    if event.final:
                        return JSONResponse(final(rid, "".join(texts), event.finish_reason, _usage(event)))
            finally:
                engine.cancel(seq)  # no-op once finished; frees the slot if the client left
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this

        async def sse():
            try:
                if opening:
                    yield _sse(chunk(rid, None, None, first=True))
                async for event in listener.events():
                    if event.error:
                        yield _sse(APIError(500, event.error, type="server_error").body())
                        break
                    if event.text:
                        yield _sse(chunk(rid, event.text, None))
                    if event.finish_reason:
                        yield _sse(chunk(rid, None, event.finish_reason))
                        if req.include_usage:
                            yield _sse({**chunk(rid, None, None), "choices": [], "usage": _usage(event)})
                yield "data: [DONE]\n\n"
            finally:  # normal end, or the client disconnected and the stream was cancelled
                engine.cancel(seq)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat(await read_body(request), tokenizer, window)

        def chunk(rid, text, finish, first=False):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model_id, "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def final(rid, text, finish, usage):
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                    "model": model_id, "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": finish}], "usage": usage}

        return await run(request, req, chunk, final, opening=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion(await read_body(request), tokenizer, window)

        def chunk(rid, text, finish):
            return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model_id,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        def final(rid, text, finish, usage):
            return {**chunk(rid, text, finish), "usage": usage}

        return await run(request, req, chunk, final)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "jneox",
                                            "context_window": window}]}

    @app.get("/health")
    async def health():
        alive = engine.thread is not None and engine.thread.is_alive()
        body = {"status": "ok" if alive else "engine stopped", "model": model_id, **engine.stats()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    return app


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _until_disconnect(request: Request, events, poll_s: float = 0.5):
    """``events`` until the final one, or until the client disconnects (then stop early)."""
    it = events.__aiter__()
    while True:
        nxt = asyncio.ensure_future(it.__anext__())
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=poll_s)
            if done:
                break
            if await request.is_disconnected():
                nxt.cancel()
                return
        try:
            event = nxt.result()
        except StopAsyncIteration:
            return
        yield event
