"""
L{codex_proxy._text.escape}: network values made safe for one log line
(SPEC §4.2b).
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codex_proxy._text import escape


@pytest.mark.parametrize(
    "value, text",
    [
        ("origin.test", "origin.test"),
        ("bücher.test", "bücher.test"),
        ("a\rb\nc", "a\\x0db\\x0ac"),
        ("\x1b[2J", "\\x1b[2J"),
        ("nul\x00", "nul\\x00"),
        ("\x7f\x85\x9f", "\\x7f\\x85\\x9f"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("back\\x0d", "back\\\\x0d"),
        (b"raw\r\xff", "raw\\x0d\xff"),
        (443, "443"),
    ],
)
def test_escape(value, text):
    assert escape(value) == text


@given(st.text() | st.binary())
def test_escaped_text_is_one_line_without_controls(value):
    text = escape(value)
    assert text.splitlines() == ([text] if text else [])
    assert not any(unicodedata.category(char) == "Cc" for char in text)
