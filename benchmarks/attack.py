"""Hostile clients against `jneox serve`: does the server shed them and keep answering?

Starts `jneox serve` on 127.0.0.1 (the demo model by default) with a short --read-timeout and a
--max-connections cap, measures a short chat's latency idle, then for ``--seconds`` runs at once:
slowloris bodies (one byte a second), connections that send nothing or half a header, clients that
post the largest /tokenize bodies (1 MiB, refused, and at the size cap, tokenized), and clients that
abandon non-streamed completions of 800 tokens after 0.5 s, while a probe sends the same short chat
again and again. Then a flood of idle connections past --max-connections. Every loop is bounded: the
script stops by itself. The table:

- connections held after the deadline: hostile connections still open --read-timeout + 2 s after they
  opened (want 0);
- flood connections refused at once: closed by the server within 1 s, before their read deadline;
- short chat latency under attack: the probe's median against its idle median (want within 2x);
- abandoned rows freed: requests the server stopped decoding (/health: running 0) within 2 s;
- 5xx answers: to the probe and the attackers' HTTP requests (want 0).

    python benchmarks/attack.py                          # models/demo, 20 s of attack
    python benchmarks/attack.py --model PATH --seconds 60
"""
from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from jneox.serve.tokens import MAX_TOKENIZE_CHARS

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 8, "temperature": 0}


class Tally:
    def __init__(self):
        self.lock, self.counts = threading.Lock(), {}

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def __getitem__(self, key: str) -> int:
        return self.counts.get(key, 0)


