"""Clients that try to hold the server: connections that never finish a request (idle, half a header, a
body one byte at a time) are closed at --read-timeout; connections past --max-connections are closed as
they are accepted; running out of file descriptors logs one line and the server recovers; tokenizing
runs off the event loop and is capped; a client that leaves a non-streamed request frees its row; a
client that leaves mid-body costs one log line; logit_bias is refused rather than ignored."""
from __future__ import annotations

import gc
import json
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from serve_fixtures import Live, serve_checkpoint, spawn_serve  # noqa: F401

import jneox
from jneox.serve import Engine, create_app
from jneox.serve.app import DrainingServer
from jneox.serve.limits import Limits
from jneox.serve.tokens import MAX_DETOKENIZE_TOKENS, MAX_TOKENIZE_CHARS

READ_TIMEOUT = 1.0
COMPLETIONS = "/v1/completions"
JNEOX = [sys.executable, "-c", "import sys; from jneox.cli import main; sys.exit(main())"]


def start_guarded(checkpoint, read_timeout=READ_TIMEOUT, max_connections=None, start_engine=True,
                  step_delay=0.0) -> tuple[Live, Limits]:
    """The server as `jneox serve` builds it (limits included), in a thread of the test process, without an
    API key. ``step_delay`` slows each decode step down, as a larger model would be."""
    model, tokenizer = jneox.load(checkpoint, weights="float32")
    engine = Engine(model, tokenizer, max_batch=4, max_queue=8)
    if step_delay:
        step = engine._decode_step
        engine._decode_step = lambda running: (time.sleep(step_delay), step(running))[1]
    if start_engine:
        engine.start()
    limits = Limits(read_timeout, max_connections)
    config = uvicorn.Config(create_app(engine, model_id="tiny"), log_level="warning", timeout_graceful_shutdown=1,
                            http=limits.protocol())
    server = DrainingServer(config, engine, 1, limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    return Live(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server, thread), limits


@pytest.fixture(scope="module")
def guarded(serve_checkpoint):
    live, limits = start_guarded(serve_checkpoint)
    yield live, limits
    live.stop()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def closed_within(s: socket.socket, seconds: float, trickle: bytes = b"", every: float = 0.2) -> float | None:
    """Seconds until the server closes ``s`` (None: still open after ``seconds``), sending one byte of
    ``trickle`` every ``every`` seconds meanwhile (a slowloris body)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if trickle:
            try:
                s.sendall(trickle[:1])
            except OSError:
                return time.monotonic() - t0
            trickle = trickle[1:]
        readable, _, _ = select.select([s], [], [], every)
        if readable:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return time.monotonic() - t0
            assert not data, f"the server answered instead of closing: {data[:200]!r}"
            return time.monotonic() - t0
    return None


def read_response(s: socket.socket) -> bytes:
    """One whole response with a Content-Length (its head and body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536) or b"!"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "the server closed the connection mid-response"
        body += chunk
    return data


# ---- read deadline -------------------------------------------------------------------------------
def test_a_connection_that_sends_nothing_is_closed_at_the_read_timeout(guarded):
    live, limits = guarded
    with connect(live.url) as s:
        took = closed_within(s, 20)
    assert took is not None, "a connection that sent nothing was still open after 20 s (--read-timeout 1)"
    assert took >= READ_TIMEOUT * 0.9


def test_half_a_header_is_closed_at_the_read_timeout_also_on_a_kept_alive_connection(guarded):
    live, _ = guarded
    host = live.url.removeprefix("http://")
    with connect(live.url) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode())
        assert closed_within(s, 20) is not None, "half a header held its connection past 20 s"
    with connect(live.url) as s:  # a whole request first, then half of the next one
        s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert read_response(s).startswith(b"HTTP/1.1 200 ")
        s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode())
        assert closed_within(s, 20) is not None, "half a second header held a kept-alive connection past 20 s"


def test_a_body_sent_one_byte_at_a_time_is_closed_at_the_read_timeout(guarded):
    live, limits = guarded
    host = live.url.removeprefix("http://")
    body = b'{"prompt": "' + b"a" * 200 + b'"}'
    with connect(live.url) as s:
        s.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        took = closed_within(s, 20, trickle=body, every=0.2)  # the whole body would take 40 s
    assert took is not None, "a slowloris body held its connection past 20 s"
    assert httpx.get(live.url + "/health", timeout=10).status_code == 200


