"""The handoff socket's file: who may reach it, and replacing it without a gap.

Whoever can connect to the socket can take every listening socket of the proxy, so:
the file is created mode 0600 (bound under a private name, chmod-ed, then renamed into
place, so it is never reachable with a wider mode), and its directory must not be
writable by others (there, anyone could replace the file with their own listener and
receive the next process's connection).  The directory is created 0700 when missing.

A process that took over renames its own socket over the old one's: connecting to the
path reaches exactly one process at every moment, and a stale file (a process that was
killed) is replaced the same way.  ``BoundPath.remove`` unlinks the file only if it is
still this process's (same inode): a successor's file is never removed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from userproxy.config import ConfigError

__all__ = ["BoundPath", "bind", "check"]

BACKLOG = 8


def check(path: Path) -> None:
    """ConfigError (exit 2) unless ``path`` can be a handoff socket: its directory is not
    writable by others (created 0700 when missing) and ``path`` is a socket or absent."""
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = directory.stat().st_mode
    except OSError as exc:
        raise ConfigError.of("handoff_socket", f"cannot use {directory}: {exc.strerror}") from exc
    if mode & (stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError.of(
            "handoff_socket",
            f"{directory} is writable by other users (mode {stat.S_IMODE(mode):o}); whoever "
            "can replace the socket there can take every listening socket: use a directory "
            "only this user can write, e.g. mode 0700",
        )
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError.of("handoff_socket", f"{path} exists and is not a socket")
    except FileNotFoundError:
        pass


@dataclass(frozen=True, slots=True)
class BoundPath:
    """A listening SOCK_SEQPACKET socket at ``path`` (inode ``inode``)."""

    path: Path
    sock: socket.socket
    inode: int

    def remove(self) -> None:
        """Close the socket; unlink the file if it is still this one (idempotent)."""
        self.sock.close()
        with contextlib.suppress(OSError):
            if self.path.lstat().st_ino == self.inode:
                self.path.unlink()


def bind(path: Path) -> BoundPath:
    """Listen at ``path``, replacing whatever socket file is there in one rename."""
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(staging))
        finally:
            os.umask(old_umask)
        os.chmod(staging, 0o600)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        inode = staging.lstat().st_ino
        os.rename(staging, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            staging.unlink()
        raise
    return BoundPath(path, sock, inode)
