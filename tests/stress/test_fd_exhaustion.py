"""Running out of file descriptors never kills the accept loop.

The proxy runs with RLIMIT_NOFILE pinned at 64 (soft and hard) and a --max-connections far
above what that allows, so accept() and connect() hit EMFILE.  It must back off, log at
most about once a second, stay alive, and serve again once descriptors are free.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import endpoint_slice, fresh_ips, service, write
from tests.support.proxyrun import proxy_process, wait_listening


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_emfile_backs_off_and_recovers(tmp_path: Path, loop: str) -> None:
    cluster_ip, backend_ip = fresh_ips()
    backend = Backend(backend_ip, name_server("b"))
    write(
        tmp_path / "s.json",
        service("web", cluster_ip, 8080),
        endpoint_slice("web-1", "web", backend.port, [backend.ip]),
    )
    address = (cluster_ip, 8080)
    args = ["run", "--manifests", str(tmp_path), "--loop", loop, "--max-connections", "10000"]
    log = tmp_path / "proxy.log"
    held: list[socket.socket] = []
    # prlimit (util-linux) pins the limit in the child only; preexec_fn is unsafe here
    # because this process runs threads.
    try:
        with proxy_process(args, prefix=["prlimit", "--nofile=64:64", "--"], log=log) as proc:
            wait_listening(address)
            # Hold far more connections than the proxy has descriptors for (bounded: 150).
            for _ in range(150):
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection(address, timeout=2))
            time.sleep(2.5)  # a few seconds of trouble, for the rate limit below to matter
            assert proc.poll() is None, "the proxy died on EMFILE"
            for sock in held:
                sock.close()
            held.clear()
            time.sleep(1.5)  # longest back-off is 1 s
            answers = [ask(address, timeout=5) for _ in range(5)]
            assert answers == ["b"] * 5
            assert proc.poll() is None
    finally:
        for sock in held:
            sock.close()
        backend.stop()
    output = log.read_text()
    resource_errors = [line for line in output.splitlines() if "Too many open files" in line]
    print(f"{loop}: {len(resource_errors)} EMFILE log lines")
    assert resource_errors, output[-2000:]
    # Rate limited: a few seconds of trouble give a handful of lines, not one per attempt.
    assert len(resource_errors) <= 12, "\n".join(resource_errors)
    assert "Traceback" not in output, output[-3000:]
