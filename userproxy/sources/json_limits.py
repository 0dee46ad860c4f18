"""Parsing JSON from outside without crashing on it: bounded depth and integer length.

Python's ``json`` recurses once per nesting level (a document 100 000 deep raises
RecursionError) and converts integers with ``int()``, which refuses more than 4 300 digits
(ValueError) and costs the square of the length below that.  Kubernetes objects are about
ten levels deep and their integers 64-bit, so both bounds here are far above anything
real: :data:`MAX_DEPTH` levels and :data:`MAX_INT_CHARS` characters.  Both are checked
at C speed before the parser runs, so a normal document pays two scans and nothing more.
"""

from __future__ import annotations

import array
import itertools
import json
import re

__all__ = ["MAX_DEPTH", "MAX_INT_CHARS", "JsonLimitError", "has_long_int", "json_depth", "loads"]

#: Deepest nesting of collections in a document: well inside Python's recursion limit.
MAX_DEPTH = 200
#: Longest integer literal (characters); a 64-bit integer has at most 20.
MAX_INT_CHARS = 64

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
#: Digits to b"0", every other byte to b" ": a long integer is then a run of b"0"s.
_DIGIT_MAP = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * (MAX_INT_CHARS + 1)
_PAIRS = bytes.maketrans(b"[{]}", b"(())")
_TOO_DEEP_RUN = b"(" * (MAX_DEPTH + 1)


class JsonLimitError(ValueError):
    """The text is beyond a bound (a ValueError, as ``json``'s own errors are)."""


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, at C speed.

    Strings are removed first (brackets inside them do not count), every bracket becomes
    "(" or ")" and everything else goes.  Then each pass deletes every "()" (the innermost
    collections): a well-formed text is empty after as many passes as it is deep, about
    ten for a Kubernetes object, each pass a C-level replace over a shrinking string.
    Past :data:`MAX_DEPTH` passes the exact depth is taken as the largest running sum of
    +1/-1 steps (slower, and only for texts that are too deep or malformed).  A malformed
    text gives some number; the parser then reports its syntax error.
    """
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return 0  # cannot be deeper than the limit: skip the scan
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    pairs = brackets.translate(_PAIRS)
    # MAX_DEPTH + 1 openings in a row: too deep, and a pass would take out one pair only.
    passes = 0 if _TOO_DEEP_RUN in pairs else MAX_DEPTH + 1
    for depth in range(passes):
        if not pairs:
            return depth
        shorter = pairs.replace(b"()", b"")
        if len(shorter) == len(pairs):
            break  # unbalanced: no pair left to take out
        pairs = shorter
    steps = array.array("b", brackets.translate(_BRACKET_STEPS))
    return max(itertools.accumulate(steps), default=0)


def has_long_int(data: bytes) -> bool:
    """Whether ``data`` holds a run of digits longer than :data:`MAX_INT_CHARS` (maybe in
    a string: then the slower, checking parse is merely not needed).  One translate and
    one substring search, both at C speed (a regex tried a match at every digit)."""
    return _LONG_RUN in data.translate(_DIGIT_MAP)


def _kept_as_text(text: str) -> int | str:
    return text if len(text) > MAX_INT_CHARS else int(text)


def loads(data: bytes) -> object:
    """Parse JSON from an API server or a peer.

    Raises ``JsonLimitError`` (a ValueError) when nested deeper than :data:`MAX_DEPTH`,
    and ValueError for invalid JSON.  An integer longer than :data:`MAX_INT_CHARS` is
    kept as its text, so the decoder that reads the field rejects that one object (naming
    the field) rather than the whole list or stream failing.
    """
    if json_depth(data) > MAX_DEPTH:
        raise JsonLimitError(f"nested more than {MAX_DEPTH} levels deep")
    try:
        if not has_long_int(data):
            return json.loads(data)
        return json.loads(data, parse_int=_kept_as_text)
    except RecursionError:
        raise JsonLimitError("nested too deeply") from None
