"""``jneox serve``: an OpenAI-compatible HTTP server with continuous batching and a chat page.

    from jneox.serve import Engine, create_app
    engine = Engine(model, tokenizer, max_batch=8).start()
    app = create_app(engine, model_id="my-model")      # a FastAPI app: run it with uvicorn

:func:`serve` does all of that and runs uvicorn until interrupted.
"""
from __future__ import annotations

import uvicorn

from .app import DrainingServer, create_app
from .limits import Limits
from .prefix_cache import DEFAULT_PREFIX_CACHE_MB
from .protocol import DEFAULT_MAX_TOKENS, DEFAULT_READ_TIMEOUT_S
from .scheduler import DEFAULT_IDLE_PREFILL, DEFAULT_MAX_PREFILL_TOKENS, Engine, Event, QueueFull, Unavailable

__all__ = ["Engine", "Event", "QueueFull", "Unavailable", "create_app", "serve"]


def serve(model, tokenizer, model_id: str = "jneox", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 8, max_queue: int = 32, log_level: str = "info", *,
          allowed_hosts=(), cors_origins=(), request_timeout: float | None = None, shutdown_timeout: float = 30,
          default_max_tokens: int | None = None, draft=None, read_timeout: float | None = DEFAULT_READ_TIMEOUT_S,
          max_connections: int | None = None, adapters=(), prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
          generation_defaults: dict | None = None, kv_cache_gb: float | None = None,
          max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS, idle_prefill: int = DEFAULT_IDLE_PREFILL) -> None:
    """Serve ``model`` until SIGTERM or SIGINT (Ctrl-C), then shut down gracefully: new requests get
    503, those already accepted finish for up to ``shutdown_timeout`` seconds (what is left then ends
    with an error event), and the function returns. A second signal stops at once.
    ``default_max_tokens`` None: DEFAULT_MAX_TOKENS (512); ``draft``: speculative decoding (see
    :class:`Engine`). ``read_timeout``: seconds to receive a request's headers and body (None: no
    limit); ``max_connections``: connections open at once (None: DEFAULT_MAX_CONNECTIONS or fewer
    under a low ``ulimit -n``), more are closed as they are accepted (see :mod:`jneox.serve.limits`).
    ``adapters``: LoRA adapters that requests name in ``model`` (see :class:`Engine`).
    ``prefix_cache_mb``: the prefix cache's budget (0: off; see :class:`Engine`). ``generation_defaults``
    (:func:`jneox.loading.generation_defaults`): sampling defaults for requests; its ``max_new_tokens``
    is the default ``max_tokens`` unless ``default_max_tokens`` is given. ``kv_cache_gb``,
    ``max_prefill_tokens`` and ``idle_prefill``: see :class:`Engine`.
    The other options: see :func:`create_app`."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, draft=draft, adapters=adapters,
                    prefix_cache_mb=prefix_cache_mb, model_name=model_id, kv_cache_gb=kv_cache_gb,
                    max_prefill_tokens=max_prefill_tokens, idle_prefill=idle_prefill)
    app = create_app(engine, model_id, api_key, host=host, allowed_hosts=allowed_hosts, cors_origins=cors_origins,
                     request_timeout=request_timeout,
                     default_max_tokens=(default_max_tokens or (generation_defaults or {}).get("max_new_tokens")
                                         or DEFAULT_MAX_TOKENS),
                     generation_defaults=generation_defaults)
    engine.start()
    limits = Limits(read_timeout, max_connections)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3,
                            http=limits.protocol())
    server = DrainingServer(config, engine, shutdown_timeout, limits)
    try:
        server.run()
    finally:
        engine.stop()
        app.state.endpoint_process.close()  # the tokenizer endpoints' child, if one was started
