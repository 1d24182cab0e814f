"""The OpenAI request fields jneox understands, checked by hand so every mistake gets a 4xx that names it.

OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``. Unknown fields are
ignored (clients send many); fields jneox cannot honour (``n`` > 1, non-zero frequency/presence
penalties, a non-empty ``logit_bias``, ``echo`` in chat, ``stream`` with several prompts) are refused
rather than silently ignored.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable

from ..chat import SYSTEM, TURN_STOP, USER, Utterance, follow_up, format_prompt
from ..sampling import SamplingParams
from .constraints import (Constraint, ConstraintError, choice_grammar, grammar_tokenizer, json_object_grammar,
                          json_schema_grammar, lark_grammar, regex_grammar)

MAX_BODY_BYTES = 1 << 20
# connection limits (enforced by jneox.serve.limits): seconds to receive a request's headers and
# body, and connections open at once
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 1000
# what an answer may cost when the request does not say: the rest of the window is ~2000 tokens on
# the 3.6B model, minutes per request on a CPU (other servers cap the default too)
DEFAULT_MAX_TOKENS = 512
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit for both endpoints)
SYSTEM_ROLES = ("system", "developer")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def too_large(size: str) -> APIError:
    """413 for a body of ``size`` (e.g. "2097152 bytes", "more than 1048576 bytes")."""
    return APIError(413, f"the request body is {size}; at most {MAX_BODY_BYTES} bytes are accepted",
                    code="request_too_large")


def parse_json(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise too_large(f"{len(raw)} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not valid UTF-8 (byte {e.start}: {e.reason})", code="invalid_utf8") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                  code="invalid_json") from None
    except (ValueError, RecursionError) as e:  # a number too long to convert, nesting too deep
        raise bad(f"the request body cannot be read as JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    if _SURROGATE_ESCAPE.search(text):  # "\ud800" unpaired is a string no text encoding can hold
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad("the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair)",
                      code="invalid_utf8") from None
    return body


# ---- typed field readers ----------------------------------------------------------------------
def _type_name(v) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _number(body: dict, name: str, default, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(f"{name} must be {kind}, got {_type_name(v)} {v!r}"[:200], name, "invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(f"{name} must be finite, got {v!r}", name, "invalid_value")
    if not integer and abs(v) > 1e300:  # an integer too large for a float (JSON has no limit)
        raise bad(f"{name} is out of range, got {str(v)[:40]}", name, "invalid_value")
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
        hi_s = "" if hi is None else f"{hi}]"
        where = f"in {lo_s}, {hi_s}" if lo is not None and hi is not None else (f">{'' if lo_open else '='} {lo}" if lo is not None else f"<= {hi}")
        raise bad(f"{name} must be {where}, got {v!r}", name, "invalid_value")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{name} must be a boolean, got {_type_name(v)}", name, "invalid_type")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise bad(f"stop must be a string or an array of strings, got {_type_name(v)}", "stop", "invalid_type")
    if len(v) > MAX_STOP_STRINGS:
        raise bad(f"stop has {len(v)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop", "invalid_value")
    for s in v:
        if not isinstance(s, str) or not s:
            raise bad(f"stop must hold non-empty strings, got {_type_name(s)} {str(s)[:40]!r}", "stop", "invalid_value")
        if len(s) > MAX_STOP_CHARS:
            raise bad(f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed", "stop",
                      "invalid_value")
    return tuple(dict.fromkeys(v))


def _refuse_unsupported(body: dict) -> None:
    n = _number(body, "n", 1, integer=True)
    if n != 1:
        raise bad(f"n must be 1 (one answer per request), got {n}", "n", "unsupported")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0) != 0:
            raise bad(f"{name} is not supported; use repetition_penalty (> 1 penalizes repeats)", name, "unsupported")
    if body.get("logit_bias") not in (None, {}):
        raise bad("logit_bias is not supported (the sampler applies no per-token bias); leave it out",
                  "logit_bias", "unsupported")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {_type_name(model)}", "model", "invalid_type")


@dataclass
class GenerationRequest:
    """A validated request: the prompt's token ids, how to sample, how to answer."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and its k best alternatives
    echo: bool = False  # the answer starts with the prompt (and its tokens' logprobs, if asked for)
    generate: bool = True  # False: max_tokens 0 with echo, the prompt is only scored
    speculate: bool = True  # jneox's own field: false decodes without the server's --speculate
    constraint: Constraint | None = None  # structured output: the grammar the answer follows
    # the token ids the next prompt of the conversation starts with, from the answer's text (the engine's
    # idle prefill; None: the prompt's ids and the answer's)
    follow_up: Callable[[str], list[int]] | None = None