def test_the_deadline_ends_with_the_body_not_with_the_answer(serve_checkpoint):
    """A request read in full may take longer than --read-timeout to answer (here: it waits for the
    engine), and a kept-alive client may send several requests."""
    live, _ = start_guarded(serve_checkpoint, start_engine=False)
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(
            live.url + COMPLETIONS, json={"prompt": "川", "max_tokens": 4}, timeout=60)))
        t.start()
        time.sleep(READ_TIMEOUT * 2.5)
        live.engine.start()
        t.join(60)
        assert result["r"].status_code == 200, result["r"].text
        with httpx.Client(base_url=live.url, timeout=30) as c:
            for _ in range(3):
                assert c.post(COMPLETIONS, json={"prompt": "川", "max_tokens": 4}).status_code == 200
                time.sleep(READ_TIMEOUT * 1.5)  # idle between requests: uvicorn's keep-alive, longer
    finally:
        live.stop()


# ---- connection cap ----------------------------------------------------------------------------
def test_connections_past_the_cap_are_closed_at_once_and_the_server_keeps_answering(serve_checkpoint):
    live, limits = start_guarded(serve_checkpoint, read_timeout=20, max_connections=6)
    held = []
    try:
        held = [connect(live.url) for _ in range(6)]
        deadline = time.monotonic() + 20
        while limits.open < 6:
            assert time.monotonic() < deadline, f"only {limits.open} connections were accepted"
            time.sleep(0.05)
        extra = [connect(live.url) for _ in range(6)]
        times = [closed_within(s, 10) for s in extra]
        for s in extra:
            s.close()
        assert all(t is not None for t in times), f"connections past the cap were held: {times}"
        assert limits.refused >= 6 and limits.open == 6
        held.pop().close()  # one free place: a real client gets in
        r = httpx.get(live.url + "/health", timeout=10)
        assert r.status_code == 200
    finally:
        for s in held:
            s.close()
        live.stop()


# ---- out of file descriptors -------------------------------------------------------------------------
def test_running_out_of_file_descriptors_logs_one_line_and_the_server_recovers(serve_checkpoint, tmp_path):
    """Under a descriptor limit lower than --max-connections, idle clients use up every descriptor: accept
    fails (asyncio reported it once per pending connection, every second), the read deadline frees
    them, and /health answers again."""
    limit = 200
    log = tmp_path / "serve.log"

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with open(log, "wb") as out:
        proc, url = spawn_serve([*JNEOX, "serve", "--model", str(serve_checkpoint),
                                 "--log-level", "warning", "--read-timeout", "2", "--max-connections", "100000"],
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=low_limit)
    idle = []
    try:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        for _ in range(2 * limit):
            idle.append(socket.create_connection((host, int(port)), timeout=30))
        time.sleep(4)  # accept fails for a few seconds while the first ones wait for their deadline
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "/health did not answer again within 60 s"
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(30)
    text = log.read_text(errors="replace")
    assert "cannot accept connections" in text, f"the descriptor exhaustion was not reported:\n{text[-2000:]}"
    assert text.count("Traceback") == 0 and text.count("out of system resource") == 0, text[-3000:]
    assert text.count("cannot accept connections") == 1, text[-3000:]


