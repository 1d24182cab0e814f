"""Structured output over many random JSON schemas: how many answers parse and validate.

Draws ``--schemas`` random schemas with hypothesis-jsonschema from :func:`schema_subset`, a JSON
Schema whose instances are JSON schemas (objects and arrays, nested, with Japanese property names,
string fields of a bounded length, some of them Japanese text by their ``pattern``, bounded integers,
booleans, enums of Japanese strings), asks the model for one answer per schema through the server's
engine (all rows batched, each with its own constraint), and checks every answer with ``json.loads``
and ``jsonschema.validate``. Prints the counts, the finish reasons and the decode rate.

    python benchmarks/structured_schemas.py --model models/demo --schemas 1000

String fields without ``maxLength`` and unbounded numbers are left out on purpose: a model that never
learned JSON (the demo model, random weights) may write one until ``--max-tokens`` is reached (the
grammar allows any number of characters or digits), and the answer is then cut, not wrong.
tests/serve/test_structured_output.py draws from the same subset with them (``bounded=False``).
Needs ``jsonschema``, ``hypothesis`` and ``hypothesis-jsonschema`` (the test extra).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter

import hypothesis
import hypothesis_jsonschema
import jsonschema
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import jneox
from jneox.serve import Engine
from jneox.serve.constraints import Constraint, grammar_tokenizer, json_schema_grammar

KEYS = ["名前", "年齢", "住所", "趣味", "色", "値段", "メモ", "都市", "日付", "評価", "説明", "番号"]
WORDS = ["東京", "大阪", "赤", "青", "はい", "いいえ", "猫", "犬", "春", "夏", "カタカナ", "「引用」"]
# Japanese text: kana and a few kanji (a class of all kanji makes hypothesis's regex strategy slow)
JAPANESE = "^[ぁ-んァ-ヶー日本語東京大阪漢字、。「」]*$"


def _closed(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def schema_subset(bounded: bool = True, depth: int = 2) -> dict:
    """A JSON Schema whose instances are the JSON schemas drawn here: an object or an array at the top,
    ``depth`` levels of objects and arrays, leaves as listed in the module's docstring. ``bounded``
    requires every string a ``maxLength`` and every integer a range, leaves out numbers and closes every
    object (``additionalProperties: false``): what a model that never learned JSON can finish. Without
    it those bounds are optional, and an object may take further properties of any JSON. Written out
    level by level: hypothesis-jsonschema does not follow recursive references."""
    def leaf(kind: dict, optional: dict, bounds: list[str]) -> dict:
        return _closed({**kind, **optional}, [*kind, *(bounds if bounded else [])])

    max_length = {"maxLength": {"type": "integer", "minimum": 1, "maximum": 16}}
    nodes = [leaf({"type": {"const": "boolean"}}, {}, []),
             leaf({"type": {"const": "integer"}}, {"minimum": {"type": "integer", "minimum": -1000, "maximum": 0},
                                                   "maximum": {"type": "integer", "minimum": 1, "maximum": 10**6}},
                  ["minimum", "maximum"]),
             leaf({"type": {"const": "string"}}, max_length, ["maxLength"]),
             leaf({"type": {"const": "string"}, "pattern": {"const": JAPANESE}}, max_length, ["maxLength"]),
             leaf({"enum": {"type": "array", "items": {"enum": WORDS}, "minItems": 1, "maxItems": 4,
                            "uniqueItems": True}}, {}, [])]
    if not bounded:
        nodes.append(leaf({"type": {"const": "number"}}, {}, []))
    for _ in range(depth):
        node = {"oneOf": nodes}  # the kinds exclude each other: oneOf draws faster than anyOf
        containers = [
            _closed({"type": {"const": "object"},
                     "properties": {"type": "object", "propertyNames": {"enum": KEYS}, "additionalProperties": node,
                                    "minProperties": 1, "maxProperties": 4},
                     "required": {"type": "array", "items": {"enum": KEYS}, "uniqueItems": True, "maxItems": 4},
                     "additionalProperties": {"const": False}},
                    ["type", "properties", "required", *(["additionalProperties"] if bounded else [])]),
            _closed({"type": {"const": "array"}, "items": node,
                     "maxItems": {"type": "integer", "minimum": 1, "maximum": 4}}, ["type", "items", "maxItems"])]
        nodes = nodes + containers
    return {"oneOf": containers}


def _own_required(schema):
    """``schema`` with each object's ``required`` cut to its own properties (what the subset cannot say;
    a closed object requiring a name it has no property for has no instance)."""
    if not isinstance(schema, dict):
        return schema
    out = {k: {n: _own_required(v) for n, v in s.items()} if k == "properties" else _own_required(s)
           for k, s in schema.items()}
    if "required" in out:
        out["required"] = [k for k in out["required"] if k in out["properties"]]
    return out


def schema_strategy(bounded: bool = True) -> st.SearchStrategy[dict]:
    """Random schemas of :func:`schema_subset`, drawn by hypothesis-jsonschema."""
    return hypothesis_jsonschema.from_schema(schema_subset(bounded)).map(_own_required)


def draw(strategy: st.SearchStrategy, n: int, seed: int) -> list:
    """``n`` values of ``strategy``, the same ones for the same seed."""
    out: list = []

    def collect(value):
        out.append(value)

    round_ = 0
    while len(out) < n:  # hypothesis may stop a round early when it thinks it has seen enough
        run = settings(max_examples=n - len(out), database=None, deadline=None, phases=[Phase.generate],
                       suppress_health_check=list(HealthCheck))(given(strategy)(collect))
        hypothesis.seed(seed + round_)(run)()
        round_ += 1
    return out[:n]


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
    t0 = time.process_time()
    schemas = draw(schema_strategy(), args.schemas, args.seed)
    draw_s = time.process_time() - t0
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
    distinct = len({json.dumps(s, sort_keys=True) for s in schemas})
    n = len(schemas)
    print(f"{n} random schemas ({distinct} distinct, drawn in {draw_s:.0f} CPU-s), {args.model}, temperature "
          f"{args.temperature:g}, max_tokens {args.max_tokens}, --max-batch {args.max_batch}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"parsed: {parsed}/{n} ({100 * parsed / n:.1f}%), validated: {valid}/{n} ({100 * valid / n:.1f}%), "
          f"finish reasons: {dict(Counter(finish))}")
    print(f"{stats['decode_tokens']} tokens decoded in {wall:.0f} s ({stats['decode_tokens'] / stats['decode_s']:.0f} "
          f"decode tok/s)")
    for s, text, err in failures[:5]:
        print("FAILED", json.dumps(s, ensure_ascii=False), repr(text[:200]), err, file=sys.stderr)
    if valid < len(schemas):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