def sampling(body: dict, prompt_len: int, window: int, extra_stop: tuple[str, ...] = (),
             prompt_param: str = "prompt", default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
    """SamplingParams from the request's fields; ``max_tokens`` defaults to ``default_max_tokens`` or the
    rest of the window, whichever is smaller."""
    if prompt_len == 0:
        raise bad("the prompt is empty", prompt_param, "invalid_value")
    if prompt_len >= window:
        raise bad(f"the prompt has {prompt_len} tokens; the context window is {window} tokens and at least one "
                  f"must be left for the answer", prompt_param, "context_length_exceeded")
    temperature = _number(body, "temperature", SamplingParams.temperature, 0, 2)  # the card's 0.7
    top_p = _number(body, "top_p", 1.0, 0, 1, lo_open=True)
    top_k = _number(body, "top_k", 0, -1, integer=True)
    penalty = _number(body, "repetition_penalty", 1.0, 0, lo_open=True)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, min(default_max_tokens, window - prompt_len), 1, integer=True)
    if prompt_len + max_tokens > window:
        raise bad(f"{name} is {max_tokens} but the prompt has {prompt_len} tokens and the context window is "
                  f"{window}: at most {window - prompt_len} tokens can be generated", name, "context_length_exceeded")
    seed = _number(body, "seed", None, integer=True)
    stop = _stop(body)
    stop = tuple(dict.fromkeys((*stop, *extra_stop)))
    return SamplingParams(temperature=float(temperature), top_k=max(top_k, 0), top_p=float(top_p),
                          repetition_penalty=float(penalty), max_new_tokens=max_tokens,
                          seed=None if seed is None else seed % (1 << 64), stop=stop)


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise bad(f"stream_options must be an object, got {_type_name(opts)}", "stream_options", "invalid_type")
    return stream, _bool(opts, "include_usage")


# ---- structured output -----------------------------------------------------------------------------
STRUCTURED_KINDS = ("choice", "regex", "json", "grammar", "json_object")
MAX_CHOICES = 1024


def _schema(v, param: str):
    """A JSON schema given as an object or as a string holding one."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise bad(f"{param} is a string but not JSON", param, "invalid_value") from None
    if not isinstance(v, (dict, bool)):
        raise bad(f"{param} must be a JSON schema (an object), got {_type_name(v)}", param, "invalid_type")
    return v


def _grammar_of(kind: str, v, param: str) -> str:
    """The grammar for one structured-output field (vLLM's names: choice, regex, json, grammar)."""
    if kind == "choice":
        if not (isinstance(v, list) and v and len(v) <= MAX_CHOICES and all(isinstance(c, str) for c in v)):
            raise bad(f"{param} must be a non-empty array of at most {MAX_CHOICES} strings", param, "invalid_value")
        return choice_grammar(v)
    if kind in ("regex", "grammar"):
        if not isinstance(v, str) or not v:
            raise bad(f"{param} must be a non-empty string, got {_type_name(v)}", param, "invalid_type")
        return regex_grammar(v) if kind == "regex" else lark_grammar(v)
    if kind == "json_object":
        if v is not True:
            raise bad(f"{param} must be true, got {_type_name(v)}", param, "invalid_value")
        return json_object_grammar()
    return json_schema_grammar(_schema(v, param))


def _response_format(v) -> str | None:
    """OpenAI's ``response_format``: text, json_object, or json_schema ({name, schema, strict})."""
    if not isinstance(v, dict):
        raise bad(f"response_format must be an object, got {_type_name(v)}", "response_format", "invalid_type")
    kind = v.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("response_format.json_schema must be an object with the schema under 'schema'",
                      "response_format.json_schema", "invalid_type")
        if spec.get("name") is not None and not isinstance(spec["name"], str):
            raise bad("response_format.json_schema.name must be a string", "response_format.json_schema.name",
                      "invalid_type")
        _bool(spec, "strict")  # the schema is always enforced exactly
        return json_schema_grammar(_schema(spec.get("schema", {}), "response_format.json_schema.schema"))
    raise bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {str(kind)[:40]!r}",
              "response_format.type", "invalid_value")


