"""The soak's line protocol, shared by the backend process and the client harness.

Every byte a backend sends is tagged: the greeting names the backend and the connection
id, every trailer repeats the connection id, and bulk data is made of 48-byte blocks that
each name the stream they belong to and their index.  Client payloads are built the same
way from the client's token, so a byte delivered to the wrong connection, in either
direction, can be traced to the connection it came from.
"""

from __future__ import annotations

import hashlib
import re

BLOCK = 48
#: ``<tag:0000000012>`` padded with dots to BLOCK - 1 bytes, then a newline.
_BLOCK_RE = re.compile(rb"<([^:<>\s]{1,30}):(\d{10})>")
#: A greeting or trailer line of any connection (``H alpha-3 1234x56``, ``E 1234x56 ...``).
LINE_RE = re.compile(rb"(?:^|\n)([HESUFBP]) ((?:[a-z]+-\d+ )?\d+x\d+)")

GREETING_RE = re.compile(r"^H ([a-z0-9]+)-(\d+) (\d+)x(\d+)$")


def pattern(tag: str, size: int, start: int = 0) -> bytes:
    """Bytes ``start`` to ``start + size`` of the stream named ``tag``."""
    if size <= 0:
        return b""
    first = start // BLOCK
    last = (start + size + BLOCK - 1) // BLOCK
    text = "".join(f"<{tag}:{i:010d}>".ljust(BLOCK - 1, ".") + "\n" for i in range(first, last))
    offset = start - first * BLOCK
    return text.encode()[offset : offset + size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_mismatch(got: bytes, expected: bytes) -> tuple[int, str]:
    """The first differing offset and a short description naming whose bytes arrived."""
    n = min(len(got), len(expected))
    offset = next((i for i in range(n) if got[i] != expected[i]), n)
    window = got[max(0, offset - 60) : offset + 100]
    origins = sorted({m.group(1).decode() for m in _BLOCK_RE.finditer(window)})
    lines = sorted({m.group(0).strip().decode(errors="replace") for m in LINE_RE.finditer(window)})
    shown = window[min(offset, 60) :][:80]
    what = f"at offset {offset} of {len(expected)}: got {shown!r}"
    if origins:
        what += f"; blocks of streams {origins}"
    if lines:
        what += f"; protocol lines {lines}"
    return offset, what


def foreign_origin(got: bytes, expected_tag: str) -> bool:
    """Whether ``got`` holds a block or protocol line that belongs to another stream."""
    for match in _BLOCK_RE.finditer(got):
        if match.group(1).decode() != expected_tag:
            return True
    return LINE_RE.search(got) is not None


def foreign_bytes(got: bytes, token: str, cid: str | None) -> bool:
    """Whether ``got`` (read on the connection of client ``token`` greeted as ``cid``) holds
    a block or a protocol line of another connection."""
    own = (f"{token}.", f"{cid}/")
    for match in _BLOCK_RE.finditer(got):
        if not match.group(1).decode().startswith(own):
            return True
    for match in LINE_RE.finditer(got):
        named = match.group(2).split()[-1].decode()
        if named != cid:
            return True
    return False
