"""Structured output: answers follow a JSON schema, a regex, a choice list or a grammar (OpenAI's
``response_format``, vLLM's ``structured_outputs`` and ``guided_*``), each row with its own constraint.

The tiny model writes random text; what is checked is that whatever it writes follows the constraint
(validated by ``jsonschema``, ``re``), that it ends only where the grammar is complete, and that rows
without a constraint keep the tokens they get alone.
"""
from __future__ import annotations

import importlib.util
import json
import re
import threading
from pathlib import Path

import httpx
import pytest
from serve_fixtures import API_KEY, client, live, reference, serve_checkpoint, start_server  # noqa: F401

import jneox
from jneox.serve.constraints import Constraint, choice_grammar, grammar_tokenizer, json_schema_grammar
from jneox.speculative import PromptLookup

jsonschema = pytest.importorskip("jsonschema")
hypothesis = pytest.importorskip("hypothesis")
hypothesis_jsonschema = pytest.importorskip("hypothesis_jsonschema")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
# strings are bounded: a random model rarely closes a string by itself
PERSON = {"type": "object", "properties": {"名前": {"type": "string", "maxLength": 6},
                                           "年齢": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "会員": {"type": "boolean"},
                                           "色": {"enum": ["赤", "青", "緑"]}},
          "required": ["名前", "年齢", "会員", "色"], "additionalProperties": False}


def post(live, path, body, timeout=120):
    return httpx.post(live.url + path, json=body, headers=HEADERS, timeout=timeout)


def chat(live, **fields):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 200, "seed": 1,
            **fields}
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def complete(live, **fields):
    body = {"model": "tiny", "prompt": "日本の", "max_tokens": 200, "seed": 2, **fields}
    r = post(live, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


# ---- the vocabulary as the grammar engine reads it ---------------------------------------------------
def test_grammar_engine_sees_each_token_as_jneox_decodes_it(reference):
    """llguidance's byte table (from tokenizer.json) equals jneox's decoding for every text token; <NL> is a
    newline. (A mask built on other bytes would allow text the detokenizer does not write.)"""
    _, tok = reference
    lt = grammar_tokenizer(tok)
    for i in range(tok.vocab_size):
        if lt.is_special_token(i) or tok.id_to_piece(i) == "<0xFF>":  # 0xFF never occurs in UTF-8 text
            continue
        assert lt.decode_bytes([i]) == tok.decode_bytes([i]), (i, tok.id_to_piece(i))
    assert lt.decode_bytes([tok.nl_id]) == b"\n"


def _accepts(tok, grammar: str, text: str) -> bool:
    """Whether the matcher takes ``text``'s tokens (jneox's own tokenization) and then the end."""
    c = Constraint(grammar_tokenizer(tok), grammar)
    try:
        for t in [*tok.encode(text), tok.eos_id]:
            c.accept(t)
    except jneox.errors.JneoxError:
        return False
    return True


def _benchmark(name: str):
    """A script of benchmarks/ as a module (the random schemas' subset is defined there, beside the run
    that measures answers to them)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[2] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# with strings of any length and numbers of any size: the grammar, not a model, writes nothing here
SCHEMAS = _benchmark("structured_schemas").schema_strategy(bounded=False)


def _in_schema_order(value, schema):
    """``value`` with each object's properties in its schema's order, then any others (the order llguidance
    writes)."""
    if isinstance(value, dict):
        props = schema["properties"]
        return {**{k: _in_schema_order(value[k], props[k]) for k in props if k in value},
                **{k: v for k, v in value.items() if k not in props}}
    if isinstance(value, list):
        return [_in_schema_order(v, schema["items"]) for v in value]
    return value


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_schema_instances_are_accepted(reference, data):
    """Every instance of a random schema (Japanese keys, strings of any UTF-8 text, newlines, quotes and
    control characters in them, further properties of any JSON where the schema allows them, written as
    json.dumps writes it) is accepted token by token, in jneox's own tokenization. hypothesis-jsonschema
    draws both the schema and the instance."""
    _, tok = reference
    schema = data.draw(SCHEMAS)
    # codec: text that UTF-8 can encode, so no lone surrogate (which json.dumps would write as is)
    value = _in_schema_order(data.draw(hypothesis_jsonschema.from_schema(schema, codec="utf-8")), schema)
    jsonschema.validate(value, schema)
    # llguidance's JSON strings take DEL (U+007F) only escaped (JSON allows it either way; json.dumps
    # writes it raw): the same value, written the way the grammar allows
    text = json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    assert _accepts(tok, json_schema_grammar(schema), text), (schema, text)


def test_del_is_written_escaped(reference):
    """A string holding DEL: the grammar takes its escape, not the raw character (llguidance's rule)."""
    _, tok = reference
    g = json_schema_grammar({"type": "object", "properties": {"メモ": {"type": "string", "maxLength": 2}},
                             "required": ["メモ"], "additionalProperties": False})
    assert _accepts(tok, g, '{"メモ": "あ\\u007f"}')
    assert not _accepts(tok, g, '{"メモ": "あ\x7f"}')


def test_invalid_instances_are_refused(reference):
    _, tok = reference
    g = json_schema_grammar(PERSON)
    assert _accepts(tok, g, '{"名前": "山田", "年齢": 42, "会員": true, "色": "赤"}')
    assert not _accepts(tok, g, '{"名前": "山田", "年齢": 42, "会員": true}')  # incomplete: no end there
    assert not _accepts(tok, g, '{"名前": "山田\n", "年齢": 42, "会員": true, "色": "赤"}')  # raw newline
    assert not _accepts(tok, choice_grammar(["はい", "いいえ"]), "はいはい")


# ---- through the server ---------------------------------------------------------------------------
def test_json_schema_chat(live):
    choice = chat(live, response_format={"type": "json_schema",
                                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


@pytest.mark.parametrize("field", ["structured_outputs", "guided_json"])
def test_json_schema_completions(live, field):
    body = {"structured_outputs": {"json": PERSON}} if field == "structured_outputs" else {"guided_json": PERSON}
    for seed in range(3):
        choice = complete(live, seed=seed, **body)
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), PERSON)


def test_json_object(live):
    choice = chat(live, response_format={"type": "json_object"}, max_tokens=400, temperature=0)
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # the random model may not close the object in time; what it wrote is still an object's prefix
        assert choice["message"]["content"].startswith("{")


@pytest.mark.parametrize("field", ["structured_outputs", "guided_choice"])
def test_choice(live, field):
    options = ["はい", "いいえ", "たぶん"]
    body = {"structured_outputs": {"choice": options}} if field == "structured_outputs" else {"guided_choice": options}
    seen = set()
    for seed in range(6):
        choice = complete(live, seed=seed, **body)
        assert choice["text"] in options and choice["finish_reason"] == "stop"
        seen.add(choice["text"])
    assert len(seen) > 1  # the model's choice, not always the first


def test_each_prompt_of_a_completion_is_constrained(live):
    r = post(live, "/v1/completions", {"model": "tiny", "prompt": ["日本の", "東京は", "今日は"], "max_tokens": 50,
                                       "seed": 4, "guided_choice": ["はい", "いいえ"]})
    assert [c["text"] in ("はい", "いいえ") for c in r.json()["choices"]] == [True] * 3


@pytest.mark.parametrize("field", ["structured_outputs", "guided_regex"])
def test_regex(live, field):
    pattern = r"[0-9]{3}-[0-9]{4}(号室)?"
    body = {"structured_outputs": {"regex": pattern}} if field == "structured_outputs" else {"guided_regex": pattern}
    for seed in range(3):
        choice = chat(live, seed=seed, **body)
        assert re.fullmatch(pattern, choice["message"]["content"]), choice
        assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("grammar", ['start: "東京" | "大阪" ("府")?', 'root ::= "東京" | "大阪" "府"?'])
def test_grammar(live, grammar):
    for seed in range(3):
        text = complete(live, seed=seed, guided_grammar=grammar)["text"]
        assert text in ("東京", "大阪", "大阪府")


def test_streamed_json(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "こんにちは"}],
                                            max_tokens=200, seed=3, stream=True,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "p", "schema": PERSON}})
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(parts)), PERSON)