def structured_grammar(body: dict) -> tuple[str, str] | None:
    """The grammar a request's answer must follow and the field that asked for it (None: no constraint):
    OpenAI's ``response_format``, vLLM's ``structured_outputs`` ({choice | regex | json | grammar |
    json_object}) or its older ``guided_choice``, ``guided_regex``, ``guided_json``, ``guided_grammar``.
    At most one may be given."""
    asked: list[tuple[str, str]] = []
    fields: list[tuple[str, object]] = []  # (param, how to make its grammar)
    if body.get("response_format") is not None:
        fields.append(("response_format", lambda: _response_format(body["response_format"])))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad(f"structured_outputs must be an object, got {_type_name(so)}", "structured_outputs",
                      "invalid_type")
        fields += [(f"structured_outputs.{k}", lambda k=k: _grammar_of(k, so[k], f"structured_outputs.{k}"))
                   for k in STRUCTURED_KINDS if so.get(k) not in (None, False)]
    fields += [(f"guided_{k}", lambda k=k: _grammar_of(k, body[f"guided_{k}"], f"guided_{k}"))
               for k in STRUCTURED_KINDS[:4] if body.get(f"guided_{k}") is not None]
    for param, make in fields:
        try:
            g = make()
        except ConstraintError as e:
            raise bad(f"{param}: {e}", param, "invalid_grammar") from None
        if g is not None:
            asked.append((param, g))
    if len(asked) > 1:
        raise bad(f"{asked[0][0]} and {asked[1][0]} both constrain the answer; send one", asked[1][0], "invalid_value")
    return asked[0] if asked else None


def constrained(body: dict) -> bool:
    """Whether the request asks for a constraint (structured output or tools): compiling one may take
    long enough that it is done off the event loop."""
    return any(body.get(f) is not None for f in ("response_format", "structured_outputs", "tools",
                                                  *(f"guided_{k}" for k in STRUCTURED_KINDS[:4])))


def constraint(grammar: tuple[str, str] | None, tokenizer) -> Constraint | None:
    """A row's matcher for ``grammar`` (from :func:`structured_grammar`); 400 for one llguidance refuses."""
    if grammar is None:
        return None
    param, g = grammar
    try:
        return Constraint(grammar_tokenizer(tokenizer), g)
    except ConstraintError as e:
        raise bad(f"{param}: {e}", param, "invalid_grammar") from None


# ---- chat ----------------------------------------------------------------------------------------
def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:  # OpenAI's rule: only an assistant turn (one that made tool calls) may have none
        if m.get("role") == "assistant":
            return ""
        raise bad(f"messages[{i}].content is required for a {str(m.get('role'))[:40]!r} message (only an "
                  f"assistant message may have null content)", f"messages[{i}].content", "missing")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: only text
        parts = []
        for part in c:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                          f"messages[{i}].content", "invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or an array of text parts, got {_type_name(c)}",
              f"messages[{i}].content", "invalid_type")


def chat_utterances(messages) -> list[Utterance]:
    """OpenAI messages as the card's utterances.

    ``user`` is ユーザー, ``assistant`` is システム. The card has no system turn: leading ``system``
    (or ``developer``) messages are joined and put before the first user message's text, separated
    by a newline, so the instruction reaches the model as part of the user's request. A system message
    after the conversation has started is refused. The last message must be the user's.
    """
    if not isinstance(messages, list):
        raise bad(f"messages must be an array, got {_type_name(messages)}", "messages", "invalid_type")
    if not messages:
        raise bad("messages must not be empty", "messages", "invalid_value")
    system: list[str] = []
    utts: list[Utterance] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object, got {_type_name(m)}", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise bad(f"messages[{i}].role must be a string, got {_type_name(role)}", f"messages[{i}].role", "invalid_type")
        text = _content(m, i)
        if role in SYSTEM_ROLES:
            if utts:
                raise bad(f"messages[{i}]: a {role} message must come before the conversation (the model has no "
                          f"system turn; its text is put before the first user message)", f"messages[{i}].role",
                          "invalid_value")
            system.append(text)
        elif role in ("user", "assistant"):
            utts.append(Utterance(USER if role == "user" else SYSTEM, text))
        else:
            raise bad(f"messages[{i}].role {role[:40]!r} is not supported: expected 'system', 'user' or 'assistant'",
                      f"messages[{i}].role", "invalid_value")
    if not utts or utts[-1].speaker != USER:
        raise bad("the last message must be from the user", "messages", "invalid_value")
    if system:
        first = next(j for j, u in enumerate(utts) if u.speaker == USER)
        utts[first] = Utterance(USER, "\n".join([*system, utts[first].text]))
    return utts


