"""Linux inotify through ctypes: "something changed in these directories", at once.

The manifest source uses it to notice an edit within milliseconds instead of at the next
poll; it still polls (more slowly) as a fallback for file systems that do not report
changes (NFS, some container mounts).  Only "wake up and look" is needed, so events are
drained, not parsed (kube-proxy watches its config file the same way, with fsnotify).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable
from pathlib import Path

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)


class Inotify:
    """An inotify descriptor watching directories; ``fileno()`` becomes readable on change.

    Invariant: ``drain()`` after each readiness empties the queue, so a level-triggered
    reader fires once per burst of changes.
    """

    def __init__(self, directories: Iterable[Path]) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        self._fd: int = fd
        for directory in directories:
            wd = libc.inotify_add_watch(fd, os.fsencode(directory), _MASK)
            if wd < 0:
                errno = ctypes.get_errno()
                os.close(fd)
                raise OSError(errno, f"inotify_add_watch({directory}): {os.strerror(errno)}")

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> None:
        while True:
            try:
                if not os.read(self._fd, 65536):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def watch_directories(paths: Iterable[Path]) -> set[Path]:
    """The directories to watch for ``paths``: a directory itself, a file's parent (an
    editor or ``kubectl``-style atomic replace swaps the file's inode)."""
    return {path if path.is_dir() else (path.parent or Path(".")) for path in paths}
