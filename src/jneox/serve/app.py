"""The HTTP side: OpenAI-compatible endpoints over an :class:`~jneox.serve.scheduler.Engine`, SSE
streaming, the chat page, and OpenAI-shaped errors for everything that goes wrong."""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError, GenerationRequest, parse_chat, parse_completion, parse_json
from .scheduler import Engine, Event, QueueFull, TokenLogprob
from .tokens import Offsets, chat_logprobs, completion_logprobs, detokenize, tokenize, tokenizer_info

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


@dataclass
class Answer:
    """One prompt's answer, gathered from its events."""

    text: str = ""
    final: Event | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, event: Event) -> None:
        self.text += event.text
        self.logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.final:
            self.final = event


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
            return engine.submit(req.prompt_ids, req.params, listener, logprobs=req.logprobs,
                                 prompt_logprobs=req.echo, generate=req.generate)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry in a moment", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def collect(request: Request, listener: Listener) -> Answer | None:
        """One request's answer, or None if the client left first."""
        answer = Answer()
        async for event in _until_disconnect(request, listener.events()):
            if event.error:
                raise APIError(500, event.error, type="server_error")
            answer.add(event)
            if event.final:
                return answer
        return None

    async def run(request: Request, reqs: list[GenerationRequest], chunk, final, opening: bool = False):
        """Submit ``reqs`` (one per prompt) and answer: for one streamed request SSE chunks made by
        ``chunk(id, text, finish_reason, event=...)`` (and first an opening one ``first=True`` if
        ``opening``), else one JSON body made by ``final(id, answers, usage)``."""
        if len(reqs) > engine.max_batch + engine.max_queue:
            raise APIError(400, f"{len(reqs)} prompts in one request; this server takes at most "
                           f"{engine.max_batch + engine.max_queue} at once", "prompt", "invalid_value")
        seqs, listeners = [], []
        try:
            for req in reqs:
                listeners.append(Listener(asyncio.get_running_loop()))
                seqs.append(submit(req, listeners[-1]))
        except APIError:
            for seq in seqs:
                engine.cancel(seq)
            raise
        rid = uuid.uuid4().hex[:24]

        if not reqs[0].stream:
            try:
                answers = await asyncio.gather(*(collect(request, li) for li in listeners), return_exceptions=True)
            finally:
                for seq in seqs:
                    engine.cancel(seq)  # no-op once finished; frees the slot if the client left
            for a in answers:
                if isinstance(a, BaseException):
                    raise a
            if any(a is None for a in answers):
                return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
            usage = _usage(*(a.final for a in answers))
            return JSONResponse(final(rid, answers, usage))

        req, seq, listener = reqs[0], seqs[0], listeners[0]

        async def sse():
            try:
                if opening:
                    yield _sse(chunk(rid, None, None, first=True))
                async for event in listener.events():
                    if event.error:
                        yield _sse(APIError(500, event.error, type="server_error").body())
                        break
                    if event.text or event.logprobs or event.prompt_logprobs is not None:
                        yield _sse(chunk(rid, event.text, None, event=event))
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

        def logprobs(entries):
            return None if req.logprobs is None else {"content": chat_logprobs(tokenizer, entries)}

        def chunk(rid, text, finish, first=False, event=None):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model_id, "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs(event.logprobs) if event else None,
                                 "finish_reason": finish}]}

        def final(rid, answers, usage):
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                    "model": model_id, "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answers[0].text},
                                 "logprobs": logprobs(answers[0].logprobs), "finish_reason": answers[0].final.finish_reason}],
                    "usage": usage}

        return await run(request, [req], chunk, final, opening=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        reqs = parse_completion(await read_body(request), tokenizer, window)
        echoed = [tokenizer.decode(r.prompt_ids) if r.echo else "" for r in reqs]

        def logprobs(req, prompt_entries, entries, offsets: Offsets):
            """The legacy shape over the prompt's tokens (echo) and then the generated ones."""
            if req.logprobs is None:
                return None
            parts = [completion_logprobs(tokenizer, prompt_entries, Offsets(tokenizer))] if prompt_entries else []
            parts.append(completion_logprobs(tokenizer, entries, offsets))
            return {k: [x for part in parts for x in part[k]] for k in parts[-1]}

        def head(rid, choices):
            return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model_id,
                    "choices": choices}

        offsets = Offsets(tokenizer, len(echoed[0]))  # the stream's generated text so far

        def chunk(rid, text, finish, first=False, event=None):
            prompt = event.prompt_logprobs if event is not None else None
            if first or prompt is not None:  # echo: the prompt comes first
                text = echoed[0] + (text or "")
            lp = logprobs(reqs[0], prompt, event.logprobs, offsets) if event is not None else None
            return head(rid, [{"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}])

        def final(rid, answers, usage):
            return {**head(rid, [{"index": i, "text": echoed[i] + a.text,
                                  "logprobs": logprobs(r, a.prompt_logprobs, a.logprobs, Offsets(tokenizer, len(echoed[i]))),
                                  "finish_reason": a.final.finish_reason}
                                 for i, (r, a) in enumerate(zip(reqs, answers))]), "usage": usage}

        # echo without logprobs: the engine sends no prompt event, so the prompt opens the stream
        return await run(request, reqs, chunk, final, opening=reqs[0].echo and reqs[0].logprobs is None)

    @app.post("/tokenize")
    async def tokenize_(request: Request):
        return tokenize(await read_body(request), tokenizer, window)

    @app.post("/detokenize")
    async def detokenize_(request: Request):
        return detokenize(await read_body(request), tokenizer)

    @app.get("/tokenizer_info")
    async def tokenizer_info_(request: Request):
        check_key(request)
        return tokenizer_info(tokenizer, window)

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


def _usage(*events: Event) -> dict:
    """Token counts from the final events of one request's answers (several prompts: summed)."""
    prompt, completion = sum(e.prompt_tokens for e in events), sum(e.completion_tokens for e in events)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