def _chat_logprobs(body: dict) -> int | None:
    """``logprobs: true`` and ``top_logprobs`` (0-20, needs logprobs) as a count of alternatives."""
    top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if not _bool(body, "logprobs"):
        if top is not None:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        return None
    return top or 0


def parse_chat(body: dict, tokenizer, window: int, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerationRequest:
    _refuse_unsupported(body)
    if body.get("echo") not in (None, False):
        raise bad("echo is not supported in chat; use /v1/completions", "echo", "unsupported")
    logprobs = _chat_logprobs(body)
    prompt = format_prompt(chat_utterances(body.get("messages")))
    ids = tokenizer.encode(prompt)
    # the model sometimes writes the user's next turn itself: the answer ends there
    params = sampling(body, len(ids), window, extra_stop=(TURN_STOP,), prompt_param="messages",
                      default_max_tokens=default_max_tokens)
    return GenerationRequest(ids, params, *_stream_options(body), logprobs=logprobs,
                             speculate=_bool(body, "speculate", True),
                             constraint=constraint(structured_grammar(body), tokenizer),
                             follow_up=lambda answer: tokenizer.encode(follow_up(prompt, answer)))


def token_ids(v, tokenizer, param: str) -> list[int]:
    """A non-empty array of token ids in the tokenizer's vocabulary."""
    if not (isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)):
        raise bad(f"{param} must be a non-empty array of token ids, got {_type_name(v)}", param,
                  "missing" if v is None else "invalid_type")
    outside = [t for t in v if not 0 <= t < tokenizer.vocab_size]
    if outside:
        raise bad(f"{param}: token id {outside[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", param,
                  "invalid_value")
    return list(v)


def _prompts(p, tokenizer) -> list[list[int]]:
    """The completions ``prompt``: a string, token ids, or an array of either (one answer each)."""
    if isinstance(p, str):
        return [tokenizer.encode(p)]
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [token_ids(p, tokenizer, "prompt")]
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        return [tokenizer.encode(x) if isinstance(x, str) else token_ids(x, tokenizer, f"prompt[{i}]")
                for i, x in enumerate(p)]
    if p is None:
        raise bad("prompt is required", "prompt", "missing")
    raise bad("prompt must be a string, an array of token ids, or an array of strings or of token id arrays "
              "(one answer each)", "prompt", "invalid_type")


def parse_completion(body: dict, tokenizer, window: int,
                     default_max_tokens: int = DEFAULT_MAX_TOKENS) -> list[GenerationRequest]:
    """One request per prompt (``prompt`` may hold several; they are answered as ``choices[i]``)."""
    _refuse_unsupported(body)
    if body.get("suffix") is not None:
        raise bad("suffix is not supported", "suffix", "unsupported")
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    echo = _bool(body, "echo")
    stream = _stream_options(body)
    prompts = _prompts(body.get("prompt"), tokenizer)
    if stream[0] and len(prompts) > 1:
        raise bad(f"stream with {len(prompts)} prompts is not supported: send one prompt per streamed request",
                  "stream", "unsupported")
    # max_tokens 0 with echo and logprobs (vLLM's scoring request): score the prompt, generate nothing
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    zero = type(body.get(name)) is int and body[name] == 0
    score_only = zero and echo and logprobs is not None
    if score_only:
        body = {**body, name: None}  # the rest is checked as for any request
    elif zero:
        raise bad(f"{name} must be >= 1 (0, to score the prompt only, needs echo: true and logprobs)", name,
                  "invalid_value")
    grammar = structured_grammar(body)
    p = body.get("prompt")
    texts = [p] if isinstance(p, str) else [x if isinstance(x, str) else None for x in p]
    reqs = []
    for i, (ids, text) in enumerate(zip(prompts, texts)):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        reqs.append(GenerationRequest(ids, sampling(body, len(ids), window, prompt_param=param,
                                                              default_max_tokens=default_max_tokens), *stream,
                                      logprobs=logprobs, echo=echo, generate=not score_only,
                                      speculate=_bool(body, "speculate", True),
                                      constraint=constraint(grammar, tokenizer) if not score_only else None,
                                      follow_up=None if text is None else _continued(tokenizer, text)))
    return reqs


def _continued(tokenizer, prompt: str) -> Callable[[str], list[int]]:
    """A text prompt's follow-up: the prompt and its answer, as a client that sends them on tokenizes them."""
    return lambda answer: tokenizer.encode(prompt + answer)
