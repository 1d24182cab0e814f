"""The JSONL scanner (csrc/jsonl.c, kernels.jsonl_texts) against its reference: Python's json.loads of each
line (as jneox.train.data.parse_jsonl_line reads it), the text field, then the tokenizer's newline rewrite
(Tokenizer._with_nl), in UTF-8. Whatever it accepts must be exactly those bytes; whatever json.loads does
not read to an object with a string field must not be accepted."""
from __future__ import annotations

import ctypes
import json
import mmap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jneox import kernels

LIB = kernels.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="the C kernels are off or cannot be built here")


def reference(data: bytes, field: str, newlines: bool, tokenizer) -> list[bytes] | None:
    """What the Python path feeds sentencepiece for ``data``; None where a line is not a JSON object with
    a string ``field`` (or its text cannot be UTF-8)."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for raw in lines:
        try:
            obj = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            return None
        text = tokenizer._with_nl(obj[field]) if newlines else obj[field]
        try:
            out.append(text.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate: sentencepiece could not take it either
            return None
    return out


def check(data: bytes, tokenizer, field: str = "text", newlines: bool = True) -> list[bytes] | None:
    """The scanner's texts of ``data``, asserted to be the reference's where it accepts the chunk."""
    got = kernels.jsonl_texts(LIB, data, field, newlines)
    if got is not None:
        assert got == reference(data, field, newlines, tokenizer), data
    return got


@pytest.fixture(scope="module")
def nl_tokenizer(tokenizer):
    assert tokenizer.writes_nl
    return tokenizer


ACCEPTED = [
    b'{"text": "hello"}',
    b'{"text":"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xa7\xe3\x81\x99\xe3\x80\x82"}',
    b'{"text": ""}',
    b'  {"text" : "a" }  \r',  # whitespace around tokens, a CRLF line ending
    b'{"id": 1, "text": "a\\nb", "meta": {"x": [1, -2.5e-3, 0, true, false, null, "s\\n"], "y": {}}, "z": []}',
    b'{"text": "a\\r\\nb\\rc\\r\\r\\nd\\n\\r"}',  # "\r\n" is one <NL>; a lone "\r" stays
    b'{"text": "\\u000d\\u000a\\u000A\\u0041\\u00e9\\u3042\\ud83d\\ude00\\uD83D\\uDE00"}',
    b'{"text": "\\"\\\\\\/\\b\\f\\t\\u0000\\u001f"}',
    b'{"text": "<NL> already"}',
    b'{"text": "\xc2\x80\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf\xf0\x90\x80\x80\xf4\x8f\xbf\xbf"}',  # UTF-8 edges
    b'{"text": "x", "text2": "y", "tex": 1, "a": "text"}',
    b'{"a": 1, "a": 2, "text": "duplicates of other keys do not matter"}',
    b'{"n": 12345678901234567890123456789, "f": 1e400, "g": -0.0, "h": 1E+2, "text": "t"}',  # as json.loads
]

REFUSED = [
    b'',  # a blank line
    b'   \r',
    b'\xef\xbb\xbf{"text": "a BOM"}',
    b'["text"]',
    b'"text"',
    b'{"text": 1}',
    b'{"text": null}',
    b'{"text": ["a"]}',
    b'{"other": "a"}',
    b'{"text": "a", "text": "b"}',  # json.loads keeps the last: left to it
    b'{"t\\u0065xt": "escaped key"}',
    b'{"text": "a"',
    b'{"text": "a"} x',
    b'{"text": "a"}{"text": "b"}',
    b'{"text": "a",}',
    b'{"text": "a" "b": 1}',
    b'{"text": "lone \\ud83d high"}',
    b'{"text": "lone \\ude00 low"}',
    b'{"text": "pair \\ud83d\\u0041 broken"}',
    b'{"text": "\\x41"}',
    b'{"text": "\\u12g4"}',
    b'{"text": "raw \t tab"}',
    b'{"text": "raw \x00 nul"}',
    b'{"text": "\xc0\x80 overlong"}',
    b'{"text": "\xe0\x80\x80 overlong"}',
    b'{"text": "\xed\xa0\x80 surrogate"}',
    b'{"text": "\xf4\x90\x80\x80 too high"}',
    b'{"text": "\xe3\x81 truncated"}',
    b'{"text": "\x80 stray"}',
    b'{"text": "a", "x": NaN}',
    b'{"text": "a", "x": Infinity}',
    b'{"text": "a", "x": -Infinity}',
    b'{"text": "a", "x": 01}',
    b'{"text": "a", "x": 1.}',
    b'{"text": "a", "x": .5}',
    b'{"text": "a", "x": +1}',
    b'{"text": "a", "x": ' + b"9" * 5000 + b'}',  # too long for Python's int()
    b'{"text": "a", "x": tru}',
    b'{"text": "a", "x": [1,]}',
    b'{"text": "a", "x": ' + b"[" * 100 + b"]" * 100 + b'}',
    b"{'text': 'a'}",
    b'{"text": "a", "x": "\\ud800"}',  # a lone surrogate in another field is left to Python too
    b'{"text": "a"}\x0c',
]


@pytest.mark.parametrize("line", ACCEPTED, ids=range(len(ACCEPTED)))
def test_plain_lines_are_accepted_as_python_reads_them(nl_tokenizer, line):
    for data in (line, line + b"\n", line + b"\n" + line + b"\n"):
        assert check(data, nl_tokenizer) is not None, data


@pytest.mark.parametrize("line", REFUSED, ids=range(len(REFUSED)))
def test_anything_unusual_is_left_to_python(nl_tokenizer, line):
    good = b'{"text": "ok"}\n'
    for data in (line + b"\n", good + line + b"\n" + good) + ((line, good + line) if line else ()):
        assert check(data, nl_tokenizer) is None, data


def test_whole_chunks(nl_tokenizer):
    assert check(b"", nl_tokenizer) == []
    assert check(b'{"text": "a"}\n\n', nl_tokenizer) is None  # a blank last line
    assert check(b'{"text": "a"}\n{"text": "b"}', nl_tokenizer) == [b"a", b"b"]  # no newline at the end
    assert check(b'{"body": "a\\nb"}\n', nl_tokenizer, field="body") == [b"a<NL>b"]
    assert check('{"本文": "a"}\n'.encode(), nl_tokenizer, field="本文") == [b"a"]
    assert kernels.jsonl_texts(LIB, b'{"text": "a"}\n', "\ud800", True) is None  # a field with no UTF-8


def test_without_nl_symbol_a_text_with_a_newline_is_left_to_python(nl_tokenizer):
    assert check(b'{"text": "a\\rb"}\n', nl_tokenizer, newlines=False) == [b"a\rb"]
    assert check(b'{"text": "a\\nb"}\n', nl_tokenizer, newlines=False) is None
    assert check(b'{"text": "a\\u000ab"}\n', nl_tokenizer, newlines=False) is None


def _guarded(data: bytes):
    """``data`` placed to end exactly at a page that may not be read: a read past it kills the process."""
    page = mmap.PAGESIZE
    size = (len(data) // page + 2) * page
    buf = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    libc = ctypes.CDLL(None, use_errno=True)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(base + size - page), page, 0) == 0
    start = size - page - len(data)
    buf[start:start + len(data)] = data
    return buf, base + start


def test_no_read_past_the_end_of_any_truncated_line():
    if not hasattr(mmap, "PROT_READ"):
        pytest.skip("needs mmap protections (POSIX)")
    lines = ACCEPTED + REFUSED[2:] + [b'{"text": "\\ud83d\\ude00 \xf0\x9f\x98\x80 \xe3\x81\x82 abcdefgh"}']
    out = ctypes.create_string_buffer(1 << 16)
    written = ctypes.c_long()
    for line in lines:
        for cut in range(len(line) + 1):
            buf, address = _guarded(line[:cut])
            LIB.jneox_jsonl_texts(address, cut, b"text", 4, 1, out, len(out), ctypes.byref(written))
            del buf


def test_a_small_output_buffer_is_refused_not_overrun():
    out = ctypes.create_string_buffer(16)
    written = ctypes.c_long()
    data = b'{"text": "' + b"a" * 40 + b'\\n"}\n'
    assert LIB.jneox_jsonl_texts(data, len(data), b"text", 4, 1, out, 8, ctypes.byref(written)) == -1
    assert LIB.jneox_jsonl_texts(data, len(data), b"text", 4, 1, out, 16, ctypes.byref(written)) == -1
    assert out.raw[8:] == b"\0" * 8  # nothing written past the capacity it was given


# ---- generated lines ---------------------------------------------------------------------------
TEXT = st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ["\r\n", "\r\r\n", "a\rb", "\n\r", "\r", "日本語\n", "<NL>", "\\u0041", '"', "\x00\x1f"])
LEAF = (st.none() | st.booleans() | st.integers(-10**30, 10**30) | TEXT
        | st.floats(allow_nan=False, allow_infinity=False))
VALUE = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                     max_leaves=12)
OBJECT = st.builds(lambda others, text, at: {**dict(list(others.items())[:at]), "text": text,
                                             **dict(list(others.items())[at:])},
                   st.dictionaries(TEXT.filter(lambda k: k != "text"), VALUE, max_size=4), TEXT,
                   st.integers(0, 4))


def dumps(obj, ascii_, spaced) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_, separators=(", ", ": ") if spaced else (",", ":")).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(OBJECT, st.booleans(), st.booleans()), min_size=1, max_size=5), st.booleans())
def test_generated_json_lines_are_accepted_and_identical(tokenizer, rows, final_newline):
    data = b"\n".join(dumps(o, a, s) for o, a, s in rows) + (b"\n" if final_newline else b"")
    # the generated values are all plain JSON; only a top-level key written with an escape is left to Python
    plain = all("\\" not in json.dumps(k, ensure_ascii=a) for o, a, _ in rows for k in o)
    got = check(data, tokenizer)
    if plain:
        assert got is not None, data


PIECES = [b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b" ", b"\n", b"\r", b"\x00", b"\x1f", b"\x7f", b"\x80",
          b"\xbf", b"\xc0", b"\xc2", b"\xe0", b"\xe3", b"\xed", b"\xef", b"\xf0", b"\xf4", b"\xf5", b"\xff", b"u", b"0",
          b"d", b"D", b"8", b"e", b"-", b".", b"n", b"t", b"N", b"I", b"x", b"\\u", b"\\ud800", b"\\udc00",
          b"\xef\xbb\xbf"]
EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.sampled_from(PIECES)), min_size=1, max_size=4)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OBJECT, st.booleans(), EDITS)
def test_mutated_lines_are_refused_or_identical(tokenizer, obj, ascii_, edits):
    line = bytearray(dumps(obj, ascii_, True) + b"\n" + dumps(obj, not ascii_, False))
    for at, op, piece in edits:
        i = at % (len(line) + 1)
        if op == 0:
            line[i:i] = piece  # insert
        elif op == 1:
            line[i:i + 1] = b""  # delete
        else:
            line[i:i + len(piece)] = piece  # overwrite
    check(bytes(line), tokenizer)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_random_bytes_are_refused_or_identical(tokenizer, noise):
    check(noise, tokenizer)
    check(b'{"text": "' + noise + b'"}', tokenizer)
    check(b'{"text": "a", "x": ' + noise + b'}', tokenizer)