def test_rows_without_constraint_keep_their_tokens(live):
    """Constrained and unconstrained requests decode together; the unconstrained ones give the tokens they
    give alone (the row promise), and the constrained ones validate."""
    plain = [{"model": "tiny", "prompt": p, "max_tokens": 24, "temperature": 0.8, "seed": i}
             for i, p in enumerate(["日本の", "東京は", "今日は"])]
    alone = [post(live, "/v1/completions", b).json()["choices"][0]["text"] for b in plain]
    constrained = {"model": "tiny", "prompt": "日本の", "max_tokens": 200, "seed": 9, "guided_json": PERSON}
    results: dict = {}
    steps = live.engine.steps

    def go(key, body):
        results[key] = post(live, "/v1/completions", body).json()["choices"][0]

    threads = [threading.Thread(target=go, args=(("c", i), constrained)) for i in range(2)]
    threads += [threading.Thread(target=go, args=(("p", i), b)) for i, b in enumerate(plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert live.engine.steps > steps
    assert [results[("p", i)]["text"] for i in range(3)] == alone
    for i in range(2):
        jsonschema.validate(json.loads(results[("c", i)]["text"]), PERSON)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": {"type": "objectx"}}, "guided_json"),
    ({"structured_outputs": {"json": {"properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}}},
     "structured_outputs.json"),
    ({"structured_outputs": "json"}, "structured_outputs"),
    ({"guided_regex": "[0-9"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "a"}, "guided_regex"),
])
def test_bad_constraints_are_400(live, body, param):
    r = post(live, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_constrained_rows_do_not_speculate(serve_checkpoint):
    """With the server's --speculate, a constrained row decodes plainly (a guess would skip the mask):
    its answers still validate, and no guess is checked for it."""
    server = start_server(serve_checkpoint, draft=PromptLookup(4))
    try:
        for seed in range(2):
            r = post(server, "/v1/completions", {"model": "tiny", "prompt": "日本の日本の日本の", "max_tokens": 200,
                                                 "seed": seed, "temperature": 0, "guided_json": PERSON})
            jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), PERSON)
        assert server.engine.stats()["draft_proposed"] == 0
    finally:
        server.stop()
