"""Processes the bench starts: each in its own process group, all stopped at the end."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: Descriptors every process the bench starts may open (10 000 proxied connections take
#: 20 000 in a proxy); raised from the hard limit when running as root.
NOFILE = 200_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile(wanted: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE as far as allowed; returns the soft limit now in force."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nofile() -> int:
    """The descriptor limit of the processes the bench starts."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    raise_nofile()


class Procs:
    """Owns every process started through it; :meth:`stop_all` ends their groups."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout: int | None = None,
        stdin: int | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdout=stdout if stdout is not None else log,
                stderr=log,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_child_setup,  # noqa: PLW1509 (the bench starts no threads)
                env=env,
            )
        finally:
            log.close()
        self._procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Whatever the leader left behind in its group (nginx workers, ...).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self._procs)):
            self.stop(proc)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * PAGE


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def can_connect(address: tuple[str, int], timeout: float = 0.5) -> bool:
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError:
        return False
    return True


def udp_bound(address: tuple[str, int]) -> bool:
    """True when a socket holds ``address`` (or the port on 0.0.0.0) as a UDP port, read
    from /proc/net/udp: probing by binding would race with the server's own bind."""
    port = f"{address[1]:04X}"
    ips = {
        f"{int.from_bytes(socket.inet_aton(ip), sys.byteorder):08X}"
        for ip in (address[0], "0.0.0.0")
    }
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        ip, _, hexport = line.split()[1].partition(":")
        if hexport == port and ip in ips:
            return True
    return False


def python() -> str:
    return sys.executable
