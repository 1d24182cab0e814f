"""The card's conversation format, both directions; the only module that knows it.

A prompt is ``"<speaker>: <text>"`` utterances joined by ``<NL>``, ending with ``"<NL>システム: "``;
every newline inside an utterance is written as ``<NL>``. The answer ends at ``</s>``; its ``<NL>``
become newlines again.

The card has no tool turns; jneox renders them into the two speakers' turns (see "Tool turns" below):
the functions offered and the results of calls are text of a ユーザー turn, a call is a システム turn
holding one JSON object, ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .errors import JneoxError
from .generate import stream
from .sampling import SamplingParams
from .tokenizer import NL  # the piece that stands for a newline

USER = "ユーザー"
SYSTEM = "システム"
SPEAKERS = (USER, SYSTEM)
# the model sometimes goes on to write the user's next turn itself; an answer stops there
TURN_STOP = "\n" + USER + ":"
ROLE_TO_SPEAKER = {"user": USER, "assistant": SYSTEM}


class ConversationError(JneoxError):
    pass


@dataclass(frozen=True)
class Utterance:
    speaker: str
    text: str

    def __post_init__(self) -> None:
        if self.speaker not in SPEAKERS:
            raise ConversationError(f"unknown speaker {self.speaker!r}: expected {USER!r} or {SYSTEM!r}")
        if not isinstance(self.text, str):
            raise ConversationError(f"utterance text must be a string, got {type(self.text).__name__}")


def to_utterances(turns: Iterable) -> list[Utterance]:
    """Accept the card's ``{"speaker", "text"}`` dicts, OpenAI-style ``{"role", "content"}`` dicts
    (user / assistant), ``(speaker, text)`` pairs or :class:`Utterance` objects."""
    out = []
    for i, t in enumerate(turns):
        if isinstance(t, Utterance):
            out.append(t)
        elif isinstance(t, dict) and "speaker" in t:
            out.append(Utterance(t["speaker"], t.get("text", "")))
        elif isinstance(t, dict) and "role" in t:
            role = t["role"]
            if role not in ROLE_TO_SPEAKER:
                raise ConversationError(f"turn {i}: unknown role {role!r}: expected 'user' or 'assistant'")
            out.append(Utterance(ROLE_TO_SPEAKER[role], t.get("content", "")))
        elif isinstance(t, (tuple, list)) and len(t) == 2:
            out.append(Utterance(*t))
        else:
            raise ConversationError(f"turn {i}: expected {{'speaker', 'text'}} or {{'role', 'content'}}, got {t!r}")
    return out


def escape(text: str) -> str:
    """An utterance as the model sees it: every newline is ``<NL>``."""
    return text.replace("\r\n", "\n").replace("\n", NL)


def format_utterance(u: Utterance) -> str:
    return f"{u.speaker}: {escape(u.text)}"


def format_prompt(turns: Iterable, add_generation_prompt: bool = True) -> str:
    """The card's prompt string for a conversation; ends with ``"<NL>システム: "`` so the model answers."""
    parts = [format_utterance(u) for u in to_utterances(turns)]
    if add_generation_prompt:
        parts.append(f"{SYSTEM}: ")
    return NL.join(parts)


def follow_up(prompt: str, answer: str) -> str:
    """How the next prompt of a conversation starts, after ``prompt`` (from :func:`format_prompt`) got
    ``answer``: the answer as the next prompt renders it, then the next user turn's speaker."""
    return prompt + escape(answer) + NL + USER + ":"


def parse_answer(text: str) -> str:
    """The answer as a user reads it: ``<NL>`` to newlines, cut at ``</s>`` and at a new user turn."""
    text = text.replace(NL, "\n")
    for end in ("</s>", TURN_STOP):
        cut = text.find(end)
        if cut >= 0:
            text = text[:cut]
    return text


