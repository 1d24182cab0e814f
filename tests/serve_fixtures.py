"""A live `jneox serve` on a free loopback port, over a tiny checkpoint, for the server tests.

Import the fixtures into a test module (``from serve_fixtures import live, ...``); each module gets
its own server. The server runs uvicorn in a thread of the test process, so tests can also look at
its engine; a second copy of the model (``reference``) computes what `jneox.generate` gives alone.
"""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

API_KEY = "test-key-123"
WINDOW = 512


@pytest.fixture(scope="module")
def serve_checkpoint(tmp_path_factory, spiece_model):
    """A tiny checkpoint (2 layers, hidden 64, a 512-token window) saved in the HF layout by jneox."""
    import jneox
    from jneox.config import ModelConfig
    from jneox.model import GPTNeoX

    config = ModelConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160,
                         max_position_embeddings=WINDOW)
    model = GPTNeoX(config)
    model.init_weights(std=0.2, seed=0)  # peaky: greedy answers have no near-ties
    return jneox.save(model, tmp_path_factory.mktemp("serve") / "tiny", tokenizer_file=spiece_model)


@pytest.fixture(scope="module")
def packed_checkpoint(tmp_path_factory, spiece_model):
    """A tiny checkpoint whose widths every packed format takes (int4's groups included): for the engine's
    bit-for-bit tests in every weight format."""
    import jneox
    from jneox.config import ModelConfig
    from jneox.model import GPTNeoX

    config = ModelConfig(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384,
                         max_position_embeddings=WINDOW)
    model = GPTNeoX(config)
    model.init_weights(std=0.05, seed=0)
    return jneox.save(model, tmp_path_factory.mktemp("packed") / "tiny", tokenizer_file=spiece_model)


def random_ids(n: int, seed: int) -> list[int]:
    """``n`` token ids drawn from the tiny vocabulary's ordinary pieces, reproducibly."""
    import torch

    return torch.randint(4, 600, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass
class Live:
    url: str
    engine: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()


def start_server(checkpoint, api_key=API_KEY, max_batch=8, max_queue=16, start_engine=True, draft=None,
                 adapters=(), **app_options) -> Live:
    """``app_options``: create_app's keyword options (request_timeout, cors_origins, ...); ``draft``: the
    engine's speculative decoding; ``adapters``: folders of LoRA adapters, {name: folder}."""
    import uvicorn

    import jneox
    from jneox.serve import Engine, create_app

    model, tokenizer = jneox.load(checkpoint, weights="float32")  # what `jneox serve` loads on a CPU
    from jneox.adapters import load_adapter

    loaded = [load_adapter(folder, model.config, name) for name, folder in dict(adapters).items()]
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, draft=draft, adapters=loaded)
    if start_engine:
        engine.start()
    app = create_app(engine, model_id="tiny", api_key=api_key, **app_options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return Live(f"http://127.0.0.1:{port}", engine, server, thread)


def spawn_serve(command: list[str], **popen_options) -> tuple[subprocess.Popen, str]:
    """``command`` (a `jneox serve` command line without --port) in a subprocess on a free loopback port;
    returns it and its URL once /health answers 200."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*command, "--port", str(port)], **popen_options)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jneox serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("jneox serve did not come up") from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def live(serve_checkpoint):
    server = start_server(serve_checkpoint)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(serve_checkpoint):
    """A separate copy of the model and tokenizer, for answers computed without the server."""
    import jneox

    return jneox.load(serve_checkpoint, weights="float32")


@pytest.fixture(scope="module")
def client(live):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
