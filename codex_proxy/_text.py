"""
Escaping of values that came from the network before they reach a text log
line (SPEC §4.2b): a host name, header value or SOCKS5 address could
otherwise plant a fake log line or terminal escapes.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators
# (U+0085 is C1). Backslash is escaped too, so an escaped value cannot be
# confused with one that arrived already looking escaped.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\\\\]")


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(value: object) -> str:
    """
    C{value} as text safe for one log line: control characters, NUL,
    U+2028/U+2029 and backslashes become C{\\xNN}/C{\\uNNNN} escapes; bytes
    are decoded as Latin-1 first so every byte is shown.
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return _UNSAFE.sub(_escape_one, text)