def fit_to_window(turns: Sequence, count_tokens: Callable[[str], int], budget: int) -> tuple[list[Utterance], int]:
    """Drop the oldest turns until the prompt takes at most ``budget`` tokens.

    Returns the kept turns and how many were dropped. The last turn (the question being asked)
    is never dropped: if it alone does not fit, that is an error the caller must report.
    """
    utts = to_utterances(turns)
    dropped = 0
    while utts:
        if count_tokens(format_prompt(utts)) <= budget:
            return utts, dropped
        if len(utts) == 1:
            break
        utts = utts[1:]
        dropped += 1
        # a conversation should start with the user's turn
        while len(utts) > 1 and utts[0].speaker != USER:
            utts, dropped = utts[1:], dropped + 1
    raise ConversationError(f"the last message alone takes more than the {budget} tokens the context window leaves")


class ChatSession:
    """A multi-turn conversation with a model: keeps the history, formats each prompt the card's way,
    streams the answer, and drops the oldest turns when the context window is full."""

    def __init__(self, model, tokenizer, params=None, draft=None):
        self.model, self.tokenizer, self.draft = model, tokenizer, draft
        self.params = params or SamplingParams()
        self.history: list[Utterance] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        self.history.clear()
        self.dropped_turns = 0

    def prompt_for(self, user_text: str) -> str:
        turns = [*self.history, Utterance(USER, user_text)]
        budget = self.model.config.max_position_embeddings - min(self.params.max_new_tokens,
                                                                  self.model.config.max_position_embeddings // 2)
        kept, dropped = fit_to_window(turns, lambda s: len(self.tokenizer.encode(s)), budget)
        self.history = kept[:-1]
        self.dropped_turns += dropped
        return format_prompt(kept)

    def ask(self, user_text: str):
        """Stream the answer to ``user_text``; the history holds both turns once the stream is done."""
        prompt = self.prompt_for(user_text)
        params = self.params.with_(stop=tuple(dict.fromkeys((*self.params.stop, TURN_STOP))))
        pieces = []
        for piece in stream(self.model, self.tokenizer, prompt, params, draft=self.draft):
            pieces.append(piece)
            yield piece
        self.history += [Utterance(USER, user_text), Utterance(SYSTEM, "".join(pieces))]


# ---- tool turns ------------------------------------------------------------------------------------
# The functions go before the user's first request (as a system message does); a call is a システム
# turn that is exactly a JSON object of this shape; results come back as a ユーザー turn. An answer
# that starts with TOOL_CALL_START is a call.
TOOL_CALL_START = "{"
TOOLS_INTRO = ("次の関数を使えます。関数を呼び出すときは、ほかに何も書かずに次の形のJSONだけで答えてください: "
               '{"tool_calls": [{"name": "関数名", "arguments": {引数}}]}')
TOOL_RESULTS_INTRO = "関数の結果:"


def format_tools(functions: Sequence[dict]) -> str:
    """The text that offers ``functions`` ({"name", "description", "parameters"}): the intro, then one
    JSON object per line."""
    lines = [json.dumps({k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None},
                        ensure_ascii=False) for f in functions]
    return "\n".join([TOOLS_INTRO, *lines])


def format_tool_calls(calls: Sequence[tuple[str, object]]) -> str:
    """A システム turn that calls functions: ``(name, arguments)`` pairs, arguments a JSON object."""
    return json.dumps({"tool_calls": [{"name": n, "arguments": a} for n, a in calls]}, ensure_ascii=False)


def format_tool_results(results: Sequence[tuple[str, str]]) -> str:
    """A ユーザー turn that hands back ``(name, result text)`` pairs, one JSON object per line."""
    lines = [json.dumps({"name": n, "result": r}, ensure_ascii=False) for n, r in results]
    return "\n".join([TOOL_RESULTS_INTRO, *lines])


def parse_tool_calls(text: str) -> list[tuple[str, dict]] | None:
    """The ``(name, arguments)`` pairs of an answer written as :func:`format_tool_calls` writes them;
    None if the answer is not a call."""
    if not text.startswith(TOOL_CALL_START):
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    calls = value.get("tool_calls") if isinstance(value, dict) else None
    if not (isinstance(calls, list) and calls and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                      and isinstance(c.get("arguments"), dict) for c in calls)):
        return None
    return [(c["name"], c["arguments"]) for c in calls]
