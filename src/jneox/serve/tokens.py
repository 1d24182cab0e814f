"""Token-level answers: log-probabilities in OpenAI's two shapes, and the tokenizer endpoints.

The engine hands over :class:`~jneox.serve.scheduler.TokenLogprob` records (ids and floats); this
module turns them into what clients read. A token is shown as its text; a token that is only part
of a UTF-8 character (a byte piece) as ``bytes:\\xe3`` (OpenAI's convention), a control token
(``</s>``) as its piece name.

The tokenizer endpoints follow vLLM's shapes, which lm-evaluation-harness's ``remote`` tokenizer
backend reads: ``POST /tokenize`` (``{"prompt"}`` or ``{"messages"}`` -> ``{"tokens", "count",
"max_model_len"}``), ``POST /detokenize`` (``{"tokens"}`` -> ``{"prompt"}``), ``GET /tokenizer_info``.
The ids are sentencepiece's, exactly those :class:`jneox.Tokenizer` gives and the server feeds the
model.
"""
from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Sequence

from ..chat import format_prompt
from ..tokenizer import Tokenizer
from .protocol import APIError, _bool, _type_name, bad, chat_utterances, token_ids
from .scheduler import TokenLogprob

# what one tokenizer request may ask for: far more than any context window, little enough that a
# request costs a fraction of a second of a worker thread
MAX_TOKENIZE_CHARS = 1 << 18
MAX_DETOKENIZE_TOKENS = 1 << 17


def token_text(tokenizer: Tokenizer, i: int) -> str:
    """How token ``i`` is shown: its text, ``bytes:\\xNN...`` when that is not whole UTF-8, a control
    token's piece name (it has no text)."""
    b = tokenizer.decode_bytes([i])
    if not b:
        return tokenizer.id_to_piece(i)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


class Offsets:
    """Character offsets of successive tokens in the text they decode to (OpenAI's ``text_offset``):
    a token that completes a character counts it, a byte piece before it counts nothing."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0):
        self.decoder, self.at = tokenizer.stream_decoder(), start

    def push(self, i: int) -> int:
        at = self.at
        self.at += len(self.decoder.push(i))
        return at


def completion_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], offsets: Offsets) -> dict:
    """The legacy completions ``logprobs`` object: ``tokens``, ``token_logprobs``, ``top_logprobs`` (a
    dict from token to logprob per token, most likely first, holding the chosen token too, so up to
    ``logprobs + 1`` entries, as OpenAI documents; None where the logprob is None) and ``text_offset``."""
    tokens, logprobs, tops, text_offset = [], [], [], []
    for e in entries:
        tokens.append(token_text(tokenizer, e.id))
        logprobs.append(e.logprob)
        text_offset.append(offsets.push(e.id))
        if e.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for i, lp in [*e.top, (e.id, e.logprob)]:
            top.setdefault(token_text(tokenizer, i), lp)  # two ids shown alike keep the likelier one
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": text_offset}


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> list[dict]:
    """The chat ``logprobs.content`` list: per token ``token``, ``logprob``, ``bytes`` (None for a token
    without text) and ``top_logprobs`` (the ``top_logprobs`` most likely, most likely first)."""
    def one(i: int, lp: float) -> dict:
        b = tokenizer.decode_bytes([i])
        return {"token": token_text(tokenizer, i), "logprob": lp, "bytes": list(b) if b else None}

    return [{**one(e.id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]} for e in entries]


# ---- tokenizer endpoints ---------------------------------------------------------------------
def tokenizer_info(tokenizer: Tokenizer, window: int) -> dict:
    """What lm-eval's remote tokenizer asks for (``eos_token`` ...), from the sentencepiece model."""
    piece = tokenizer.id_to_piece
    return {"tokenizer_class": "sentencepiece", "vocab_size": tokenizer.vocab_size, "model_max_length": window,
            "bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
            "pad_token": piece(tokenizer.pad_id), "unk_token": piece(tokenizer.unk_id),
            "add_bos_token": False, "add_eos_token": False}


