"""Caption cleaning (the recipe) and one-line sanitising (for the PTB tokenizer)."""

import pytest

from pipeline.text import clean_caption, sanitize_caption


@pytest.mark.parametrize(
    "raw, clean",
    [
        ('A Man (smiling) talks: "Hello!"', "a man smiling talks hello"),
        ("end.Start*of#the;show~", "end start of the show"),
        ("  many   spaces\tand\ttabs  ", "many spaces and tabs"),
        ("first line\r\nsecond\u2028third\u0085fourth", "first line second third fourth"),
        ("it's a dog, isn't it?", "it's a dog, isn't it?"),  # only the recipe's characters go
        ("", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_clean_caption_keeps_at_most_max_words():
    words = [f"w{i}" for i in range(60)]
    assert clean_caption(" ".join(words)).split() == words[:50]
    assert clean_caption("a b c d", max_words=2) == "a b"


@pytest.mark.parametrize(
    "breaker", ["\r", "\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_sanitize_caption_removes_every_line_break(breaker):
    text = f"a dog{breaker}runs"
    assert len(text.splitlines()) == 2  # the hazard is real for this character
    out = sanitize_caption(text)
    assert out == "a dog runs"
    assert out.splitlines() == [out]


def test_sanitize_caption_replaces_other_control_chars_and_keeps_text():
    assert sanitize_caption("a\x00b\x1bc\x7fd\te") == "a b c d e"
    assert sanitize_caption("Café, naïve — 猫!") == "Café, naïve — 猫!"
