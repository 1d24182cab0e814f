"""The card's conversation format, both directions; the only module that knows it.

A prompt is ``"<speaker>: <text>"`` utterances joined by ``<NL>``, ending with ``"<NL>システム: "``;
every newline inside an utterance is written as ``<NL>``. The answer ends at ``</s>``; its ``<NL>``
become newlines again.
"""
from __future__ import annotations

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
