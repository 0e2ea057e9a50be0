"""Paths as text for people and JSON (SPEC §7): UTF-8, with what cannot be shown escaped.

A file name is bytes; it may hold a newline, a tab, a backslash or bytes that
are not UTF-8. In all output, text and JSON alike, a path is UTF-8 text in
which backslash, control characters and bytes that are not UTF-8 are written
``\\\\``, ``\\n``, ``\\t`` and ``\\xHH``; ``parse_path`` reads that form back.
"""

from __future__ import annotations

import os
import re

_NAMED = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t"}


def show_path(raw: bytes | str) -> str:
    """``raw`` (bytes, or a str from the filesystem's surrogate escapes) as printable text."""
    data = os.fsencode(raw) if isinstance(raw, str) else raw
    text = data.decode("utf-8", errors="surrogateescape")
    out: list[str] = []
    for char in text:
        code = ord(char)
        if code in _NAMED:
            out.append(_NAMED[code])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(char)
    return "".join(out)


def parse_path(text: str) -> bytes:
    """The bytes a ``show_path`` text stands for; ValueError for a malformed escape."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\":
            out += char.encode()
            i += 1
            continue
        kind = text[i + 1:i + 2]
        if kind == "\\":
            out += b"\\"
            i += 2
        elif kind == "n":
            out += b"\n"
            i += 2
        elif kind == "t":
            out += b"\t"
            i += 2
        elif kind == "x" and len(text) >= i + 4:
            try:
                out.append(int(text[i + 2:i + 4], 16))
            except ValueError:
                raise ValueError(f"malformed escape {text[i:i + 4]!r} in {text!r}") from None
            i += 4
        else:
            raise ValueError(f"malformed escape {text[i:i + 2]!r} in {text!r}")
    return bytes(out)


_RSYNC_ESCAPE = re.compile(rb"\\#([0-7]{3})")


def rsync_unescape(name: bytes) -> bytes:
    """A name as rsync prints it back to its bytes: rsync writes every byte it will not
    print as ``\\#ooo`` (octal), a backslash before "#ooo" included, so this is exact."""
    return _RSYNC_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), name)
