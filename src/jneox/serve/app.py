"""The HTTP side: OpenAI-compatible endpoints over an :class:`~jneox.serve.scheduler.Engine`, SSE
streaming, the chat page, and OpenAI-shaped errors for everything that goes wrong."""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from ..adapters import Adapter
from .protocol import (DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, APIError, GenerationRequest, constrained,
                       parse_completion, parse_json, too_large)
from .limits import Limits, Throttled
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .scheduler import Engine, Event, QueueFull, TokenLogprob, Unavailable
from .tools import parse_tool_chat
from .tokens import (EndpointProcess, Offsets, chat_logprobs, completion_logprobs, detokenize, tokenize,
                     tokenizer_info)

STATIC = Path(__file__).with_name("static")
RETRY_AFTER_S = 1
LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::")  # listening on every address of the machine
# tokenizing and building large answers runs off the event loop, on one thread: more would only
# contend for the GIL with the loop and the engine
CPU_THREADS = 1
CPU_QUEUE = 64  # such jobs that may wait for the thread; past that the server answers 429
# the request fields a model's generation config gives defaults for (SamplingParams' names, as requests spell them)
REQUEST_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")
INLINE_BYTES = 16 << 10  # a request body this small is tokenized on the loop: quicker than a hand-over
CLIENT_GONE = 499  # nginx's status for a request whose client left (nobody reads it)
log = logging.getLogger("jneox.serve")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Listener:
    """Carries one request's events from the engine thread into the event loop; past ``timeout``
    seconds (None: no limit) it ends the request with an error event of its own."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float | None = None):
        self.loop, self.queue = loop, asyncio.Queue()
        self.timeout, self.timed_out = timeout, False
        self.deadline = None if timeout is None else loop.time() + timeout

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self):
        while True:
            try:
                if self.deadline is None:
                    event = await self.queue.get()
                else:
                    event = await asyncio.wait_for(self.queue.get(), max(self.deadline - self.loop.time(), 0))
            except asyncio.TimeoutError:
                self.timed_out = True
                yield Event(error=f"the request took longer than {self.timeout:g} s (--request-timeout)")
                return
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


def host_allowed(host_header: str, allowed: frozenset[str]) -> bool:
    """Whether a request's ``Host`` header names this server: a name in ``allowed`` (with any port), or
    any IP address when ``allowed`` holds a wildcard address. A web page that rebinds its own DNS name
    to this machine sends that name, so it is refused (DNS rebinding); an IP address cannot be rebound."""
    if "*" in allowed:
        return True
    name = host_header.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    if name in allowed:
        return True
    if not allowed.intersection(WILDCARD):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Workers:
    """A bounded pool for CPU work (tokenizing, building large answers), so that the event loop keeps
    answering other clients meanwhile, and small jobs never wait behind large ones. Past ``threads +
    queue`` jobs at once, :meth:`run` answers 429."""

    def __init__(self, threads: int = CPU_THREADS, queue: int = CPU_QUEUE):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="jneox-cpu")
        self.limit, self.busy = threads + queue, 0  # busy is touched on the event loop only

    async def run(self, fn, *args, small: bool = False):
        """``fn(*args)`` on the pool, or at once on the loop if ``small``."""
        if small:
            return fn(*args)
        return await self.wait(lambda: self.pool.submit(fn, *args))

    async def wait(self, submit):
        """The result of the future that ``submit()`` starts (on the pool, or elsewhere), counted against
        the same limit."""
        if self.busy >= self.limit:
            raise APIError(429, f"the server is busy: {self.busy} requests are being tokenized; retry in a moment",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.busy += 1
        try:
            return await asyncio.wrap_future(submit())
        finally:
            self.busy -= 1


class HostCheck:
    """ASGI middleware: refuses a request whose Host header is not one of this server's names."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if not host_allowed(host, self.allowed):
                e = APIError(400, f"Host {host[:100]!r} is not a name of this server (start it with --allowed-host "
                             f"NAME to accept it)", code="invalid_host")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, model_id: str = "jneox", api_key: str | None = None, *, host: str = "127.0.0.1",
               allowed_hosts: Iterable[str] = (), cors_origins: Iterable[str] = (),
               request_timeout: float | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               generation_defaults: dict | None = None) -> FastAPI:
    """The server's app. ``engine`` must be started (``engine.start()``) before requests arrive.

    ``host`` is the address the server listens on: requests must name it (or, on a loopback or
    wildcard address, ``localhost`` and the loopback addresses; on a wildcard, any IP address) or one
    of ``allowed_hosts`` (``*``: any) in their Host header. ``cors_origins`` are the web origins whose
    pages may call the API from a browser (none by default). ``request_timeout`` (seconds, None: no
    limit) ends a request that has not finished by then; ``default_max_tokens`` caps an answer whose
    request gives no ``max_tokens``. ``generation_defaults`` (SamplingParams field -> value, from
    :func:`jneox.loading.generation_defaults`) stand in for the sampling fields a request leaves out.
    """
    if model_id in engine.adapters:
        raise ValueError(f"the adapter name {model_id!r} is the base model's id; give the adapter another name")
    app = FastAPI(title="jneox", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    names = {host.strip("[]").lower(), *(h.lower() for h in allowed_hosts)}
    if names.intersection(LOOPBACK + WILDCARD):
        names.update(LOOPBACK)
    cors_origins = list(cors_origins)
    if cors_origins:  # added first, so the Host check below runs before it
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(HostCheck, allowed=frozenset(names))
    window = engine.window
    tokenizer = engine.tokenizer
    created = int(time.time())
    workers = app.state.workers = Workers()
    gone_log = Throttled()
    request_defaults = {k: v for k, v in (generation_defaults or {}).items() if k in REQUEST_SAMPLING_FIELDS}

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request, e: ClientDisconnect):  # not a fault of the server: one line, no traceback
        gone_log.warn("a client disconnected before sending the whole request (%s %s)", request.method,
                      request.url.path)
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):  # a bug: say so in the same shape, keep serving
        # no exception text to the client (paths, internals); starlette re-raises it after this answer, so
        # uvicorn logs the traceback
        return error_response(APIError(500, "internal error (the server log has the details)", type="server_error"))

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
        """The JSON body, read up to MAX_BODY_BYTES: a larger one is refused before it is buffered (by its
        Content-Length, or as soon as a body without one passes the limit)."""
        check_key(request)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":  # a browser's cross-origin "simple" POST cannot send this type
            raise APIError(415, f"Content-Type must be application/json, got {media_type[:100]!r}",
                           code="unsupported_media_type")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise too_large(f"{int(length)} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large(f"more than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        request.state.body_bytes = size
        return parse_json(b"".join(chunks))

    def small(request: Request) -> bool:
        """Whether the request's body (read by read_body) is small enough to tokenize on the loop."""
        return request.state.body_bytes <= INLINE_BYTES

    def pick_adapter(body: dict) -> Adapter | None:
        """The LoRA adapter that the request's ``model`` names (None: the base model). With adapters loaded,
        a name that is neither the base model's id nor an adapter's is a 404 as OpenAI's API answers it;
        without any, every name means the one model, as before adapters existed."""
        name = body.get("model")
        if not engine.adapters or name is None or name == model_id:
            return None
        if isinstance(name, str) and name in engine.adapters:
            return engine.adapters[name]
        raise APIError(404, f"The model `{str(name)[:100]}` does not exist; this server has {model_id} and the "
                       f"adapters {', '.join(engine.adapters)} (GET /v1/models lists them)", "model",
                       "model_not_found")

    def submit(req: GenerationRequest, listener: Listener, adapter: Adapter | None = None):
        try:
            return engine.submit(req.prompt_ids, req.params, listener, logprobs=req.logprobs,
                                 prompt_logprobs=req.echo, generate=req.generate, speculate=req.speculate,
                                 adapter=adapter, constraint=req.constraint, follow_up=req.follow_up)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry in a moment", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except Unavailable as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def collect(listener: Listener) -> Answer:
        """One request's answer."""
        answer = Answer()
        async for event in listener.events():
            if event.error:
                if listener.timed_out:
                    raise APIError(504, event.error, type="server_error", code="timeout")
                raise APIError(500, event.error, type="server_error")
            answer.add(event)
        return answer

    async def run(request: Request, reqs: list[GenerationRequest], chunk, final, opening: bool = False,
                  adapter: Adapter | None = None):
        """Submit ``reqs`` (one per prompt, each with ``adapter``) and answer: for one streamed request SSE
        chunks made by ``chunk(id, text, finish_reason, event=...)`` (and first an opening one ``first=True``
        if ``opening``), else one JSON body made by ``final(id, answers, usage)``."""
        if len(reqs) > engine.max_batch + engine.max_queue:
            raise APIError(400, f"{len(reqs)} prompts in one request; this server takes at most "
                           f"{engine.max_batch + engine.max_queue} at once", "prompt", "invalid_value")
        seqs, listeners = [], []
        try:
            for req in reqs:
                listeners.append(Listener(asyncio.get_running_loop(), request_timeout))
                seqs.append(submit(req, listeners[-1], adapter))
        except APIError:
            for seq in seqs:
                engine.cancel(seq)
            raise
        rid = uuid.uuid4().hex[:24]

        if not reqs[0].stream:
            # the client's leaving is watched while the answer is made, so its rows are freed at once
            gathered = asyncio.ensure_future(asyncio.gather(*(collect(li) for li in listeners),
                                                            return_exceptions=True))
            left = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({gathered, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for seq in seqs:
                    engine.cancel(seq)  # no-op once finished; frees the slot if the client left
                left.cancel()
            if not gathered.done():
                gathered.cancel()
                gathered.add_done_callback(_retrieved)
                return Response(status_code=CLIENT_GONE)
            answers = gathered.result()
            for a in answers:
                if isinstance(a, BaseException):
                    raise a
            usage = _usage(*(a.final for a in answers))
            # a long answer with logprobs is a large JSON document: built off the event loop
            return await workers.run(lambda: JSONResponse(final(rid, answers, usage)),
                                     small=all(r.logprobs is None for r in reqs))

        req, seq, listener = reqs[0], seqs[0], listeners[0]

        async def sse():
            try:
                if opening:
                    yield _sse(chunk(rid, None, None, first=True))
                async for event in listener.events():
                    if event.error:
                        code = "timeout" if listener.timed_out else None
                        yield _sse(APIError(500, event.error, type="server_error", code=code).body())
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
        body = _with_defaults(await read_body(request), request_defaults)
        # tools: the answer may be a call (``calls`` turns it into tool_calls); else None
        req, calls = await workers.run(parse_tool_chat, body, tokenizer, window, default_max_tokens,
                                       small=small(request) and not constrained(body))
        adapter = pick_adapter(body)
        served = adapter.name if adapter else model_id

        def logprobs(entries):
            return None if req.logprobs is None else {"content": chat_logprobs(tokenizer, entries)}

        def chunk(rid, text, finish, first=False, event=None):
            if first or calls is None:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            else:
                delta, finish = calls.delta(text, finish)
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": served, "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs(event.logprobs) if event else None,
                                 "finish_reason": finish}]}

        def final(rid, answers, usage):
            message, finish = {"role": "assistant", "content": answers[0].text}, answers[0].final.finish_reason
            if calls is not None:
                message, finish = calls.message(answers[0].text, finish)
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                    "model": served, "system_fingerprint": None,
                    "choices": [{"index": 0, "message": message,
                                 "logprobs": logprobs(answers[0].logprobs), "finish_reason": finish}],
                    "usage": usage}

        return await run(request, [req], chunk, final, opening=True, adapter=adapter)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = _with_defaults(await read_body(request), request_defaults)

        def prepare():
            reqs = parse_completion(body, tokenizer, window, default_max_tokens)
            return reqs, [tokenizer.decode(r.prompt_ids) if r.echo else "" for r in reqs]

        reqs, echoed = await workers.run(prepare, small=small(request) and not constrained(body))
        adapter = pick_adapter(body)
        served = adapter.name if adapter else model_id

        def logprobs(req, prompt_entries, entries, offsets: Offsets):
            """The legacy shape over the prompt's tokens (echo) and then the generated ones."""
            if req.logprobs is None:
                return None
            parts = [completion_logprobs(tokenizer, prompt_entries, Offsets(tokenizer))] if prompt_entries else []
            parts.append(completion_logprobs(tokenizer, entries, offsets))
            return {k: [x for part in parts for x in part[k]] for k in parts[-1]}

        def head(rid, choices):
            return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": served,
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
        return await run(request, reqs, chunk, final, opening=reqs[0].echo and reqs[0].logprobs is None,
                         adapter=adapter)

    endpoint_process = app.state.endpoint_process = EndpointProcess(tokenizer.path)

    async def in_process(kind: str, body: dict) -> Response:
        status, out = await workers.wait(lambda: endpoint_process.submit(kind, body, window))
        if status != 200:
            raise APIError(*out)
        return Response(out, media_type="application/json")

    @app.post("/tokenize")
    async def tokenize_(request: Request):
        body = await read_body(request)
        if small(request):
            return JSONResponse(tokenize(body, tokenizer, window))
        return await in_process("tokenize", body)

    @app.post("/detokenize")
    async def detokenize_(request: Request):
        body = await read_body(request)
        if small(request):
            return JSONResponse(detokenize(body, tokenizer))
        return await in_process("detokenize", body)

    @app.get("/tokenizer_info")
    async def tokenizer_info_(request: Request):
        check_key(request)
        return tokenizer_info(tokenizer, window)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "jneox",
                                            "context_window": window}, *adapter_entries()]}

    def adapter_entries() -> list[dict]:
        """/v1/models' entries of the LoRA adapters (vLLM's shape: ``parent`` is the base model)."""
        return [{"id": name, "object": "model", "created": created, "owned_by": "jneox", "context_window": window,
                 "parent": model_id} for name in engine.adapters]

    @app.get("/health")
    async def health():
        status = engine.status  # ok, draining (shutting down), stopped, failed, not started
        alive = status == "ok" and engine.thread.is_alive()
        body = {"status": status if status != "ok" or alive else "failed", "model": model_id, **engine.stats()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(request)  # as the tokenizer endpoints: a scraper sends the key (Prometheus' authorization)
        return Response(await workers.run(engine.metrics.exposition), media_type=METRICS_CONTENT_TYPE)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM/SIGINT drains the engine before uvicorn shuts down.

    uvicorn alone closes the listening socket at once (new clients are refused, not told 503), and
    after shutting down raises the signal again, so SIGTERM ended the process with status -15.
    Here the listener stays open while the engine drains (new requests get 503, /health says
    "draining"), then uvicorn stops as usual and :func:`~jneox.serve.serve` returns. A second signal
    stops at once. ``limits``: the connection limits, whose protocol class ``config`` must use
    (``http=limits.protocol()``); their file-descriptor log is installed on the server's loop.
    """

    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float, limits: Limits | None = None):
        super().__init__(config)
        self.engine, self.shutdown_timeout, self.limits = engine, shutdown_timeout, limits
        self.drainer: threading.Thread | None = None

    async def startup(self, sockets=None) -> None:
        if self.limits is not None:
            self.limits.install(asyncio.get_running_loop())
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.drainer is None:
            self.drainer = threading.Thread(target=self._drain, name="jneox-drain", daemon=True)
            self.drainer.start()
        else:
            self.should_exit = self.force_exit = True

    def _drain(self) -> None:
        log.warning("shutting down: finishing the requests already accepted (up to %g s; a second signal "
                    "stops at once)", self.shutdown_timeout)
        self.engine.drain(self.shutdown_timeout)
        self.should_exit = True


def _usage(*events: Event) -> dict:
    """Token counts from the final events of one request's answers (several prompts: summed)."""
    prompt, completion = sum(e.prompt_tokens for e in events), sum(e.completion_tokens for e in events)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {**usage, **_cached_usage(events)}


def _with_defaults(body: dict, defaults: dict) -> dict:
    """The request's body with the model's sampling defaults for the fields it leaves out (or null)."""
    return {**body, **{k: v for k, v in defaults.items() if body.get(k) is None}} if defaults else body


def _cached_usage(events: Iterable[Event]) -> dict:
    """OpenAI's ``prompt_tokens_details.cached_tokens``: prompt tokens taken from the prefix cache
    (present when the engine looked the prompts up)."""
    cached = [e.cached_tokens for e in events if e.cached_tokens is not None]
    return {"prompt_tokens_details": {"cached_tokens": sum(cached)}} if cached else {}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _retrieved(future: asyncio.Future) -> None:
    """Marks a cancelled future's outcome as seen (else asyncio logs "exception was never retrieved")."""
    if not future.cancelled():
        future.exception()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (call it once the request's body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
