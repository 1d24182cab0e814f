"""``jneox serve``: an OpenAI-compatible HTTP server with continuous batching and a chat page.

    from jneox.serve import Engine, create_app
    engine = Engine(model, tokenizer, max_batch=8).start()
    app = create_app(engine, model_id="my-model")      # a FastAPI app: run it with uvicorn

:func:`serve` does all of that and runs uvicorn until interrupted.
"""
from __future__ import annotations

from .scheduler import Engine, Event, QueueFull

__all__ = ["Engine", "Event", "QueueFull", "create_app", "serve"]


def create_app(*args, **kwargs):
    from .app import create_app as _create_app  # fastapi is imported only when a server is made

    return _create_app(*args, **kwargs)


def serve(model, tokenizer, model_id: str = "jneox", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 8, max_queue: int = 32, log_level: str = "info") -> None:
    """Serve ``model`` until interrupted (Ctrl-C)."""
    import uvicorn

    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue).start()
    try:
        uvicorn.run(create_app(engine, model_id, api_key), host=host, port=port, log_level=log_level,
                    timeout_graceful_shutdown=3)
    finally:
        engine.stop()
