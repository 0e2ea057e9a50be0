"""A backup's manifests on disk: where they live and their lines (SPEC §9).

A manifest is read by ``sha256sum --check`` from inside the backup folder,
so its lines are exactly what coreutils writes: ``<hex digest>  <path>``,
the path relative to the backup folder as its raw bytes. A path holding a
backslash or a newline is escaped (``\\\\``, ``\\n``) and its line starts
with a backslash. A carriage return is written raw: coreutils 9 escapes it
as ``\\r`` but coreutils 8 (Debian 11) does not read that escape, and both
read a raw one. Lines coreutils 9 wrote by hand (``\\r``) are read too.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO

# The folder of a backup that holds its manifests; never a source (a source
# name starts with a letter or digit).
MANIFEST_DIR = ".pibackup"
# Names of the sources that have a manifest, one a line.
SOURCES_FILE = "SOURCES"
EXTENSION = "sha256"
DIGEST_HEX = 64

_ESCAPES = {ord("\\"): b"\\\\", ord("\n"): b"\\n"}
_UNESCAPES = {ord("\\"): b"\\", ord("n"): b"\n", ord("r"): b"\r"}
_HEX_DIGITS = b"0123456789abcdefABCDEF"


def manifest_path(backup_dir: str, source: str) -> str:
    """``<backup>/.pibackup/<source>.sha256``."""
    return os.path.join(backup_dir, MANIFEST_DIR, f"{source}.{EXTENSION}")


def sources_path(backup_dir: str) -> str:
    """``<backup>/.pibackup/SOURCES``."""
    return os.path.join(backup_dir, MANIFEST_DIR, SOURCES_FILE)


def format_line(digest: str, path: bytes) -> bytes:
    """One manifest line, newline included, as ``sha256sum`` writes it for ``path``."""
    if b"\\" in path or b"\n" in path:
        escaped = b"".join(_ESCAPES.get(byte, bytes((byte,))) for byte in path)
        return b"\\" + digest.encode() + b"  " + escaped + b"\n"
    return digest.encode() + b"  " + path + b"\n"


def parse_line(line: bytes) -> tuple[str, bytes]:
    """(hex digest, path bytes) of one manifest line (its newline stripped or not).

    Raises ValueError for a line that is not one ``sha256sum --check`` reads.
    """
    line = line.removesuffix(b"\n")
    escaped = line.startswith(b"\\")
    if escaped:
        line = line[1:]
    digest, sep, rest = line[:DIGEST_HEX], line[DIGEST_HEX:DIGEST_HEX + 2], line[DIGEST_HEX + 2:]
    if sep not in (b"  ", b" *") or not rest or not _is_hex(digest):
        raise ValueError(f"not a sha256sum line: {line[:100]!r}")
    if not escaped:
        return digest.decode().lower(), rest
    out = bytearray()
    i = 0
    while i < len(rest):
        byte = rest[i]
        if byte != ord("\\"):
            out.append(byte)
            i += 1
            continue
        follow = _UNESCAPES.get(rest[i + 1]) if i + 1 < len(rest) else None
        if follow is None:
            raise ValueError(f"malformed escape in a sha256sum line: {line[:100]!r}")
        out += follow
        i += 2
    return digest.decode().lower(), bytes(out)


def read_manifest(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(digest, path) for every line of an open manifest, in the file's order.

    Raises ValueError (naming the line's number) at the first malformed line.
    """
    for number, line in enumerate(stream, start=1):
        try:
            yield parse_line(line)
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None


def _is_hex(digest: bytes) -> bool:
    # translate() deletes in C: a byte-by-byte loop in Python was half the
    # cost of reading a manifest of 80,000 lines.
    return len(digest) == DIGEST_HEX and not digest.translate(None, _HEX_DIGITS)
