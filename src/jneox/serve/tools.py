"""OpenAI tool calls on the chat endpoint: ``tools``, ``tool_choice``, ``parallel_tool_calls``, the
history's ``tool`` messages and assistant ``tool_calls``, and the answer's ``tool_calls``.

The conversation is rendered by :mod:`jneox.chat` (the functions and results in ユーザー turns, a call
as a システム turn holding one JSON object); the call's JSON is valid by construction: the answer
follows a grammar built from the functions' parameter schemas (:func:`~jneox.serve.constraints.tool_call_grammar`).
``tool_choice``: ``"none"`` (no functions offered, plain text), ``"auto"`` (the default with tools: the
answer is a call if its first character is ``{``, else text), ``"required"`` (a call to any function)
or ``{"type": "function", "function": {"name"}}`` (a call to that one).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..chat import TOOL_CALL_START, format_tool_calls, format_tool_results, format_tools, parse_tool_calls
from .constraints import ConstraintError, json_schema_grammar, tool_call_grammar
from .protocol import (SYSTEM_ROLES, GenerationRequest, _bool, _type_name, bad, constraint, parse_chat,
                       structured_grammar)

MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolCalls:
    """How one chat answer turns into ``tool_calls``: it may be a call (``tool_choice`` is not none)."""

    names: list[str]
    stream_held: str = ""  # a streamed answer that may be a call is held back until it ends
    streaming_text: bool = False  # a streamed answer known to be text is passed on as it comes

    def calls(self, text: str) -> list[dict] | None:
        parsed = parse_tool_calls(text)
        if parsed is None or any(n not in self.names for n, _ in parsed):
            return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}} for n, a in parsed]

    def message(self, text: str, finish: str) -> tuple[dict, str]:
        """The answer's ``message`` and ``finish_reason``."""
        calls = self.calls(text) if finish == "stop" else None
        if calls is None:
            return {"role": "assistant", "content": text}, finish
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"

    def delta(self, text: str | None, finish: str | None) -> tuple[dict, str | None]:
        """A streamed chunk's ``delta`` and ``finish_reason``: text passes once the answer is known not to
        be a call; a call comes whole with the last chunk."""
        if text and not self.streaming_text:
            self.stream_held += text
            if not self.stream_held.startswith(TOOL_CALL_START):
                self.streaming_text, text, self.stream_held = True, self.stream_held, ""
        if self.streaming_text:
            return ({"content": text} if text else {}), finish
        if finish is None:
            return {}, None
        message, finish = self.message(self.stream_held, finish)
        if message.get("tool_calls") is None:
            return ({"content": self.stream_held} if self.stream_held else {}), finish
        calls = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
        return {"tool_calls": calls}, finish


