"""The logging safety net (``userproxy/logs.py``): no record makes an unbounded log entry.

Here because what it guards against first came from manifests (a 10 MB field value
quoted in a message); the formatters are the ones ``userproxy run`` installs.
"""

from __future__ import annotations

import json
import logging
import sys

from userproxy.logs import (
    MAX_MESSAGE_CHARS,
    MAX_MESSAGE_LINES,
    MAX_TRACEBACK_LINES,
    BoundedFormatter,
    JsonFormatter,
    bound_text,
)

NOTE_CHARS = 80  # "[... N more characters, M more lines]"


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("x" * 100_000)
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("userproxy.test", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_bound_text_keeps_short_text_and_notes_what_it_cuts() -> None:
    assert bound_text("short\ntext", 100, 5) == "short\ntext"
    assert bound_text("a" * 30, 10, 5) == "a" * 10 + " [... 20 more characters]"
    assert bound_text("1\n2\n3\n4", 100, 2) == "1\n2 [... 4 more characters, 2 more lines]"


def test_text_formatter_bounds_a_ten_megabyte_message() -> None:
    formatter = BoundedFormatter("%(levelname)s %(name)s: %(message)s")
    entry = formatter.format(record("value: %s", "v" * 10_000_000))
    print(f"10 MB message -> {len(entry)} characters")
    assert len(entry) <= MAX_MESSAGE_CHARS + NOTE_CHARS + 40
    assert entry.startswith("ERROR userproxy.test: value: vvv")
    assert entry.endswith("more characters]")


def test_text_formatter_bounds_a_fifty_thousand_line_message() -> None:
    formatter = BoundedFormatter("%(message)s")
    entry = formatter.format(record("\n".join(f"problem {i}" for i in range(50_000))))
    lines = entry.splitlines()
    print(f"50 000-line message -> {len(lines)} lines")
    assert len(lines) == MAX_MESSAGE_LINES
    assert lines[-1].endswith(f"{50_000 - MAX_MESSAGE_LINES} more lines]")


def test_text_formatter_bounds_the_traceback_and_leaves_the_record_alone() -> None:
    formatter = BoundedFormatter("%(message)s")
    rec = record("failed: %s", "y" * 20_000, exc=True)
    entry = formatter.format(rec)
    assert len(entry) < MAX_MESSAGE_CHARS + 16_384 + 3 * NOTE_CHARS
    assert entry.count("\n") <= MAX_MESSAGE_LINES + MAX_TRACEBACK_LINES
    assert "ValueError" in entry
    # Other handlers (pytest's, say) still see the record whole.
    assert rec.getMessage() == "failed: " + "y" * 20_000
    assert rec.exc_text is None


def test_json_formatter_bounds_message_and_traceback() -> None:
    entry = JsonFormatter().format(record("%s", "z\n" * 5_000_000, exc=True))
    parsed = json.loads(entry)
    print(f"JSON entry of a 10 MB message: {len(entry)} characters")
    assert len(entry) < MAX_MESSAGE_CHARS + 16_384 + 4 * NOTE_CHARS + 200
    assert parsed["msg"].count("\n") < MAX_MESSAGE_LINES
    assert parsed["msg"].endswith("more lines]")
    assert "ValueError" in parsed["exc"]
    assert parsed["level"] == "error"
