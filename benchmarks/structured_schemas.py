"""Structured output over many random JSON schemas: how many answers parse and validate.

Draws ``--schemas`` random schemas (objects and arrays, nested, with Japanese property names, string
fields of a bounded length, bounded integers, booleans, enums of Japanese strings), asks the model
for one answer per schema through the server's engine (all rows batched, each with its own
constraint), and checks every answer with ``json.loads`` and ``jsonschema.validate``. Prints the
counts, the finish reasons and the decode rate.

    python benchmarks/structured_schemas.py --model models/demo --schemas 1000

String fields without ``maxLength`` and unbounded numbers are left out on purpose: a model that never
learned JSON (the demo model, random weights) may write one until ``--max-tokens`` is reached (the
grammar allows any number of characters or digits), and the answer is then cut, not wrong. Needs ``jsonschema`` (the test extra).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter

import jsonschema
import torch

import jneox
from jneox.serve import Engine
from jneox.serve.constraints import Constraint, grammar_tokenizer, json_schema_grammar

KEYS = ["名前", "年齢", "住所", "趣味", "色", "値段", "メモ", "都市", "日付", "評価", "説明", "番号"]
WORDS = ["東京", "大阪", "赤", "青", "はい", "いいえ", "猫", "犬", "春", "夏"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random schema; the top level is an object or an array."""
    kinds = ["string", "integer", "boolean", "enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds[-2:] if depth == 0 else kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 16)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "integer":
        return {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 100, 10**6])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 4)}
    props = {k: random_schema(rng, depth + 1) for k in rng.sample(KEYS, rng.randint(1, 4))}
    return {"type": "object", "properties": props, "required": rng.sample(sorted(props), rng.randint(0, len(props))),
            "additionalProperties": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/demo")
    p.add_argument("--schemas", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model, tok = jneox.load(args.model, weights="float32")
    lt = grammar_tokenizer(tok)
    rng = random.Random(args.seed)
    schemas = [random_schema(rng) for _ in range(args.schemas)]
    engine = Engine(model, tok, max_batch=args.max_batch, max_queue=args.schemas).start()
    prompt = tok.encode(jneox.chat.format_prompt([("ユーザー", "次の形のJSONで答えてください。")]))
    texts = [""] * len(schemas)
    finish: list[str | None] = [None] * len(schemas)
    done = threading.Semaphore(0)

    def listener(i):
        def on(event):
            texts[i] += event.text
            if event.final:
                finish[i] = event.finish_reason or f"error: {event.error}"
                done.release()
        return on

    t0 = time.perf_counter()
    for i, s in enumerate(schemas):
        params = jneox.SamplingParams(temperature=args.temperature, max_new_tokens=args.max_tokens, seed=i)
        engine.submit(prompt, params, listener(i), constraint=Constraint(lt, json_schema_grammar(s)))
    for _ in schemas:
        done.acquire()
    wall = time.perf_counter() - t0
    engine.stop()
    parsed = valid = 0
    failures = []
    for s, text in zip(schemas, texts):
        try:
            value = json.loads(text)
            parsed += 1
            jsonschema.validate(value, s)
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            failures.append((s, text, str(e)[:200]))
    stats = engine.stats()
    print(f"{len(schemas)} random schemas, {args.model}, temperature {args.temperature:g}, max_tokens "
          f"{args.max_tokens}, --max-batch {args.max_batch}, torch threads {torch.get_num_threads()}")
    print(f"parsed: {parsed}/{len(schemas)}, validated: {valid}/{len(schemas)}, finish reasons: {dict(Counter(finish))}")
    print(f"{stats['decode_tokens']} tokens decoded in {wall:.0f} s ({stats['decode_tokens'] / stats['decode_s']:.0f} "
          f"decode tok/s)")
    for s, text, err in failures[:5]:
        print("FAILED", json.dumps(s, ensure_ascii=False), repr(text[:200]), err, file=sys.stderr)
    if valid < len(schemas):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
