"""What counts as a Japanese character: the library's definition (jneox.evaluate.japanese), so that the
corpus filter here and the chat evaluation mean the same by "mostly Japanese"."""

from jneox.evaluate.japanese import (  # noqa: F401
    JAPANESE_RANGES,
    count_japanese,
    is_japanese_char,
    japanese_letter_ratio,
    japanese_ratio,
)
