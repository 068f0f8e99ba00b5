"""Caption text: the recipe's cleaning for training targets, and one-line sanitising for scoring.

`clean_caption` is what the method's public code (LAVIS `pre_caption`) does to every caption
before it becomes a training target: lowercase, the characters ``.!"()*#:;~`` replaced by a
space, whitespace collapsed, at most 50 words.

`sanitize_caption` exists because coco-caption's PTB tokenizer hands all captions to java as
one text, one caption per line: a caption holding a line break (``\\r``, U+2028, U+0085, ...)
shifts every later caption onto the wrong video. Every caption goes through it before scoring.
"""

from __future__ import annotations

import re

MAX_WORDS = 50
"""Word limit of a cleaned caption (the recipe's)."""

STRIPPED_CHARS = '.!"()*#:;~'
"""Characters the recipe removes from captions."""

_STRIPPED = re.compile("[" + re.escape(STRIPPED_CHARS) + "]")

# Every C0/C1 control character (this covers \t \n \v \f \r, \x1c-\x1e and \x85) plus the
# Unicode line and paragraph separators: everything `str.splitlines` or java may break on.
_CONTROL_CHARS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_TO_SPACE = dict.fromkeys(_CONTROL_CHARS, " ")


def sanitize_caption(text: str) -> str:
    """Replace every line-breaking or control character with a space: the caption is one line.

    >>> sanitize_caption("a dog\\u2028runs\\r")
    'a dog runs '
    """
    return text.translate(_TO_SPACE)


def clean_caption(text: str, max_words: int = MAX_WORDS) -> str:
    """The recipe's caption cleaning: lowercase, strip ``.!"()*#:;~``, collapse spaces, cap words.

    Stripped characters become spaces (as in LAVIS), so ``"end.Start"`` -> ``"end start"``.
    The result is always a single line.

    >>> clean_caption('A man (smiling) talks: "hello!"')
    'a man smiling talks hello'
    """
    text = _STRIPPED.sub(" ", sanitize_caption(text).lower())
    return " ".join(text.split()[:max_words])