def start_server(model: str, read_timeout: float, max_connections: int, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "jneox", "serve", "--model", model, "--port", str(port), "--log-level",
           "warning", "--read-timeout", str(read_timeout), "--max-connections", str(max_connections)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("attack.py: jneox serve did not come up (see its log)")


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def is_closed(s: socket.socket) -> bool:
    if not select.select([s], [], [], 0)[0]:
        return False
    try:
        return not s.recv(65536)
    except OSError:
        return True


def hold(url: str, kind: str, n: int, read_timeout: float, stop: threading.Event, tally: Tally) -> None:
    """``n`` connections of one kind, reopened as the server closes them; each is checked once its
    deadline (+2 s) has passed."""
    host = url.removeprefix("http://")
    body = json.dumps({"prompt": "a" * 100}).encode()
    first = {"idle": b"", "half-header": f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n".encode(),
             "slowloris": (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n").encode()}[kind]
    conns: list[list] = []  # [socket, opened at, body bytes left]
    while not stop.is_set():
        while len(conns) < n and not stop.is_set():
            try:
                s = connect(url)
                s.sendall(first)
                conns.append([s, time.monotonic(), body if kind == "slowloris" else b""])
            except OSError:
                tally.add("hostile refused")
                break
        now, keep = time.monotonic(), []
        for c in conns:
            s, opened, left = c
            if is_closed(s):
                s.close()
                tally.add("hostile closed")
                continue
            if now - opened > read_timeout + 2:
                tally.add("held after deadline")
                s.close()
                continue
            if left:
                try:
                    s.sendall(left[:1])
                    c[2] = left[1:]
                except OSError:
                    s.close()
                    tally.add("hostile closed")
                    continue
            keep.append(c)
        conns = keep
        stop.wait(1.0)
    for s, *_ in conns:
        s.close()


def tokenize_clients(url: str, stop: threading.Event, tally: Tally, cap_chars: int) -> None:
    # encoded once: the client's own work would take CPU from the server on a small machine
    huge = json.dumps({"prompt": "あ" * ((1 << 20) // 3 - 20)}, ensure_ascii=False).encode()  # 1 MiB: over the cap
    big = json.dumps({"prompt": ("長い文章です。abc " * (cap_chars // 10 + 1))[:cap_chars], "return_token_strs": True},
                     ensure_ascii=False).encode()
    with httpx.Client(timeout=60, headers={"Content-Type": "application/json"}) as c:
        while not stop.is_set():
            for body in (huge, big):
                try:
                    r = c.post(url + "/tokenize", content=body)
                    tally.add("5xx" if r.status_code >= 500 else "tokenize answered")
                except httpx.HTTPError:
                    tally.add("tokenize failed")


def abandon(url: str, stop: threading.Event, tally: Tally) -> None:
    host = url.removeprefix("http://")
    body = json.dumps({"prompt": "川", "max_tokens": 800, "temperature": 1.0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    while not stop.is_set():
        try:
            with connect(url) as s:
                s.sendall(head + body)
                time.sleep(0.5)
            tally.add("abandoned")
        except OSError:
            tally.add("abandon failed")
        stop.wait(1.0)


def chat_latency(url: str, n: int, tally: Tally | None = None, stop: threading.Event | None = None) -> list[float]:
    out = []
    with httpx.Client(timeout=60) as c:
        for _ in range(n):
            if stop is not None and stop.is_set():
                break
            t0 = time.monotonic()
            try:
                r = c.post(url + "/v1/chat/completions", json=CHAT)
                if r.status_code >= 500 and tally is not None:
                    tally.add("5xx")
                if r.status_code == 200:
                    out.append(time.monotonic() - t0)
            except httpx.HTTPError:
                if tally is not None:
                    tally.add("probe failed")
            time.sleep(0.3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "demo"))
    p.add_argument("--seconds", type=float, default=20, help="length of the mixed attack")
    p.add_argument("--read-timeout", type=float, default=3)
    p.add_argument("--max-connections", type=int, default=200)
    p.add_argument("--hold", type=int, default=30, help="connections of each holding kind")
    p.add_argument("--attacks", default="hold,tokenize,abandon", help="which run during the probe (default: all)")
    p.add_argument("--log", type=Path, help="write the server's log here")
    args = p.parse_args()
    log = tempfile.TemporaryFile()
    proc, url = start_server(args.model, args.read_timeout, args.max_connections, log)
    tally = Tally()
    try:
        chat_latency(url, 2)  # warm up
        idle = chat_latency(url, 8)
        stop = threading.Event()
        attacks = set(args.attacks.split(","))
        threads = [threading.Thread(target=hold, args=(url, kind, args.hold, args.read_timeout, stop, tally))
                   for kind in ("idle", "half-header", "slowloris") if "hold" in attacks]
        threads += [threading.Thread(target=tokenize_clients, args=(url, stop, tally, MAX_TOKENIZE_CHARS))
                    for _ in range(3 if "tokenize" in attacks else 0)]
        threads += [threading.Thread(target=abandon, args=(url, stop, tally))
                    for _ in range(8 if "abandon" in attacks else 0)]
        for t in threads:
            t.start()
        time.sleep(min(3.0, args.seconds / 4))
        under: list[float] = []
        prober = threading.Thread(target=lambda: under.extend(chat_latency(url, 10_000, tally, stop)))
        prober.start()
        time.sleep(args.seconds)
        stop.set()
        for t in [*threads, prober]:
            t.join(120)
        t0, running = time.monotonic(), None  # the last abandoned requests' rows
        while time.monotonic() - t0 < 2:
            running = httpx.get(url + "/health", timeout=10).json()["running"]
            if running == 0:
                break
            time.sleep(0.1)
        # the flood: more idle connections than --max-connections
        flood = []
        for _ in range(args.max_connections + 100):
            try:
                flood.append((connect(url), time.monotonic()))
            except OSError:
                tally.add("flood connect failed")
        time.sleep(1.0)
        refused_fast = sum(is_closed(s) for s, _ in flood)
        time.sleep(args.read_timeout + 2)
        held = sum(not is_closed(s) for s, _ in flood)
        for s, _ in flood:
            s.close()
        health = httpx.get(url + "/health", timeout=10).status_code
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.seek(0)
    err = log.read().decode(errors="replace")
    if args.log:
        args.log.write_text(err)
    log_lines = err.count("\n")
    idle_med, under_med = statistics.median(idle), statistics.median(under) if under else float("nan")
    rows = [
        ("connections held after the deadline", f"{tally['held after deadline'] + held}",
         f"of {tally['hostile closed'] + tally['held after deadline'] + len(flood)} hostile connections"),
        ("flood connections refused at once", f"{refused_fast}",
         f"of {len(flood)} (cap {args.max_connections}: {len(flood) - args.max_connections} over it)"),
        ("short chat latency, idle", f"{idle_med * 1000:.0f} ms", f"median of {len(idle)}"),
        ("short chat latency under attack", f"{under_med * 1000:.0f} ms",
         f"median of {len(under)}: {under_med / idle_med:.2f}x idle"),
        ("abandoned rows freed", "all" if running == 0 else f"{running} still running",
         f"{tally['abandoned']} requests abandoned after 0.5 s"),
        ("tokenize requests answered", f"{tally['tokenize answered']}", "1 MiB (400) and at the cap (200)"),
        ("5xx answers", f"{tally['5xx']}", f"probe failures {tally['probe failed']}"),
        ("/health after the flood", f"{health}", f"server log: {log_lines} lines"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'':{w}}  result")
    for name, value, note in rows:
        print(f"{name:{w}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