def special_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    return {tokenizer.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                                                 tokenizer.unk_id) if i >= 0}


def tokenize(body: dict, tokenizer: Tokenizer, window: int) -> dict:
    """``POST /tokenize``: ``prompt`` (text, encoded as the completions endpoint encodes it) or
    ``messages`` (the chat prompt the chat endpoint would build). A prompt that is exactly a special
    token's name (``</s>``) is that token: lm-eval finds the EOS id by tokenizing ``eos_token``.
    No BOS is ever added (the card encodes with ``add_special_tokens=False``), so
    ``add_special_tokens`` changes nothing; ``return_token_strs`` adds ``token_strs`` (the pieces)."""
    _bool(body, "add_special_tokens", True)
    strs = _bool(body, "return_token_strs")
    if body.get("messages") is not None:
        if body.get("prompt") is not None:
            raise bad("send either prompt or messages, not both", "prompt", "invalid_value")
        text = format_prompt(chat_utterances(body["messages"]))
        _check_chars(text, "messages")
        ids = tokenizer.encode(text)
    else:
        p = body.get("prompt")
        if not isinstance(p, str):
            raise bad(f"prompt must be a string, got {_type_name(p)}", "prompt",
                      "missing" if p is None else "invalid_type")
        _check_chars(p, "prompt")
        special = special_tokens(tokenizer)
        ids = [special[p]] if p in special else tokenizer.encode(p)
    return {"count": len(ids), "max_model_len": window, "tokens": ids,
            "token_strs": [tokenizer.id_to_piece(i) for i in ids] if strs else None}


def detokenize(body: dict, tokenizer: Tokenizer) -> dict:
    """``POST /detokenize``: ``tokens`` (ids) -> ``prompt``, their text as the server decodes answers."""
    ids = body.get("tokens")
    if isinstance(ids, list) and len(ids) > MAX_DETOKENIZE_TOKENS:
        raise bad(f"tokens has {len(ids)} ids; at most {MAX_DETOKENIZE_TOKENS} are accepted in one request",
                  "tokens", "too_long")
    return {"prompt": tokenizer.decode(token_ids(ids, tokenizer, "tokens"))}


def _check_chars(text: str, param: str) -> None:
    if len(text) > MAX_TOKENIZE_CHARS:
        raise bad(f"{param} has {len(text)} characters; at most {MAX_TOKENIZE_CHARS} are accepted in one request "
                  f"(send a long text in parts)", param, "too_long")


# ---- large jobs in a process of their own -------------------------------------------------------
_process_tokenizer: Tokenizer | None = None  # the tokenizer of an EndpointProcess's child


def _start_child(path: str) -> None:
    global _process_tokenizer
    _process_tokenizer = Tokenizer(path)


def _child_job(kind: str, body: dict, window: int) -> tuple[int, bytes | tuple]:
    """(200, the JSON answer's bytes) or (status, APIError's arguments)."""
    try:
        out = tokenize(body, _process_tokenizer, window) if kind == "tokenize" else detokenize(body, _process_tokenizer)
    except APIError as e:
        return e.status, (e.status, e.message, e.param, e.code, e.type)
    # the bytes starlette's JSONResponse would send
    return 200, json.dumps(out, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


class EndpointProcess:
    """Large ``/tokenize`` and ``/detokenize`` jobs in one process of their own, started on first use:
    encoding a long text and its answer holds Python's GIL for tens of milliseconds at a time, which a
    thread would take from the event loop and so from every other client."""

    def __init__(self, tokenizer_path):
        self.path, self.pool = str(tokenizer_path), None

    def submit(self, kind: str, body: dict, window: int) -> Future:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_child, initargs=(self.path,))
        return self.pool.submit(_child_job, kind, body, window)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