def _functions(tools) -> list[dict]:
    """``tools``: [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    if not isinstance(tools, list):
        raise bad(f"tools must be an array, got {_type_name(tools)}", "tools", "invalid_type")
    if len(tools) > MAX_TOOLS:
        raise bad(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are accepted", "tools", "invalid_value")
    out, names = [], set()
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict):
            raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]", "invalid_value")
        name = f.get("name")
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise bad(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {str(name)[:80]!r}",
                      f"tools[{i}].function.name", "invalid_value")
        if name in names:
            raise bad(f"tools[{i}]: a function named {name!r} is already listed", f"tools[{i}].function.name",
                      "invalid_value")
        names.add(name)
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise bad(f"tools[{i}].function.description must be a string", f"tools[{i}].function.description",
                      "invalid_type")
        params = f.get("parameters")
        params = EMPTY_PARAMETERS if params is None else params
        param = f"tools[{i}].function.parameters"
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise bad(f"{param} must be a JSON schema of an object", param, "invalid_value")
        try:
            json_schema_grammar(params)
        except ConstraintError as e:
            raise bad(f"{param}: {e}", param, "invalid_grammar") from None
        out.append({"name": name, "description": f.get("description"), "parameters": params})
    return out


def _choice(body: dict, functions: list[dict]) -> str:
    """``tool_choice`` as "none", "auto", "required" or the one function's name."""
    v = body.get("tool_choice")
    if v is None:
        return "auto" if functions else "none"
    if isinstance(v, str):
        if v not in ("none", "auto", "required"):
            raise bad(f"tool_choice must be 'none', 'auto', 'required' or a function, got {v[:40]!r}", "tool_choice",
                      "invalid_value")
        if v != "none" and not functions:
            raise bad(f"tool_choice {v!r} needs tools", "tool_choice", "invalid_value")
        return v
    name = v.get("function", {}).get("name") if isinstance(v, dict) and v.get("type") == "function" else None
    if not isinstance(name, str):
        raise bad("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                  "tool_choice", "invalid_value")
    if name not in {f["name"] for f in functions}:
        raise bad(f"tool_choice names {name[:80]!r}, which is not in tools", "tool_choice", "invalid_value")
    return name


def _messages(messages, functions: list[dict], offer: bool) -> list:
    """The conversation with its tool turns rendered as text turns (:mod:`jneox.chat`); the functions
    are offered (``offer``) after the leading system messages."""
    if not isinstance(messages, list):
        return messages  # parse_chat says what is wrong
    out: list = []
    names: dict[str, str] = {}  # tool_call_id -> function name, from the assistant turns
    results: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role != "tool" and results:
            out.append({"role": "user", "content": format_tool_results(results)})
            results = []
        if role == "tool":
            call_id, content = m.get("tool_call_id"), m.get("content")
            if call_id not in names:
                raise bad(f"messages[{i}].tool_call_id {str(call_id)[:80]!r} answers no earlier tool call",
                          f"messages[{i}].tool_call_id", "invalid_value")
            if isinstance(content, list):  # text parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise bad(f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
            results.append((names[call_id], content))
        elif role == "assistant" and m.get("tool_calls"):
            calls = []
            for j, c in enumerate(m["tool_calls"] if isinstance(m["tool_calls"], list) else [None]):
                param = f"messages[{i}].tool_calls[{j}]"
                f = c.get("function") if isinstance(c, dict) else None
                if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)):
                    raise bad(f"{param} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}",
                              param, "invalid_value")
                try:
                    args = json.loads(f["arguments"])
                except (json.JSONDecodeError, RecursionError):
                    raise bad(f"{param}.function.arguments is not JSON", f"{param}.function.arguments",
                              "invalid_value") from None
                names[c.get("id")] = f["name"]
                calls.append((f["name"], args))
            text = format_tool_calls(calls)
            if isinstance(m.get("content"), str) and m["content"]:
                text = m["content"] + "\n" + text
            out.append({"role": "assistant", "content": text})
        else:
            out.append(m)
    if results:
        out.append({"role": "user", "content": format_tool_results(results)})
    if offer:
        at = next((k for k, m in enumerate(out) if not (isinstance(m, dict) and m.get("role") in SYSTEM_ROLES)),
                  len(out))
        out.insert(at, {"role": "system", "content": format_tools(functions)})
    return out


def parse_tool_chat(body: dict, tokenizer, window: int, default_max_tokens: int) -> tuple[GenerationRequest, ToolCalls | None]:
    """A chat request with its tool fields: the request (its answer constrained to a call where one is
    required, to a call or text with ``auto``) and how its answer becomes ``tool_calls`` (None: plain)."""
    has_tools = body.get("tools") is not None
    functions = _functions(body["tools"]) if has_tools else []
    choice = _choice(body, functions)
    parallel = _bool(body, "parallel_tool_calls", True)
    messages = _messages(body.get("messages"), functions, offer=choice != "none")
    req = parse_chat({**body, "messages": messages}, tokenizer, window, default_max_tokens)
    if choice == "none":
        return req, None
    req.follow_up = None  # a call's turn is rendered from its tool_calls, not from the answer's text
    if structured_grammar(body) is not None:
        raise bad("response_format (or structured_outputs) cannot be combined with tool calls; set tool_choice "
                  "'none'", "tool_choice", "invalid_value")
    chosen = functions if choice in ("auto", "required") else [f for f in functions if f["name"] == choice]
    grammar = tool_call_grammar([(f["name"], f["parameters"]) for f in chosen], parallel, or_text=choice == "auto")
    req.constraint = constraint(("tools", grammar), tokenizer)
    req.speculate = False
    return req, ToolCalls([f["name"] for f in chosen])
