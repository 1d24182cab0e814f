"""Property-based tests (hypothesis): the request parser answers any JSON with a request or a 4xx in
OpenAI's error shape, never an unexpected exception (a 500); the tokenizer round-trips any text."""
from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_fixtures import API_KEY, WINDOW, live, serve_checkpoint  # noqa: F401

from jneox.serve.protocol import APIError, GenerationRequest, parse_chat, parse_completion, parse_json
from jneox.tokenizer import NL

# every field the parser reads, and a few it ignores
FIELDS = ["messages", "prompt", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "repetition_penalty", "n", "frequency_penalty", "presence_penalty", "stop", "seed", "stream",
          "stream_options", "logprobs", "echo", "suffix", "user"]
# any JSON value Python's json reads: NaN and infinities too, integers past any float, lone surrogates
TEXT = st.text(st.characters(exclude_categories=[]), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=8)
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system"]) | JSON,
                                              "content": JSON | TEXT, "name": JSON})
CHAT_BODY = {"messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 4}
COMPLETION_BODY = {"prompt": "山", "max_tokens": 4}
BODIES = st.one_of(
    JSON,  # the whole body any value
    st.builds(lambda fields: {**CHAT_BODY, **fields}, st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3)),
    st.builds(lambda fields: {**COMPLETION_BODY, **fields}, st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3)),
    st.builds(lambda ms: {**CHAT_BODY, "messages": ms}, st.lists(MESSAGE, max_size=3)),
)


def check_openai_error(e: APIError) -> None:
    assert 400 <= e.status < 500, (e.status, e.message)
    error = e.body()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["param"], (str, type(None)))
    json.dumps(e.body())  # it can be sent


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_parser_answers_any_json_with_a_request_or_a_4xx(tokenizer, body):
    raw = json.dumps(body).encode()  # as a client sends it (ensure_ascii: lone surrogates as \ud800 escapes)
    for parse in (parse_chat, parse_completion):
        try:
            req = parse(parse_json(raw), tokenizer, WINDOW)
        except APIError as e:
            check_openai_error(e)
        else:
            for r in req if isinstance(req, list) else [req]:  # completions: one request per prompt
                assert isinstance(r, GenerationRequest)
                assert 0 < len(r.prompt_ids) < WINDOW
                assert 1 <= r.params.max_new_tokens <= WINDOW - len(r.prompt_ids)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_server_answers_any_json_without_a_500(live, body, path):
    """The whole path (middleware, body reading, parsing, the engine's own checks) over HTTP."""
    r = httpx.post(live.url + path, content=json.dumps(body).encode(), timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"


# ---- the tokenizer ------------------------------------------------------------------------------------
# Unicode text: every code point except the surrogates (a lone surrogate is not text; UTF-8 cannot hold it)
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
# the pieces where the card's tokenizer is not the identity, mixed in so that hypothesis meets them
SPECIAL = st.sampled_from(["\n", "\r\n", "\r", NL, "<NL", "\u2581", " ", "  ", "<s>", "</s>", "<unk>", "<0x41>",
                           "\x00", "😀", "𠮷", "\ufeff"])
MIXED = st.lists(ANY_TEXT | SPECIAL, max_size=8).map("".join)


def card_text(text: str) -> str:
    """What the tokenizer keeps of ``text``: the card writes a newline as <NL> (so a literal "<NL>" in the
    text comes back as a newline too, and "\\r\\n" as "\\n"), and sentencepiece's space symbol "▁"
    (U+2581) comes back as the space it stands for. Everything else comes back exactly, byte fallback
    included (no <unk>)."""
    return text.replace("\r\n", "\n").replace(NL, "\n").replace("\u2581", " ")


@settings(max_examples=300, deadline=None)
@given(text=MIXED)
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == card_text(text)
    dec = tokenizer.stream_decoder()
    pushed = [dec.push(i) for i in ids]
    assert "".join(pushed) + dec.flush() == card_text(text)
    assert all("\ufffd" not in p for p in pushed) or "\ufffd" in text  # no half characters on the way


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 999), max_size=30))
def test_stream_decoder_equals_decode_for_any_ids(tokenizer, ids):
    """Any id sequence, e.g. byte pieces that are no valid UTF-8: streaming gives what decode gives."""
    ids = [i for i in ids if i < tokenizer.vocab_size]
    dec = tokenizer.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tokenizer.decode(ids)


def test_round_trip_property_is_not_vacuous(tokenizer):
    """The three exceptions in card_text are real (if the tokenizer changed, the property must be restated)."""
    for text in ("a\r\nb", "a<NL>b", "a\u2581b"):
        assert tokenizer.decode(tokenizer.encode(text)) != text
    assert tokenizer.decode(tokenizer.encode("a\rb <s>\x00😀")) == "a\rb <s>\x00😀"
