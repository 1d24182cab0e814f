"""What counts as a Japanese character, shared by the demo recipe's corpus filter and the chat evaluation.

One definition for both, so "mostly Japanese" means the same when the corpus is
cleaned and when the model's answers are scored.
"""

from __future__ import annotations

import unicodedata

# Inclusive code point ranges of characters written in Japanese text.
JAPANESE_RANGES: tuple[tuple[int, int], ...] = (
    (0x3000, 0x303F),  # CJK symbols and punctuation: 、。「」『』〜 々 〆 〇 and the ideographic space
    (0x3040, 0x309F),  # hiragana
    (0x30A0, 0x30FF),  # katakana, including ・ and ー
    (0x31F0, 0x31FF),  # katakana phonetic extensions (small ㇰ etc.)
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs (kanji)
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF01, 0xFF60),  # full-width forms: ！？（）：０-９Ａ-ｚ
    (0xFF61, 0xFF9F),  # half-width katakana and punctuation
    (0xFFE0, 0xFFEE),  # full-width signs: ￥ ￡ and others
    (0x20000, 0x2FA1F),  # rarer kanji (extensions B-F, compatibility supplement)
)


def is_japanese_char(char: str) -> bool:
    """True for kana, kanji, Japanese punctuation and full-width forms."""
    code = ord(char)
    return any(low <= code <= high for low, high in JAPANESE_RANGES)


def japanese_ratio(text: str) -> float:
    """Share of Japanese characters among the non-whitespace characters (0.0 for blank text)."""
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return 0.0
    return sum(is_japanese_char(c) for c in visible) / len(visible)


def japanese_letter_ratio(text: str) -> float:
    """Share of Japanese characters among the characters that belong to a language: kana, kanji and
    letters of other scripts (Latin, Cyrillic, Hangul, ...). Digits, punctuation, symbols and spaces
    are written alike in every language and count for neither side, so 「1週間は168時間です。」 is
    entirely Japanese while 「Australiaと書きます。」 is not (0.0 for text without letters)."""
    japanese = foreign = 0
    for c in text:
        if is_japanese_char(c):
            if unicodedata.category(c)[0] in "LN" and not c.isdigit():  # 々 and 〇 are letters too
                japanese += 1
        elif unicodedata.category(c).startswith("L"):
            foreign += 1
    return japanese / (japanese + foreign) if japanese + foreign else 0.0


def count_japanese(text: str) -> int:
    """Number of Japanese characters in ``text``."""
    return sum(is_japanese_char(c) for c in text)
