"""Load test of `jneox serve`: N concurrent streaming chat clients for a bounded time, per N.

Prints one table row per client count: aggregate tok/s (completion tokens of every request ÷ wall
time of the row), decode tok/s (tokens made by decode steps ÷ the time the server spent in them,
from its /health counters: what batching speeds up), decode tokens per CPU-second of the server's
engine thread (with ``--threads 1`` that is all of its work, and it does not count time lost to
other processes on a shared machine), the share of the row's time the server spent
prefilling prompts, p50/p95 time to first token (queueing and prefill included), p50/p95
per-token latency (a request's time from first to last token ÷ its tokens after the first), and
errors (any non-200 answer, broken stream or missing usage). Errors must be 0 while the clients
fit in --max-batch + --max-queue. With a 1-client row first, it then prints the CPU's AVX-512 and AMX
flags and checks the server-load targets for every other row (see ``print_targets``): aggregate tok/s
at least 5x one client's, TTFT p95 within 3 (P + (N - 1) d) from one client's TTFT p50 P and
per-token p50 d, per-token p95 within 2x its p50. ``--max-prefill-tokens`` is passed to the server.

The server is started here (``jneox serve`` in a subprocess on a free loopback port) over a model
given with ``--model``, or over a random-weight checkpoint of the published 3.6B shape with
``--layers`` layers (built once into ``--work`` by ``decode_speed.make_checkpoint``); ``--url``
aims at a server that is already running instead. Traffic only ever goes to that one server.

    python benchmarks/serve_load.py --layers 2                   # a quick run (the README table)
    python benchmarks/serve_load.py --model DIR --dtype int8     # a real checkpoint
    python benchmarks/serve_load.py --model models/demo --task copy --temperature 0 --speculate lookup

``--lora N`` loads N random LoRA adapters of rank ``--lora-rank`` (written into ``--work``) with
``--lora``, and runs each client count twice: every request on the base model, then the requests
spread round-robin over the adapters (rows of one batch on different adapters); the table has both
rows and the adapter rows' aggregate tok/s as a share of the base rows'.

    python benchmarks/serve_load.py --layers 36 --dtype int8 --clients 16 --lora 4

``--turns N`` measures prefix caching instead: one client holds an N-turn chat (each user turn a
passage of about ``--turn-tokens`` tokens, each answer ``--max-tokens`` greedy tokens, the user reading
each answer for ``--think-time`` seconds before sending the next turn), against each of ``--servers``:
``on`` (the prefix cache, ``--prefix-cache-mb``, with its idle prefill of finished answers), ``noidle``
(the cache, ``--idle-prefill 0``) and ``off`` (no cache); the table has each turn's prompt tokens, the
tokens taken from the cache, the time to first token, the server's CPU time in the turn's prefill
(from /health; what a shared machine disturbs less) and in idle prefill since the turn before:

    python benchmarks/serve_load.py --layers 4 --turns 5 --turn-tokens 200
    python benchmarks/serve_load.py --layers 4 --turns 5 --turn-tokens 80 --preamble-tokens 250 --think-time 10
    # (5th turn: ~1,000 prompt tokens, ~900 of them the turns and answers before)

``--speculate``/``--draft-tokens`` are passed to the server (speculative decoding; the table then has
the share of guesses accepted); ``--task copy`` asks questions about a passage given in the prompt,
whose answers quote it (``benchmarks/speculative.py``'s copy task), instead of open chat questions.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

QUESTIONS = ["日本のおすすめの観光地を教えてください。", "世界で一番高い山は何ですか?", "猫について説明してください。",
             "おいしいカレーの作り方を教えてください。", "東京から大阪まではどのくらいかかりますか?", "春の季語を教えてください。"]


async def one_request(client: httpx.AsyncClient, url: str, i: int, max_tokens: int, headers: dict,
                      questions: list[str] = QUESTIONS, temperature: float = 0.7, model: str = "bench",
                      extra: dict | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": questions[i % len(questions)]}],
            "max_tokens": max_tokens, "temperature": temperature, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    return {"error": msg["error"]["message"]}
                if msg.get("usage"):
                    usage = msg["usage"]
                elif msg["choices"] and msg["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if usage is None or first is None:
        return {"error": "the stream ended without text or usage"}
    n = usage["completion_tokens"]
    return {"tokens": n, "ttft": first - t0, "per_token": (last - first) / (n - 1) if n > 1 else None}


def server_counters(url: str) -> dict | None:
    """The engine's work counters from /health (tokens and seconds spent in prefill and decode)."""
    try:
        h = httpx.get(url + "/health", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return None
    return h if "decode_s" in h else None


async def run_clients(url: str, clients: int, duration: float, max_tokens: int, headers: dict,
                      questions: list[str] = QUESTIONS, temperature: float = 0.7, models: tuple[str, ...] = ("bench",),
                      extra: dict | None = None) -> dict:
    """``clients`` loops, each sending one request after another until ``duration`` has passed; client c
    asks for model ``models[c % len(models)]``."""
    results: list[dict] = []
    before = server_counters(url)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:
        t0 = time.perf_counter()

        async def loop(c: int):
            k = 0
            while time.perf_counter() - t0 < duration:
                results.append(await one_request(client, url, c * 1000 + k, max_tokens, headers, questions,
                                                 temperature, models[c % len(models)], extra))
                k += 1

        await asyncio.gather(*(loop(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    after = server_counters(url)
    decode = decode_cpu = prefill = accepted = float("nan")
    if before and after and after.get("draft_proposed", 0) > before.get("draft_proposed", 0):
        accepted = (after["draft_accepted"] - before["draft_accepted"]) / (after["draft_proposed"] - before["draft_proposed"])
    if before and after and after["decode_s"] > before["decode_s"]:
        tokens = after["decode_tokens"] - before["decode_tokens"]
        decode = tokens / (after["decode_s"] - before["decode_s"])
        decode_cpu = tokens / max(after["decode_cpu_s"] - before["decode_cpu_s"], 1e-9)
        prefill = (after["prefill_s"] - before["prefill_s"]) / wall
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = sorted(r["ttft"] for r in ok)
    per_token = sorted(r["per_token"] for r in ok if r["per_token"] is not None)
    return {"clients": clients, "requests": len(ok), "tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "tpot_p50": pct(per_token, 50), "tpot_p95": pct(per_token, 95), "errors": len(errors),
            "first_error": errors[0] if errors else None, "decode_tok_s": decode,
            "decode_tok_cpu_s": decode_cpu, "prefill_share": prefill, "accepted": accepted}


PASSAGE = ("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で"
           "ニャーニャー泣いていた事だけは記憶している。吾輩はここで始めて人間というものを見た。")


async def chat_turns(url: str, turns: int, turn_tokens: int, max_tokens: int, headers: dict,
                     preamble_tokens: int = 0, think_time: float = 0) -> list[dict]:
    """One client's chat of ``turns`` turns, one after another (the first with a passage of about
    ``preamble_tokens`` tokens before it, each after ``think_time`` seconds of reading the answer before):
    each turn's prompt tokens, cached prompt tokens (usage.prompt_tokens_details), time to first token,
    the server's CPU time in its prefill, and in idle prefill since the turn before."""
    history, rows = [], []
    last = server_counters(url)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=10)) as client:
        for t in range(turns):
            if t:
                await asyncio.sleep(think_time)
            # a passage of about turn_tokens tokens (rinna's tokenizer: about 4 tokens per 3 characters of it)
            chars = int((turn_tokens + (preamble_tokens if t == 0 else 0)) * 0.75)
            text = f"第{t + 1}問。" + (PASSAGE * (1 + chars // len(PASSAGE)))[:chars]
            history.append({"role": "user", "content": text + "要約してください。"})
            body = {"model": "bench", "messages": history, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            before = server_counters(url)
            t0, first, usage, answer = time.perf_counter(), None, None, []
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise SystemExit(f"turn {t + 1}: HTTP {r.status_code}: {r.text[:200]}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    msg = json.loads(line[6:])
                    if msg.get("usage"):
                        usage = msg["usage"]
                    elif msg["choices"] and msg["choices"][0]["delta"].get("content"):
                        first = first or time.perf_counter()
                        answer.append(msg["choices"][0]["delta"]["content"])
            history.append({"role": "assistant", "content": "".join(answer)})
            after = server_counters(url)
            rows.append({"turn": t + 1, "prompt_tokens": usage["prompt_tokens"],
                         "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                         "ttft": (first or time.perf_counter()) - t0,
                         # the engine thread's CPU time in this turn's prefill (one client: nothing else ran)
                         "prefill_cpu": after["prefill_cpu_s"] - before["prefill_cpu_s"] if before and after else float("nan"),
                         # and in idle prefill from the end of the turn before to the end of this one
                         "idle_cpu": after.get("idle_prefill_cpu_s", 0) - last.get("idle_prefill_cpu_s", 0)
                         if last and after else float("nan")})
            last = after
    return rows


async def wait_idle(url: str, timeout: float = 600) -> None:
    """Until the server has no idle prefill left to do (the warm-up request's), so that it stays out of the rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server_counters(url)
        if not h or not h.get("idle_prefill_pending"):
            return
        await asyncio.sleep(0.2)


# --turns: the servers a chat runs against, by name: their options
TURN_SERVERS = {"on": [], "noidle": ["--idle-prefill", "0"], "off": ["--prefix-cache-mb", "0"]}


def prefix_cache_rows(args, headers: dict) -> None:
    """--turns: the same chat against each of --servers; one table, a column group per server."""
    runs = {}
    for name in args.servers:
        extra = ["--prefix-cache-mb", str(args.prefix_cache_mb)] + TURN_SERVERS[name]
        proc, url = start_server(args, extra)
        try:
            asyncio.run(one_request_warmup(url, headers))
            asyncio.run(wait_idle(url))
            runs[name] = asyncio.run(chat_turns(url, args.turns, args.turn_tokens, args.max_tokens, headers,
                                                args.preamble_tokens, args.think_time))
        finally:
            proc.terminate()
            proc.wait(30)
    what = args.model or f"random weights, 3.6B shape with {args.layers} layers"
    print(f"\njneox serve ({what}, --dtype {args.dtype}, --threads {args.threads or 'default'}); one client, "
          f"{args.turns} turns of ~{args.turn_tokens} tokens (the first after ~{args.preamble_tokens}), "
          f"{args.max_tokens}-token greedy answers, {args.think_time:g} s think time; servers: "
          + ", ".join(f"{n} ({' '.join(TURN_SERVERS[n]) or 'the defaults'})" for n in args.servers) + "\n")
    names = list(runs)
    cached = [n for n in names if n != "off"]
    head = (["turn", "prompt tokens"] + [f"cached, {n}" for n in cached] + [f"TTFT {n} (s)" for n in names]
            + [f"prefill CPU-s {n}" for n in names] + [f"idle prefill CPU-s before, {n}" for n in cached])
    if "off" in runs:
        head += [f"speed-up {n} (TTFT / CPU)" for n in cached]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for i, first in enumerate(runs[names[0]]):
        r = {n: runs[n][i] for n in names}
        cells = [first["turn"], first["prompt_tokens"]] + [r[n]["cached"] for n in cached]
        cells += [f"{r[n]['ttft']:.2f}" for n in names] + [f"{r[n]['prefill_cpu']:.2f}" for n in names]
        cells += [f"{r[n]['idle_cpu']:.2f}" for n in cached]
        if "off" in runs:
            off = r["off"]
            cells += [f"{off['ttft'] / r[n]['ttft']:.1f}x / {off['prefill_cpu'] / max(r[n]['prefill_cpu'], 1e-9):.1f}x"
                      for n in cached]
        print("| " + " | ".join(map(str, cells)) + " |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    if args.model:
        model = args.model
    else:
        from decode_speed import bench_checkpoint  # here: the client side of this script never needs torch

        model = str(bench_checkpoint(args.work, args.layers))
    opts = ["--model", model, "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-queue",
            str(args.max_queue), "--model-name", "bench", "--log-level", "warning"]
    if args.threads:
        opts += ["--threads", str(args.threads)]
    if args.device:
        opts += ["--device", args.device]
    if args.speculate:
        opts += ["--speculate", args.speculate, "--draft-tokens", str(args.draft_tokens)]
    if args.max_prefill_tokens:
        opts += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    for name, folder in make_adapters(model, args.lora, args.lora_rank, args.work.expanduser()).items():
        opts += ["--lora", f"{name}={folder}"]
    return launch_server([*opts, *extra])


def make_adapters(model: str, count: int, rank: int, work: Path) -> dict[str, Path]:
    """``count`` PEFT adapters of rank ``rank`` with random (non-zero) updates for the checkpoint ``model``,
    written once into ``work``; {name: folder}."""
    if not count:
        return {}
    import torch

    from jneox.adapters import linear_shape, save_adapter
    from jneox.hub import resolve
    from jneox.loading import load_config
    from jneox.model import LINEARS

    config = load_config(resolve(model))
    out = {}
    for i in range(count):
        folder = work / f"lora-{config.num_layers}L-{config.hidden_size}-r{rank}-{i}"
        if not folder.exists():
            gen = torch.Generator().manual_seed(i)
            state = {}
            for layer in range(config.num_layers):
                for name in LINEARS:
                    fan_in, fan_out = linear_shape(config, name)
                    state[f"blocks.{layer}.{name}.lora_a"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
                    state[f"blocks.{layer}.{name}.lora_b"] = torch.randn(fan_out, rank, generator=gen) * 0.01
            save_adapter(folder, state, rank, alpha=2.0 * rank, base_model=model)
        out[f"lora{i}"] = folder
    return out


def launch_server(opts: list[str], timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """``jneox serve OPTS`` in a subprocess on a free loopback port, once its /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jneox", "serve", "--port", str(port), *opts])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server did not come up within {timeout:g} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--api-key", default=os.environ.get("JNEOX_API_KEY"))
    p.add_argument("--model", help="checkpoint folder or hub id (default: random weights, --layers)")
    p.add_argument("--layers", type=int, default=2, help="layers of the random 3.6B-shape model (default 2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", help="the server's --device (default: cpu)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("JNEOX_BENCH_DIR", "~/.cache/jneox/bench")))
    p.add_argument("--clients", default="1,4,16,64", help="client counts, one row each")
    p.add_argument("--duration", type=float, default=30, help="seconds each row keeps sending new requests")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens asked for per request")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-prefill-tokens", type=int, help="the server's --max-prefill-tokens (default: its own)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--task", default="chat", choices=("chat", "copy"),
                   help="chat: open questions (default); copy: questions on a passage in the prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="of every request (default 0.7, the card's)")
    p.add_argument("--speculate", metavar="lookup|DRAFT", help="the server's --speculate")
    p.add_argument("--draft-tokens", type=int, default=5, help="the server's --draft-tokens (default 5)")
    p.add_argument("--lora", type=int, default=0, metavar="N",
                   help="also run each row with the requests spread over N random LoRA adapters (default 0)")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of those adapters (default 16)")
    p.add_argument("--json-schema", type=Path, metavar="FILE",
                   help="every request's answer follows this JSON schema (response_format json_schema)")
    p.add_argument("--turns", type=int, help="measure prefix caching: one chat of this many turns, cache on and off")
    p.add_argument("--turn-tokens", type=int, default=200, help="with --turns: about this many tokens per user turn")
    p.add_argument("--preamble-tokens", type=int, default=0,
                   help="with --turns: about this many more tokens in the first turn (a long shared context)")
    p.add_argument("--prefix-cache-mb", type=float, default=2048, help="with --turns: the cached runs' budget")
    p.add_argument("--think-time", type=float, default=0, metavar="SECONDS",
                   help="with --turns: seconds the user reads each answer before sending the next turn (default 0)")
    p.add_argument("--servers", type=lambda v: v.split(","), default=["on", "off"],
                   help="with --turns: the servers to run the chat against, of " + ", ".join(TURN_SERVERS)
                        + " (default on,off)")
    args = p.parse_args()
    unknown = [n for n in args.servers if n not in TURN_SERVERS]
    if unknown:
        p.error(f"--servers {','.join(unknown)}: expected names of {', '.join(TURN_SERVERS)}")
    if args.turns:
        prefix_cache_rows(args, {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
        return
    questions = QUESTIONS
    if args.task == "copy":
        sys.path.insert(0, str(Path(__file__).parent))
        from speculative import task_questions

        questions = task_questions(12)["copy"]
    counts = [int(c) for c in args.clients.split(",")]
    extra = None
    if args.json_schema:
        schema = json.loads(args.json_schema.read_text(encoding="utf-8"))
        extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}}
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = []
    try:
        asyncio.run(one_request_warmup(url, headers))
        adapters = tuple(f"lora{i}" for i in range(args.lora))
        for n in counts:
            for models in (("bench",), adapters) if adapters else (("bench",),):
                rows.append(asyncio.run(run_clients(url, n, args.duration, args.max_tokens, headers, questions,
                                                    args.temperature, models, extra)))
                rows[-1]["adapters"] = 0 if models == ("bench",) else len(models)
                print(f"{n} clients over {models}: {rows[-1]['tok_s']:.1f} tok/s, {rows[-1]['errors']} errors",
                      file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    base = rows[0] if rows and rows[0]["clients"] == 1 and not args.lora else None
    what = args.model or f"random weights, 3.6B shape with {args.layers} layers"
    print(f"\njneox serve ({what}, --dtype {args.dtype}, --device {args.device or 'cpu'}, --max-batch {args.max_batch}, --max-queue {args.max_queue}); "
          f"{args.duration:.0f} s per row, {args.max_tokens} tokens per request, task {args.task}, temperature "
          f"{args.temperature:g}" + (f", --speculate {args.speculate} --draft-tokens {args.draft_tokens}"
                                     if args.speculate else "")
          + (f", answers constrained by the JSON schema {args.json_schema}" if args.json_schema else "") + "\n")
    print("| clients | requests | aggregate tok/s (vs 1) | decode tok/s (vs 1) | decode tok per CPU-s (vs 1) | "
          "time in prefill | TTFT p50 / p95 (s) | per-token p50 / p95 (ms) | guesses accepted | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        agg = f"{r['tok_s']:.1f}" + (f" ({r['tok_s'] / base['tok_s']:.1f}x)" if base else "")
        dec = f"{r['decode_tok_s']:.1f}" + (f" ({r['decode_tok_s'] / base['decode_tok_s']:.1f}x)" if base else "")
        cpu = f"{r['decode_tok_cpu_s']:.1f}" + (f" ({r['decode_tok_cpu_s'] / base['decode_tok_cpu_s']:.1f}x)" if base else "")
        clients = f"{r['clients']}" + (f" over {r['adapters']} adapters" if r["adapters"] else "")
        print(f"| {clients} | {r['requests']} | {agg} | {dec} | {cpu} | {r['prefill_share']:.0%} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {r['tpot_p50'] * 1e3:.0f} / {r['tpot_p95'] * 1e3:.0f} | "
              f"{'-' if r['accepted'] != r['accepted'] else format(r['accepted'], '.0%')} | {r['errors']} |")
    if base and not args.lora:
        print_targets(rows, base)
    if args.lora:
        print(f"\nLoRA (rank {args.lora_rank}): aggregate tok/s of the requests spread over {args.lora} adapters, as a "
              f"share of all on the base model")
        for plain, lora in zip(rows[::2], rows[1::2]):
            print(f"- {plain['clients']} clients: {lora['tok_s']:.1f} vs {plain['tok_s']:.1f} tok/s = "
                  f"{lora['tok_s'] / plain['tok_s']:.0%} (decode {lora['decode_tok_s'] / plain['decode_tok_s']:.0%})")
    for r in rows:
        if r["first_error"]:
            print(f"\n{r['clients']} clients, first error: {r['first_error']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def cpu_flags() -> str:
    """The CPU's AVX-512 and AMX flags (what the kernels' paths depend on), from /proc/cpuinfo."""
    try:
        words = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    return " ".join(sorted({w for w in words if w.startswith(("avx512", "amx"))})) or "none"


def print_targets(rows: list[dict], base: dict) -> None:
    """The server-load targets, judged from the one-client row: aggregate tok/s at least 5x one client's;
    TTFT p95 at most 3 (P + (N - 1) d), where P is one client's TTFT p50 (a prompt alone), d its per-token
    p50 (one decode step) and N - 1 the rows that can be ahead of a request in the queue; per-token p95 at
    most 2x its p50."""
    P, d = base["ttft_p50"], base["tpot_p50"]
    print(f"\nCPU flags: {cpu_flags()}")
    print(f"Targets (P = one client's TTFT p50 = {P:.2f} s, d = its per-token p50 = {d * 1e3:.0f} ms):")
    for r in rows:
        if r is base:
            continue
        n = r["clients"]
        allow = 3 * (P + (n - 1) * d)
        checks = [(f"aggregate {r['tok_s'] / base['tok_s']:.1f}x one client (>= 5x)", r["tok_s"] >= 5 * base["tok_s"]),
                  (f"TTFT p95 {r['ttft_p95']:.2f} s <= 3 (P + {n - 1} d) = {allow:.2f} s", r["ttft_p95"] <= allow),
                  (f"per-token p95 {r['tpot_p95'] * 1e3:.0f} ms <= 2 x p50 = {2 * r['tpot_p50'] * 1e3:.0f} ms",
                   r["tpot_p95"] <= 2 * r["tpot_p50"])]
        print(f"- {n} clients: " + "; ".join(f"{text}: {'met' if ok else 'MISSED'}" for text, ok in checks))


async def one_request_warmup(url: str, headers: dict) -> None:
    """One short request first, so that kernel compilation and first-touch costs stay out of the rows."""
    async with httpx.AsyncClient(timeout=600) as client:
        r = await one_request(client, url, 0, 4, headers)
        if "error" in r:
            raise SystemExit(f"warm-up request failed: {r['error']}")


if __name__ == "__main__":
    main()
