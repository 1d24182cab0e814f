"""Soak test of `jneox serve`: a seeded mix of well-behaved and hostile clients for a bounded time.

Starts ``jneox serve`` in a subprocess on a free loopback port (the demo model unless ``--model``)
and, for ``--minutes``, runs ``--clients`` client loops. Each loop draws its next client from a seeded
mix: normal streaming chats, non-streamed completions, clients that disconnect mid-stream, clients
that send a request and never read the answer (they hold the connection a few seconds, then close),
malformed bodies (bad JSON, wrong field types, wrong Content-Type) and oversize bodies (a 2 MiB body
with its Content-Length, and a chunked body with none), and, now and then, a burst of requests past
``--max-batch`` + ``--max-queue`` at once, which must be answered 200 or 429.

It reports requests served, outcomes by kind, the server's RSS after the warm-up and at the end, and
hung requests (no answer within ``--hang-s``, or still running or waiting on the server once every
client is done). Targets (exit status 1 if one is missed): 0 hung, 0 5xx, RSS growth < 5%, every
well-formed request answered (a complete 200) or refused with 429.

    python benchmarks/soak.py --minutes 10                  # the README table (demo model)
    python benchmarks/soak.py --seconds 30 --model DIR      # the short version the tests run

Traffic only ever goes to the loopback server started here.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import QUESTIONS, launch_server  # noqa: E402

WELL_FORMED = ("stream", "complete", "disconnect", "burst")
# kind: weight in the mix (a burst is many requests at once: it is drawn rarely)
MIX = {"stream": 35, "complete": 15, "disconnect": 12, "no_read": 8, "malformed": 14, "oversize": 8, "burst": 3}
MALFORMED = [  # (body, content type): each must get a 4xx
    (b'{"messages": [', "application/json"),
    (b'{"messages": "hi"}', "application/json"),
    (b'{"messages": [{"role": "user", "content": null}]}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": -1}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "application/json"),
    (b'\xff\xfe', "application/json"),
    (b'{"messages": [{"role": "user", "content": "a"}]}', "text/plain"),
    (b'messages=hi', "application/x-www-form-urlencoded"),
]
OVERSIZE = 2 << 20


class Soak:
    def __init__(self, url: str, rng: random.Random, max_tokens: int, hang_s: float, burst: int):
        self.url, self.rng, self.max_tokens, self.hang_s, self.burst = url, rng, max_tokens, hang_s, burst
        # outcomes[kind][outcome] = count; outcome: "200", "429", "4xx", "5xx", "left" (the client left as
        # planned), "hung", or "client error: ..." (the connection failed)
        self.outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.tokens = 0

    def body(self, stream: bool) -> dict:
        q = self.rng.choice(QUESTIONS)
        body = {"messages": [{"role": "user", "content": q}], "stream": stream, "temperature": 0.7,
                "seed": self.rng.randrange(1 << 30)}
        if self.rng.random() < 0.9:  # else the server's default cap
            body["max_tokens"] = self.rng.randint(4, self.max_tokens)
        return body

    async def run(self, client: httpx.AsyncClient, kind: str) -> None:
        fn = getattr(self, "_" + kind)
        try:
            outcomes = await asyncio.wait_for(fn(client), self.hang_s)
        except asyncio.TimeoutError:
            outcomes = ["hung"]
        except (httpx.HTTPError, OSError) as e:
            outcomes = [f"client error: {type(e).__name__}"]
        for o in outcomes if isinstance(outcomes, list) else [outcomes]:
            self.outcomes[kind][o] += 1

    @staticmethod
    def _status(code: int) -> str:
        return str(code) if code in (200, 429) else f"{code // 100}xx"

    async def _stream(self, client: httpx.AsyncClient) -> str:
        async with client.stream("POST", self.url + "/v1/chat/completions", json=self.body(True)) as r:
            if r.status_code != 200:
                await r.aread()
                return self._status(r.status_code)
            finished = done = False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        return "5xx"  # an error event: the server failed this request
                    if msg["choices"] and msg["choices"][0]["finish_reason"]:
                        finished = True
                    if msg["choices"] and msg["choices"][0]["delta"].get("content"):
                        self.tokens += 1  # (a chunk; tokens exactly are counted by the server)
            return "200" if finished and done else "incomplete stream"

    async def _complete(self, client: httpx.AsyncClient) -> str:
        r = await client.post(self.url + "/v1/chat/completions", json=self.body(False))
        if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] is None:
            return "incomplete answer"
        return self._status(r.status_code)

    async def _disconnect(self, client: httpx.AsyncClient) -> str:
        body = self.body(True)
        body["max_tokens"] = self.max_tokens
        async with client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return self._status(r.status_code)
            n = self.rng.randint(1, 4)
            async for _ in r.aiter_lines():
                n -= 1
                if n == 0:
                    return "left"  # leaving the block closes the connection mid-stream
            return "200"  # the answer was shorter than the lines this client meant to read

    async def _no_read(self, client: httpx.AsyncClient) -> str:
        """A raw connection that sends a streaming request and never reads, then closes."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps(self.body(True)).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (f"{host}:{port}".encode(), len(body), body))
        await writer.drain()
        await asyncio.sleep(self.rng.uniform(0.5, 5))
        writer.close()
        return "left"

    async def _malformed(self, client: httpx.AsyncClient) -> str:
        body, ctype = self.rng.choice(MALFORMED)
        r = await client.post(self.url + "/v1/chat/completions", content=body, headers={"Content-Type": ctype})
        return self._status(r.status_code)

    async def _oversize(self, client: httpx.AsyncClient) -> str:
        if self.rng.random() < 0.5:  # a Content-Length past the limit: refused before the body is read
            r = await client.post(self.url + "/v1/completions", content=b"x" * OVERSIZE,
                                  headers={"Content-Type": "application/json"})
        else:  # chunked, no length: refused once the limit is passed
            async def chunks():
                for _ in range(OVERSIZE // 65536):
                    yield b"y" * 65536

            r = await client.post(self.url + "/v1/completions", content=chunks(),
                                  headers={"Content-Type": "application/json"})
        return self._status(r.status_code)

    async def _burst(self, client: httpx.AsyncClient) -> list[str]:
        async def one():
            try:
                return await self._complete(client)
            except (httpx.HTTPError, OSError) as e:
                return f"client error: {type(e).__name__}"

        return list(await asyncio.gather(*(one() for _ in range(self.burst))))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def soak(url: str, pid: int, args) -> dict:
    rng = random.Random(args.seed)
    s = Soak(url, rng, args.max_tokens, args.hang_s, args.max_batch + args.max_queue + 4)
    kinds, weights = zip(*MIX.items())
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.hang_s, connect=10), limits=limits) as client:
        async def phase(seconds: float) -> None:
            end = time.monotonic() + seconds

            async def loop():
                while time.monotonic() < end:
                    await s.run(client, rng.choices(kinds, weights)[0])

            await asyncio.gather(*(loop() for _ in range(args.clients)))

        warm = min(30.0, 0.1 * args.seconds)
        await phase(warm)  # allocator pools and caches fill up before the first RSS reading
        await asyncio.sleep(1)
        warm_outcomes = {k: collections.Counter(v) for k, v in s.outcomes.items()}
        rss_start = rss_mb(pid)
        t0 = time.monotonic()
        await phase(args.seconds - warm)
        wall = time.monotonic() - t0
    leftover = None
    for _ in range(60):  # every client is done: the server must be idle
        h = httpx.get(url + "/health", timeout=10).json()
        leftover = h["running"] + h["waiting"]
        if leftover == 0:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(1)
    rss_end = rss_mb(pid)
    return {"outcomes": {k: dict(v) for k, v in s.outcomes.items()},
            "warmup_outcomes": {k: dict(v) for k, v in warm_outcomes.items()}, "warmup_s": warm, "wall_s": wall,
            "rss_start_mb": rss_start, "rss_end_mb": rss_end, "server_leftover": leftover,
            "server": httpx.get(url + "/health", timeout=10).json()}