# ---- tokenizing off the event loop, capped -----------------------------------------------------------
def test_large_tokenize_requests_do_not_hold_up_other_clients(serve_checkpoint):
    proc, url = spawn_serve([*JNEOX, "serve", "--model", str(serve_checkpoint),
                             "--log-level", "warning"])
    try:
        big = {"prompt": ("これは長い文章です。abc def " * 20000)[:MAX_TOKENIZE_CHARS], "return_token_strs": True}
        with httpx.Client(timeout=120) as c:
            t0 = time.monotonic()
            assert c.post(url + "/tokenize", json=big).status_code == 200
            alone = time.monotonic() - t0  # one big request, nothing else running

            def post_big():
                with httpx.Client(timeout=300) as own:
                    for _ in range(2):
                        assert own.post(url + "/tokenize", json=big).status_code == 200

            posters = [threading.Thread(target=post_big) for _ in range(3)]
            for t in posters:
                t.start()
            latencies = []
            while any(t.is_alive() for t in posters):
                t0 = time.monotonic()
                assert c.get(url + "/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)
            for t in posters:
                t.join()
    finally:
        proc.terminate()
        proc.wait(30)
    # on the event loop, each big request held /health up for about `alone`
    assert len(latencies) >= 5 and statistics.median(latencies) < alone / 4, (alone, latencies)


def test_tokenizer_endpoints_refuse_oversized_input(guarded):
    live, _ = guarded
    r = httpx.post(live.url + "/tokenize", json={"prompt": "a" * (MAX_TOKENIZE_CHARS + 1)}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert str(MAX_TOKENIZE_CHARS) in r.json()["error"]["message"]
    r = httpx.post(live.url + "/detokenize", json={"tokens": [5] * (MAX_DETOKENIZE_TOKENS + 1)}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert httpx.post(live.url + "/tokenize", json={"prompt": "a" * 1000}, timeout=30).status_code == 200


# ---- abandoned non-streamed request ------------------------------------------------------------------
def test_a_client_that_leaves_a_non_streamed_request_frees_its_row_at_once(serve_checkpoint, caplog):
    live, _ = start_guarded(serve_checkpoint, step_delay=0.01)
    try:
        engine = live.engine
        body = {"prompt": "川", "max_tokens": 400, "temperature": 1.0, "seed": 1}
        full = httpx.post(live.url + COMPLETIONS, json=body, timeout=120).json()
        if full["choices"][0]["finish_reason"] != "length":
            pytest.skip("the tiny model stopped early; nothing to abandon")
        host = live.url.removeprefix("http://")
        payload = json.dumps(body).encode()
        with connect(live.url) as s:
            before = engine.stats()["decode_tokens"]
            s.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            deadline = time.monotonic() + 30
            while engine.stats()["decode_tokens"] < before + 20:
                assert time.monotonic() < deadline
                time.sleep(0.005)
        at_close = engine.stats()["decode_tokens"]
        deadline = time.monotonic() + 30
        while engine.stats()["running"]:
            assert time.monotonic() < deadline, "the abandoned request was still running after 30 s"
            time.sleep(0.01)
        after = engine.stats()["decode_tokens"] - at_close
        # a step takes at least 10 ms here; the rest of the answer would be about 380 tokens
        assert after < 100, f"{after} tokens were generated after the client left"
        gc.collect()  # asyncio reports a future whose exception nobody read when it is collected
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        live.stop()


# ---- small ones ------------------------------------------------------------------------------------
def test_logit_bias_is_refused_not_ignored(guarded):
    live, _ = guarded
    r = httpx.post(live.url + COMPLETIONS, json={"prompt": "川", "max_tokens": 2, "logit_bias": {"5": 100}},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    r = httpx.post(live.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "川"}], "max_tokens": 2, "logit_bias": {"5": -100}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    ok = httpx.post(live.url + COMPLETIONS, json={"prompt": "川", "max_tokens": 2, "logit_bias": {}}, timeout=30)
    assert ok.status_code == 200  # an empty bias changes nothing (some clients always send one)


def test_a_client_that_leaves_mid_body_costs_one_log_line_not_a_traceback(serve_checkpoint, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc, url = spawn_serve([*JNEOX, "serve", "--model", str(serve_checkpoint),
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    try:
        host = url.removeprefix("http://")
        for _ in range(5):
            with connect(url) as s:
                s.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: 1000\r\n\r\n{{\"prompt\": ".encode())
                time.sleep(0.2)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert 1 <= text.count("disconnected before sending the whole request") <= 5, text[-3000:]


def test_help_recommends_the_environment_variable_for_the_api_key():
    out = subprocess.run([*JNEOX, "serve", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    flat = " ".join(out.split())
    assert "JNEOX_API_KEY" in flat and "process list" in flat
    assert "--read-timeout" in flat and "--max-connections" in flat
