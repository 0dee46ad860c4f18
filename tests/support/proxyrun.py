"""Running a proxy for a test: in-process on the test's loop, or as a subprocess; waiting
for what it does.

Invariants: the health and metrics servers are off unless a test names them; every child
is stopped (SIGTERM, then SIGKILL) and reaped when its ``with`` block ends; a wait polls a
condition until a deadline and fails naming what it waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from userproxy.config import Settings
from userproxy.proxy import Proxy


@contextlib.asynccontextmanager
async def running_proxy(
    manifests: Path | None = None, *, wait_synced: bool = True, **overrides: Any
) -> AsyncIterator[Proxy]:
    """A Proxy serving ``manifests`` (or, with ``kubeconfig=``, an API server) on the
    running loop, synced once unless ``wait_synced`` is False, its metrics server (when a
    ``metrics_bind_address`` is given) listening, stopped at exit.

    A report to the loop's exception handler fails the test (tests/conftest.py).
    """
    options: dict[str, Any] = {
        "hostname": "test-node",
        "min_sync_period": 0.0,
        "manifest_poll_interval": 0.05,
        "shutdown_grace": 1.0,
        # Admin servers off unless a test asks: tests must not bind 0.0.0.0:10256.
        "healthz_bind_address": "",
        "metrics_bind_address": "",
    }
    options.update(overrides)
    if manifests is not None:
        options["manifests"] = (manifests,)
    settings = Settings(**options)
    proxy = Proxy(settings)
    task = asyncio.create_task(proxy.run())
    try:
        if wait_synced:
            async with asyncio.timeout(10):
                await proxy.synced.wait()
        if settings.metrics_address is not None:
            async with asyncio.timeout(10):  # tests then read /metrics, /status, / at once
                await proxy.metrics_ready.wait()
        yield proxy
    finally:
        proxy.stop()
        done, _ = await asyncio.wait({task}, timeout=15)
        if not done:
            # Name what is still running before failing: a hang at stop is otherwise only
            # "TimeoutError" with no clue which task ignored its cancellation.
            stacks = []
            for other in asyncio.all_tasks():
                if other is not asyncio.current_task():
                    frames = "".join(f"    {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}\n"
                                     for f in other.get_stack())  # fmt: skip
                    stacks.append(f"  {other.get_name()} {other.get_coro()!r}\n{frames}")
            task.cancel()
            raise AssertionError("the proxy did not stop within 15 s; tasks:\n" + "".join(stacks))
        await task


async def wait_for_sync(proxy: Proxy, syncs_after: int | None = None) -> None:
    """Wait until the proxier ran a sync after the given count (default: the current one)."""
    after = proxy.proxier.status.syncs if syncs_after is None else syncs_after
    async with asyncio.timeout(5):
        await proxy.wait_sync(after)


def wait_listening(address: tuple[str, int], timeout: float = 10.0) -> None:
    """Wait (blocking) until ``address`` accepts a TCP connection."""
    wait_until(lambda: _accepts(address), timeout, f"{address} to accept connections")


def _accepts(address: tuple[str, int]) -> bool:
    with socket.create_connection(address, timeout=1) as probe:
        # Closed with a reset, so a proxy drops the probe at once instead of relaying a
        # half-close and waiting for the backend's FIN: tests that count the proxy's open
        # connections right after (shutdown, limits) see only their own.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inode(fd: int, pid: int | None = None) -> int:
    """The kernel inode of socket descriptor ``fd`` (of ``pid``, by default this process)."""
    link = os.readlink(f"/proc/{pid or os.getpid()}/fd/{fd}")
    if not link.startswith("socket:["):
        raise ValueError(f"descriptor {fd} is not a socket: {link}")
    return int(link[len("socket:[") : -1])


def open_socket_inodes(pid: int | None = None) -> set[int]:
    """The inodes of every socket ``pid`` (by default this process) holds open now.

    An inode names one socket for its whole life, unlike a descriptor number, which
    the kernel hands out again as soon as it is closed.
    """
    inodes = set()
    fd_dir = f"/proc/{pid or os.getpid()}/fd"
    for name in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:  # closed between the listing and the read
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:[") : -1]))
    return inodes


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def proxy_process(
    args: Sequence[str],
    cwd: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    log: Path | None = None,
    stop_within: float = 15.0,
) -> Iterator[subprocess.Popen[str]]:
    """``python -m userproxy ARGS`` as a child process (run under ``prefix``, e.g. prlimit,
    with ``env`` if given); SIGTERM at exit, SIGKILL if it has not ended ``stop_within``
    seconds later.

    Its stdout and stderr go, merged, to ``proc.stdout`` (a pipe: read it once the child
    has exited, or it may fill up), or to the file ``log``, which can be read while the
    child runs (``wait_logged``) and holds any amount.

    The health and metrics servers are off unless ``args`` names their flags, so tests
    never bind the well-known ports.
    """
    extra = [
        f"{flag}="
        for flag in ("--healthz-bind-address", "--metrics-bind-address")
        if not any(arg.startswith(flag) for arg in args)
    ]
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(log.open("w")) if log is not None else subprocess.PIPE
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "userproxy", *args, *extra],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            yield proc
        finally:
            stop_process(proc, stop_within)


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaped; its pipes closed; its exit
    status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


#: What a child proxy's log must never hold: a crash, or an error the loop only logged.
CRASH_MARKERS = ("Traceback", "Exception in callback", "Fatal Python error")


def assert_clean_log(log: Path) -> None:
    """Fail if the child's ``log`` shows a traceback, a loop callback error or a crash."""
    output = log.read_text()
    for marker in CRASH_MARKERS:
        assert marker not in output, output[-3000:]


def wait_until(
    predicate: Callable[[], bool], within: float = 10.0, what: str = "the condition"
) -> None:
    """``eventually`` for a blocking test: wait until ``predicate()`` holds, checking every
    20 ms; an OSError (a server not up yet) counts as "not yet"; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_logged(log: Path, text: str, *, count: int = 1, within: float = 10.0) -> str:
    """Wait until ``text`` stands ``count`` times in the file ``log``; returns the file.

    This is how a test waits for a child's next round (a reload handled, a poll done)
    instead of sleeping and hoping it came."""
    wait_until(lambda: log.read_text().count(text) >= count, within, f"{text!r} in {log}")
    return log.read_text()


async def eventually(
    predicate: Callable[[], bool], within: float = 5.0, what: str = "the condition"
) -> None:
    """Wait until ``predicate()`` holds, checking every 10 ms; fail after ``within`` s."""
    try:
        async with asyncio.timeout(within):
            # Polling on purpose: the values checked (metrics, counters) signal nobody.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for admin servers in tests)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
