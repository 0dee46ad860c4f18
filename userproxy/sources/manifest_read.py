"""Reading manifest files: which files a set of paths names, their bytes, their documents.

The first half of loading manifests (``manifest_files.py`` turns the documents into
userproxy's model objects).  A directory is read as ``kubectl apply -f DIR`` reads one
(cli-runtime's ExpandPathsToFileVisitors): its ``*.yaml``, ``*.yml`` and ``*.json`` files,
not recursively, in name order.  Invariants, whatever is on disk:

- Only regular files are opened, never in a way that could block
  (:func:`read_manifest_file`); directory entries that are not regular files are skipped
  and listed in ``FileList.skipped``.
- Reading and parsing raise nothing but :class:`ManifestError`: a syntax error, a limit
  exceeded or any exception inside a parser becomes one problem line naming the file (and
  the document when known).  Nothing recurses with the input's nesting (YAML:
  ``yaml_limits.py``, JSON: ``json_limits.py``); integers are bounded before ``int()``.
- Messages are bounded (:class:`ManifestError`).
- One rule says whether a file read earlier must be read again: :func:`is_stale`.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from userproxy.sources.decode import shorten
from userproxy.sources.json_limits import (
    MAX_DEPTH,
    MAX_INT_CHARS,
    JsonLimitError,
    has_long_int,
    json_depth,
)
from userproxy.sources.yaml_limits import YamlProblem, exception_text, parse_yaml

__all__ = [
    "MANIFEST_SUFFIXES",
    "MAX_FILE_BYTES",
    "MAX_PROBLEM_CHARS",
    "MAX_SHOWN_PROBLEMS",
    "MAX_TOTAL_BYTES",
    "FileList",
    "ManifestError",
    "Stamp",
    "is_stale",
    "list_manifest_files",
    "parse_documents",
    "read_manifest_file",
]

#: File name endings read from a directory (a file named explicitly is read whatever its name).
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

#: Largest manifest file read (bytes); 40 000 Services take about 9 MB of YAML.
MAX_FILE_BYTES = 16 * 1024 * 1024
#: Largest total of all manifest files (bytes).
MAX_TOTAL_BYTES = 64 * 1024 * 1024
#: Longest problem line (characters); longer ones end with an ellipsis.
MAX_PROBLEM_CHARS = 500
#: Most problems a ManifestError's text lists; the rest are counted ("... and N more").
MAX_SHOWN_PROBLEMS = 20

#: How long after a file's modification time its content may still change unnoticed: a
#: second write within the same timestamp tick that keeps the size leaves stat unchanged.
#: Files modified this recently are read again on the next poll (git's "racy" check).
RACY_NS = 1_000_000_000


class ManifestError(Exception):
    """One or more problems in the manifest files, one line each.

    Each line names the file, the document (numbered from 1, as the config file's
    messages do), the object and the field, e.g.
    ``web.yaml: document 2: Service default/web: spec.ports[0].port: 70000 is out of range
    1..65535``.  Invariant: every line in ``problems`` is at most :data:`MAX_PROBLEM_CHARS`
    long and ``str()`` shows at most :data:`MAX_SHOWN_PROBLEMS` of them, so the text stays
    bounded however broken the files are.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(shorten(p, MAX_PROBLEM_CHARS) for p in problems)
        super().__init__(self._text())

    def _text(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = [f"{len(self.problems)} problems in the manifests:"]
        lines.extend(f"  {problem}" for problem in self.problems[:MAX_SHOWN_PROBLEMS])
        hidden = len(self.problems) - MAX_SHOWN_PROBLEMS
        if hidden > 0:
            lines.append(f"  ... and {hidden} more")
        return "\n".join(lines)

    def __reduce__(self) -> tuple[type[ManifestError], tuple[tuple[str, ...]]]:
        return (ManifestError, (self.problems,))


# --------------------------------------------------------------------------- which files


@dataclass(frozen=True, slots=True)
class Stamp:
    """What ``stat`` says about a file; its content is taken as unchanged while this is."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> Stamp | None:
        """The file's stamp now; None when it cannot be stat'ed."""
        try:
            st = path.stat()
        except OSError:
            return None
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)

    def racy(self) -> bool:
        """Modified within :data:`RACY_NS`: another write may still hide behind this stamp."""
        return self.mtime_ns >= time.time_ns() - RACY_NS


def is_stale(read: Stamp | None, now: Stamp | None) -> bool:
    """Whether a file read when its stamp was ``read`` must be read again, its stamp now
    being ``now`` (None: never read, or cannot be stat'ed)."""
    return read is None or now is None or read != now or now.racy()


def _file_type(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


@dataclass(frozen=True, slots=True)
class FileList:
    """The files to read (in order) with their stamps, problems with the paths, and
    skipped entries.  Two listings compare equal when nothing a reload reads changed."""

    files: tuple[Path, ...]
    stamps: tuple[Stamp | None, ...]
    problems: tuple[str, ...]
    skipped: tuple[str, ...]

    def racy(self) -> bool:
        """Whether some file may still change unnoticed (see :meth:`Stamp.racy`)."""
        return any(stamp is not None and stamp.racy() for stamp in self.stamps)

    def size_problems(self) -> list[str]:
        """A problem if the files together exceed :data:`MAX_TOTAL_BYTES`."""
        total = sum(stamp.size for stamp in self.stamps if stamp is not None)
        if total > MAX_TOTAL_BYTES:
            return [f"the manifests total {total} bytes, more than the limit of {MAX_TOTAL_BYTES}"]
        return []


def list_manifest_files(paths: Sequence[Path]) -> FileList:
    """The files to read: directories expanded (non-recursively, sorted), explicit paths kept.

    A directory entry with a manifest suffix that is not a regular file (a FIFO, a socket,
    a device, a subdirectory) is skipped and named in ``skipped``; an explicit path that
    does not exist is a problem (an explicit non-regular file is reported when read).
    Only ``stat`` is used here, never ``open``.
    """
    files: list[Path] = []
    stamps: list[Stamp | None] = []
    problems: list[str] = []
    skipped: list[str] = []
    for path in paths:
        if path.is_dir():
            try:
                children = sorted(path.iterdir())
            except OSError as exc:
                problems.append(f"{path}: cannot list directory: {_os_reason(exc)}")
                continue
            for child in children:
                if child.suffix not in MANIFEST_SUFFIXES:
                    continue
                try:
                    st = child.stat()
                except OSError:
                    continue  # removed since the listing (or a dangling link): absent
                if stat.S_ISREG(st.st_mode):
                    files.append(child)
                    stamps.append(Stamp(st.st_mtime_ns, st.st_size, st.st_ino))
                else:
                    skipped.append(f"{child}: not a regular file ({_file_type(st.st_mode)})")
        elif path.exists():
            files.append(path)
            stamps.append(Stamp.of(path))
        else:
            problems.append(f"{path}: no such file or directory")
    return FileList(tuple(files), tuple(stamps), tuple(problems), tuple(skipped))


# --------------------------------------------------------------------------- bytes


def read_manifest_file(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of one regular file of at most ``limit`` bytes; else ManifestError.

    Never blocks on a FIFO or device: the path is checked with ``stat`` before it is
    opened, and opened with ``O_NONBLOCK`` and checked again with ``fstat`` (it may have
    been replaced in between).  A file that does not exist (any more) raises
    ``FileNotFoundError``: whether that is a problem is the caller's call.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError([f"{path}: not a regular file ({_file_type(st.st_mode)})"])
        if st.st_size > limit:
            raise ManifestError([f"{path}: {st.st_size} bytes, more than the limit of {limit}"])
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ManifestError([f"{path}: not a regular file ({_file_type(st.st_mode)})"])
            chunks: list[bytes] = []
            size = 0
            while size <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read: {_os_reason(exc)}"]) from None
    if size > limit:  # it grew while being read
        raise ManifestError([f"{path}: more than the limit of {limit} bytes"])
    return b"".join(chunks)


# --------------------------------------------------------------------------- documents


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_CHARS:
        raise JsonLimitError(
            f"integer of {len(text)} characters (at most {MAX_INT_CHARS} are allowed)"
        )
    return int(text)


def _parse_json(path: Path, data: bytes) -> object:
    if json_depth(data) > MAX_DEPTH:
        raise ManifestError([f"{path}: nested more than {MAX_DEPTH} levels deep"])
    try:
        text = data.decode("utf-8")
        if not has_long_int(data):
            return json.loads(text)  # no integer can be too long: the fast path
        return json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            [f"{path}: line {exc.lineno}, column {exc.colno}: JSON syntax error: {exc.msg}"]
        ) from None
    except JsonLimitError as exc:
        raise ManifestError([f"{path}: {exc}"]) from None
    except RecursionError:
        raise ManifestError([f"{path}: nested too deeply"]) from None
    except Exception as exc:  # anything else a parser raises: a problem, not a crash
        raise ManifestError([f"{path}: cannot parse: {exception_text(exc)}"]) from None


def parse_documents(path: Path, data: bytes) -> list[object]:
    """The documents in one file's bytes (JSON for ``*.json``, else YAML).

    Raises only ManifestError (see the module's invariants).
    """
    try:
        if path.suffix == ".json":
            return [_parse_json(path, data)]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(
                [f"{path}: cannot read: not UTF-8 (byte {exc.start}: {exc.reason})"]
            ) from None
        return parse_yaml(path, text)
    except YamlProblem as exc:
        raise ManifestError([exc.problem]) from None
    except ManifestError:
        raise
    except Exception as exc:  # MemoryError, RecursionError in our own code ...: a problem
        raise ManifestError([f"{path}: cannot parse: {exception_text(exc)}"]) from None