def summarize(result: dict) -> dict:
    out = result["outcomes"]
    total = collections.Counter()
    for v in out.values():
        total.update(v)
    unanswered = sum(n for k in WELL_FORMED for o, n in out.get(k, {}).items()
                     if o not in ("200", "429", "left"))
    malformed_not_4xx = sum(n for k in ("malformed", "oversize") for o, n in out.get(k, {}).items() if o != "4xx")
    hung = total["hung"] + (result["server_leftover"] or 0)
    growth = result["rss_end_mb"] / result["rss_start_mb"] - 1
    return {"requests": sum(total.values()), "served": total["200"], "refused_429": total["429"], "5xx": total["5xx"],
            "hung": hung, "unanswered_well_formed": unanswered, "bad_input_not_4xx": malformed_not_4xx,
            "rss_growth": growth,
            "targets_met": hung == 0 and total["5xx"] == 0 and growth < 0.05 and unanswered == 0
                           and malformed_not_4xx == 0}


def start_server(args) -> tuple[subprocess.Popen, str]:
    opts = ["--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--log-level", "error",
            "--threads", str(args.threads)]
    return launch_server(opts + (["--model", args.model] if args.model else []), timeout=300)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: jneox serve's default, the demo model)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run (default: 10)")
    length.add_argument("--seconds", type=float, help="how long to run, in seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the client mix (default 0)")
    p.add_argument("--clients", type=int, default=8, help="client loops running at once (default 8)")
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch (default 4)")
    p.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue (default 8)")
    p.add_argument("--max-tokens", type=int, default=48, help="most tokens a client asks for (default 48)")
    p.add_argument("--threads", type=int, default=1, help="the server's --threads (default 1)")
    p.add_argument("--hang-s", type=float, default=120, help="a request unanswered this long is hung (default 120)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    proc, url = start_server(args)
    try:
        result = asyncio.run(soak(url, proc.pid, args))
    finally:
        proc.terminate()
        rc = proc.wait(60)
    result["summary"] = summary = summarize(result)
    result["server_exit"] = rc
    what = args.model or "the demo model"
    print(f"\njneox serve soak ({what}; {args.seconds:g} s, of which the first {result['warmup_s']:g} s are a warm-up "
          f"before the first RSS reading; seed {args.seed}; {args.clients} clients; --max-batch {args.max_batch} "
          f"--max-queue {args.max_queue})\n")
    names = ["200", "429", "4xx", "5xx", "left", "hung"]
    print("| client kind | requests | " + " | ".join(names) + " | other |")
    print("|---|" + "---:|" * (len(names) + 2))
    for kind in MIX:
        c = result["outcomes"].get(kind, {})
        other = ", ".join(f"{k} {v}" for k, v in c.items() if k not in names) or "0"
        print(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c.get(n, 0)) for n in names) + f" | {other} |")
    print(f"\nrequests {summary['requests']} (served 200: {summary['served']}, refused 429: {summary['refused_429']}); "
          f"5xx {summary['5xx']}; hung {summary['hung']}; well-formed unanswered {summary['unanswered_well_formed']}; "
          f"bad input not 4xx {summary['bad_input_not_4xx']}; server RSS {result['rss_start_mb']:.0f} -> "
          f"{result['rss_end_mb']:.0f} MB ({summary['rss_growth']:+.1%}); server exit status on SIGTERM {rc}")
    print("targets (0 hung, 0 5xx, RSS growth < 5%, every well-formed request 200 or 429): "
          + ("met" if summary["targets_met"] else "MISSED"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if summary["targets_met"] and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
