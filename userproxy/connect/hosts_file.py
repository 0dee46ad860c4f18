"""The managed block of a hosts file for ``userproxy connect --hosts-file PATH``.

The block sits between two marker lines and holds one line per local address with the
names of its Service (``svc``, ``svc.ns``, ``svc.ns.svc``, ``svc.ns.svc.<cluster domain>``).
Everything outside the markers is the user's and is kept byte for byte.

Invariants: a write replaces the file in one rename (a reader sees the old file or the
new one, never half of either), keeping its mode; at most one block is in the file after
any write, so a block a crashed run left behind is replaced by the next start and removed
by ``remove_block``; an unterminated block (a begin marker without its end) is an error
naming the line, never a guess at where it ends.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["BEGIN", "END", "HostsFileError", "names_for", "remove_block", "render", "write_block"]

BEGIN = "# BEGIN userproxy connect (managed by userproxy: edits here are lost)"
END = "# END userproxy connect"


class HostsFileError(Exception):
    """The hosts file cannot be read or written, or its managed block is broken."""


def names_for(namespace: str, name: str, cluster_domain: str = "cluster.local") -> list[str]:
    """The names a Service answers to, as inside a pod of another namespace."""
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc",
            f"{name}.{namespace}.svc.{cluster_domain}"]  # fmt: skip


def render(entries: Mapping[str, Iterable[str]]) -> str:
    """The block for ``entries`` (address -> names), markers included, sorted."""
    lines = [BEGIN]
    lines += [f"{address}\t{' '.join(names)}" for address, names in sorted(entries.items())]
    lines.append(END)
    return "\n".join(lines) + "\n"


def _without_block(text: str, path: Path) -> str:
    lines = text.splitlines(keepends=True)
    kept: list[str] = []
    inside_since: int | None = None
    for number, line in enumerate(lines, start=1):
        stripped = line.rstrip("\r\n")
        if stripped == BEGIN:
            if inside_since is not None:
                raise HostsFileError(f"{path}:{number}: a second begin marker inside the block")
            inside_since = number
        elif stripped == END and inside_since is not None:
            inside_since = None
        elif inside_since is None:
            kept.append(line)
    if inside_since is not None:
        raise HostsFileError(
            f"{path}:{inside_since}: the userproxy block is not terminated by {END!r}; "
            "fix the file by hand"
        )
    return "".join(kept)


def _replace(path: Path, text: str) -> None:
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.chmod(temporary, mode)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        raise HostsFileError(f"{path}: cannot write it: {exc.strerror or exc}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text() if path.exists() else ""
    except OSError as exc:
        raise HostsFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def write_block(path: Path, entries: Mapping[str, Iterable[str]]) -> bool:
    """Make ``path`` hold exactly one managed block, for ``entries``; whether it held one
    before (at start: one a crashed run left)."""
    text = _read(path)
    rest = _without_block(text, path)
    had_block = rest != text
    if rest and not rest.endswith("\n"):
        rest += "\n"
    _replace(path, rest + render(entries))
    return had_block


def remove_block(path: Path) -> bool:
    """Remove the managed block, if any; whether there was one."""
    text = _read(path)
    rest = _without_block(text, path)
    if rest == text:
        return False
    _replace(path, rest)
    return True
