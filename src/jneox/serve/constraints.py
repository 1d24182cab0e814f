"""Structured output: a grammar that a row's answer must follow, enforced token by token.

The grammar engine is llguidance. It reads the tokenizer from the ``tokenizer.json`` that
:func:`jneox.hf_tokenizer.build_tokenizer` makes (what ``jneox export --format hf`` writes): the
pieces, their "▁" spaces and byte-fallback pieces. One correction is made: llguidance takes an added
token's text literally, but jneox's ``<NL>`` stands for a newline (the tokenizer.json's decoder maps
it), so every user-defined symbol gets the bytes that decoder gives it. A JSON string can therefore
never hold ``<NL>`` (JSON strings hold no raw newline), and a grammar that allows a newline allows
``<NL>``. Control pieces (``<s>``, ``</s>``, ``<pad>``, ``<unk>``) are special tokens, never text; ``</s>``
is the end of the answer, allowed only where the grammar is complete.

A :class:`Constraint` is one row's matcher. :class:`ConstrainedSampler` is the row's
:class:`~jneox.sampling.Sampler` with the grammar's mask applied to the logits before the sampling
rules, so a row without a constraint keeps its plain Sampler and its bits. The mask for the next
token is computed on a thread of its own as soon as a token is accepted, while the engine runs the
next model step.
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Sequence

import llguidance
import torch
from llguidance.gbnf_to_lark import any_to_lark

from ..chat import TOOL_CALL_START
from ..errors import JneoxError
from ..hf_tokenizer import build_tokenizer
from ..sampling import Sampler, SamplingParams
from ..tokenizer import Tokenizer

# how JSON is written when the schema does not say (llguidance's x-guidance options): the separators
# json.dumps uses and no other whitespace, so a model cannot spend its tokens on blank space
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# one thread computes every row's next mask: the work is short, and more threads would contend with
# the model's own threads
_MASKS = ThreadPoolExecutor(1, thread_name_prefix="jneox-mask")


class ConstraintError(JneoxError):
    """A grammar, schema, regex or choice list that cannot be used."""


# ---- grammars (llguidance's grammar strings) -----------------------------------------------------
def json_schema_grammar(schema) -> str:
    """Any JSON value that validates against ``schema`` (a dict, or a bool: true is any value)."""
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
    if schema is True:
        schema = {}
    elif schema is False:
        raise ConstraintError("the JSON schema false accepts nothing")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"the JSON schema cannot be read: {str(e)[:300]}") from None


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's JSON mode)."""
    return json_schema_grammar({"type": "object"})


def regex_grammar(regex: str) -> str:
    """Text that matches ``regex`` whole (Rust regex syntax, as llguidance reads it)."""
    return llguidance.LLMatcher.grammar_from_regex(regex)


def choice_grammar(choices: Sequence[str]) -> str:
    """Exactly one of ``choices``."""
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def lark_grammar(grammar: str) -> str:
    """A grammar in llguidance's Lark syntax, or in llama.cpp's GBNF (converted)."""
    try:
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(grammar))
    except Exception as e:  # the converter's own errors: a grammar that is neither Lark nor GBNF
        raise ConstraintError(f"the grammar cannot be read: {str(e)[:300]}") from None


def tool_call_schema(functions: Sequence[tuple[str, dict]], parallel: bool = True) -> dict:
    """The JSON schema of a call turn (:func:`jneox.chat.format_tool_calls`) to one of ``functions``
    ((name, parameters schema) pairs); ``parallel``: several calls in one turn."""
    one = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False} for name, params in functions]
    calls = {"type": "array", "minItems": 1, "items": one[0] if len(one) == 1 else {"anyOf": one}}
    if not parallel:
        calls["maxItems"] = 1
    return {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
            "additionalProperties": False}


def tool_call_grammar(functions: Sequence[tuple[str, dict]], parallel: bool = True, or_text: bool = False) -> str:
    """A call turn to one of ``functions``; ``or_text``: or else any text that does not start with
    TOOL_CALL_START (the answer's first character decides)."""
    schema = tool_call_schema(functions, parallel)
    if not or_text:
        return json_schema_grammar(schema)
    inline = json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)
    return llguidance.LLMatcher.grammar_from_lark(
        f"start: call | text\ncall: %json {inline}\ntext: /[^{TOOL_CALL_START}][\\s\\S]*/")


# ---- the tokenizer as llguidance sees it -----------------------------------------------------------
class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes, the special ids and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        hf = build_tokenizer(tokenizer.path)
        spec = json.loads(hf.to_str())
        n = tokenizer.vocab_size
        plain = llguidance.LLTokenizer(hf.to_str(), n_vocab=n, eos_token=tokenizer.eos_id)
        added = {a["id"]: a for a in spec.get("added_tokens", [])}
        self.special_token_ids = [i for i, a in added.items() if a["special"] and i < n]
        self.tokens = [hf.decode([i]).encode() if i in added and not added[i]["special"] else plain.decode_bytes([i])
                       for i in range(n)]
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self._hf = hf

    def __call__(self, text: str) -> list[int]:
        return self._hf.encode(text).ids


@lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for ``tokenizer`` (built once: about a second for a 32k vocabulary)."""
    vocab = _Vocabulary(tokenizer)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=tokenizer.vocab_size,
                                  eos_token=tokenizer.eos_id)


# ---- one row's constraint ---------------------------------------------------------------------------
class Constraint:
    """One row's matcher over ``grammar``; raises ConstraintError for a grammar llguidance refuses.
    The first mask is computed at once, on the mask thread."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str):
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ConstraintError(messages[0][:400])
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(self.matcher.get_error()[:400])
        self.bits = torch.full((1, (tokenizer.vocab_size + 31) // 32), -1, dtype=torch.int32)
        self.shifts = torch.arange(32, dtype=torch.int32)
        self.pending: Future = _MASKS.submit(self._next_mask)

    def _next_mask(self) -> torch.Tensor:
        """Which tokens may come next, as a (1, words * 32) bool tensor."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.numel() * 4)
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar matcher failed: {self.matcher.get_error()[:300]}")
        return ((self.bits.unsqueeze(-1) >> self.shifts) & 1).view(1, -1).bool()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (1, V) with every token the grammar forbids next at -inf."""
        allowed = self.pending.result()[:, : logits.shape[-1]]
        if allowed.shape[-1] < logits.shape[-1]:  # ids past the tokenizer's vocabulary are never text
            allowed = torch.cat((allowed, allowed.new_zeros(1, logits.shape[-1] - allowed.shape[-1])), dim=-1)
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """``token`` follows; the next mask starts computing."""
        self.pending.result()  # the matcher is not shared between threads
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"the grammar refused token {token}: {self.matcher.get_error()[:300]}")
        self.pending = _MASKS.submit(self._next_mask)

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()


class ConstrainedSampler(Sampler):
    """A row's Sampler whose tokens follow ``constraint`` (its mask comes before the sampling rules)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], window: int, constraint: Constraint,
                 device: torch.device | str = "cpu", vocab_size: int | None = None, own_generator: bool = False):
        super().__init__(params, prompt_ids, window, device, vocab_size, own_generator)
        self.constraint = constraint

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return super().scores(self.constraint.apply(logits[:, : self.vocab_size]))

    def sample(self, logits: torch.Tensor) -> int:
        return super().sample(self.constraint.apply(logits[:, : self.vocab_size]))

    def accept(self, token: int) -> None:
        super().accept(token)
        self.constraint.accept(token)
