"""``jneox chat``, ``jneox generate`` and ``jneox serve``."""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..adapters import load_adapter
from ..chat import SYSTEM, TURN_STOP, USER, ChatSession, format_prompt
from ..errors import UsageError
from ..files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..generate import stream
from ..loading import served_model_id
from ..serve import serve
from ..serve.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from ..serve.protocol import DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT_S
from ..serve.scheduler import DEFAULT_IDLE_PREFILL, DEFAULT_MAX_PREFILL_TOKENS, KV_MEMORY_SHARE
from .args import (add_generation_config_arg, add_model_args, add_sampling_args, add_speculate_args, at_least,
                   draft_from_args, generation_defaults_from_args, load_from_args, sampling_params)


def cmd_chat(args) -> int:
    sampling_params(args)  # bad flags fail before the model loads
    model, tokenizer = load_from_args(args)
    params = sampling_params(args, generation_defaults_from_args(args))
    session = ChatSession(model, tokenizer, params, draft=draft_from_args(args, tokenizer))
    interactive = sys.stdin.isatty()
    if interactive:
        print("jneox chat: /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(f"{USER}: " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        before = session.dropped_turns
        sys.stdout.write(f"{SYSTEM}: ")
        sys.stdout.flush()
        try:
            for piece in session.ask(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this answer, keep chatting
        sys.stdout.write("\n")
        sys.stdout.flush()
        if session.dropped_turns > before:
            print(f"(the {session.dropped_turns - before} oldest turns no longer fit the context window "
                  f"and were dropped)", file=sys.stderr)


def cmd_generate(args) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    sampling_params(args)  # bad flags fail before the model loads
    model, tokenizer = load_from_args(args)
    params = sampling_params(args, generation_defaults_from_args(args))
    prompt = text if args.raw else format_prompt([{"speaker": USER, "text": text}])
    if not args.raw:
        params = params.with_(stop=(*params.stop, TURN_STOP))
    t0 = time.perf_counter()
    for piece in stream(model, tokenizer, prompt, params, draft=draft_from_args(args, tokenizer)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print(f"({time.perf_counter() - t0:.2f} s)", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"jneox serve: warning: listening on {args.host} without --api-key: anyone who can reach it "
              f"can use it", file=sys.stderr)
    model, tokenizer = load_from_args(args)
    draft = draft_from_args(args, tokenizer)
    model_id = served_model_id(args.model, args.model_name)
    names = [name for name, _ in args.lora]
    for name in names:
        if name == model_id or names.count(name) > 1:
            raise UsageError(f"--lora {name}=...: the name is " + ("the base model's id" if name == model_id else
                             "given twice") + "; give each adapter a name of its own")
    adapters = [load_adapter(folder, model.config, name, model.embed.weight.device) for name, folder in args.lora]
    serve(model, tokenizer, model_id=model_id, host=args.host, port=args.port,
          api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue, log_level=args.log_level,
          allowed_hosts=args.allowed_host, cors_origins=args.cors_origin,
          request_timeout=args.request_timeout or None, shutdown_timeout=args.shutdown_timeout,
          default_max_tokens=args.default_max_tokens, draft=draft, read_timeout=args.read_timeout or None,
          max_connections=args.max_connections, adapters=adapters, prefix_cache_mb=args.prefix_cache_mb,
          generation_defaults=generation_defaults_from_args(args), kv_cache_gb=args.kv_cache_gb,
          max_prefill_tokens=args.max_prefill_tokens, idle_prefill=args.idle_prefill)
    return 0


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive, streaming, multi-turn chat (reads stdin lines when piped)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer one question (or continue a raw prompt with --raw)")
    p.add_argument("text", help="the question, or '-' to read it from stdin")
    p.add_argument("--raw", action="store_true", help="feed the text verbatim as the prompt, no conversation format")
    p.add_argument("--verbose", "-v", action="store_true")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)


def lora_spec(text: str) -> tuple[str, str]:
    """``NAME=DIR`` of ``--lora``."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (a PEFT adapter folder), got {text!r}")
    return name, folder


def add_serve_parser(sub) -> None:
    """Every flag of ``jneox serve``."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with batched decoding and a chat page at /")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("JNEOX_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and the tokenizer endpoints "
                        "(default: $JNEOX_API_KEY, else no key). Prefer setting JNEOX_API_KEY: a key given "
                        "here is visible to every user of the machine in the process list (ps)")
    p.add_argument("--max-batch", type=at_least(1), default=8, help="requests decoded together (KV cache slots; default 8)")
    p.add_argument("--kv-cache-gb", type=float, metavar="GB",
                   help="KV cache that running requests may reserve together (each its prompt plus max_tokens); "
                        f"a request past it waits for room (default: {KV_MEMORY_SHARE * 100:.0f}%% of the memory available "
                        "once the model is loaded)")
    p.add_argument("--max-prefill-tokens", type=at_least(1), default=DEFAULT_MAX_PREFILL_TOKENS, metavar="N",
                   help="prompt tokens computed per engine step beside the running requests' tokens, in whole "
                        f"chunks (default {DEFAULT_MAX_PREFILL_TOKENS})")
    p.add_argument("--max-queue", type=at_least(0), default=32,
                   help="requests that may wait for a slot; past that the server answers 429 (default 32)")
    p.add_argument("--model-name", help="the model id reported by /v1/models (default: --model)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (info logs every request)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also accept requests whose Host header is NAME (may be repeated; '*': any). By default "
                        "only the --host address (and localhost on loopback) is, which stops DNS rebinding")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://example.com; '*': any) call the API "
                        "(may be repeated; default: none)")
    p.add_argument("--request-timeout", type=at_least(0, float), default=0, metavar="S",
                   help="end a request that has not finished after S seconds, queueing included (default 0: no limit)")
    p.add_argument("--read-timeout", type=at_least(0, float), default=DEFAULT_READ_TIMEOUT_S, metavar="S",
                   help="close a connection whose request (headers and body) has not all arrived S seconds "
                        f"after it began (default {DEFAULT_READ_TIMEOUT_S:g}; 0: no limit)")
    p.add_argument("--max-connections", type=at_least(1), metavar="N",
                   help="connections open at once; more are closed as soon as they are accepted (default "
                        f"{DEFAULT_MAX_CONNECTIONS}, fewer when ulimit -n is lower)")
    p.add_argument("--shutdown-timeout", type=at_least(0, float), default=30, metavar="S",
                   help="on SIGTERM/Ctrl-C, let accepted requests finish for up to S seconds (default 30)")
    p.add_argument("--default-max-tokens", type=at_least(1), metavar="N",
                   help="longest answer when a request gives no max_tokens (default 512; never past the window)")
    p.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="NAME=DIR",
                   help=f"serve the PEFT LoRA adapter in DIR ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) as model NAME "
                        "beside the base model: a request's model field picks one (may be repeated)")
    p.add_argument("--prefix-cache-mb", type=at_least(0, float), default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                   help="keep the keys and values of prompt prefixes, up to MB megabytes, for later prompts that "
                        f"start the same way (default {DEFAULT_PREFIX_CACHE_MB}; 0: off)")
    p.add_argument("--idle-prefill", type=at_least(0), default=DEFAULT_IDLE_PREFILL, metavar="N",
                   help="while no request is waiting or running, prefill the follow-up of the N most recently "
                        "finished answers (the conversation so far) into the prefix cache, so that a chat's next "
                        f"turn computes only its new text (default {DEFAULT_IDLE_PREFILL}; 0: off)")
    add_generation_config_arg(p)
    add_speculate_args(p)
    p.set_defaults(func=cmd_serve)
