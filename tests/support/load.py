"""Load for tests that must show "nothing refused, nothing lost" while something changes:
an nginx HTTP backend, wrk against it through the proxy, and a UDP request/reply client.

Every piece is bounded in time and cleans up after itself; the programs (nginx, wrk) are
installed by .ci/run, and a test fails with the command to install them when they are not.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {ip}:{port} backlog=4096;
        location / {{ return 200 'ok\\n'; }}
    }}
}}
"""


def need(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise AssertionError(f"{program} is missing: apt-get install -y {package} (.ci/run does)")
    return path


@contextlib.contextmanager
def nginx_http(tmp: Path, ip: str, port: int) -> Iterator[tuple[str, int]]:
    """nginx answering every request with 200 on ``ip:port``; stopped at exit."""
    nginx = need("nginx", "nginx")
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(tmp=tmp, ip=ip, port=port))
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-e", str(tmp / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((ip, port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "nginx did not start: " + (tmp / "error.log").read_text()[-1000:]
                    ) from None
                time.sleep(0.05)
        yield ip, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    connect: int
    read: int
    write: int
    timeout: int
    non2xx: int
    output: str

    @property
    def errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout + self.non2xx


_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_TOTAL = re.compile(r"(\d+) requests in ")


def start_wrk(url: str, seconds: int, connections: int = 32) -> subprocess.Popen[str]:
    """wrk -t1 -cN -dS with ``Connection: close`` (a new connection per request)."""
    wrk = need("wrk", "wrk")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s"]
    argv += ["-H", "Connection: close", url]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wrk_result(proc: subprocess.Popen[str], timeout: float) -> WrkResult:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"wrk did not end in time:\n{out}") from None
    total = _TOTAL.search(out)
    if total is None:
        raise AssertionError(f"wrk printed no result:\n{out}")
    connect, read, write, timeout = (
        (int(x) for x in m.groups()) if (m := _ERRORS.search(out)) else (0, 0, 0, 0)
    )
    non2xx = int(m.group(1)) if (m := _NON2XX.search(out)) else 0
    return WrkResult(int(total.group(1)), connect, read, write, timeout, non2xx, out)


class UdpLoad:
    """One UDP client sending a numbered datagram every ``interval`` seconds to ``address``
    and counting the answers (an echo Service); ``stop()`` waits ``settle`` seconds for the
    last answers and returns (sent, answered)."""

    def __init__(self, address: tuple[str, int], interval: float = 0.002) -> None:
        self.address = address
        self.interval = interval
        self.sent = 0
        self.answered: set[int] = set()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._receiving = True

    def __enter__(self) -> UdpLoad:
        self._sender.start()
        self._receiver.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(settle=0.0)

    def _send(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self._sock.sendto(b"%d" % self.sent, self.address)
            self.sent += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _receive(self) -> None:
        while self._receiving:
            try:
                data = self._sock.recv(100)
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(ValueError):
                self.answered.add(int(data))

    def stop(self, settle: float = 1.0) -> tuple[int, int]:
        self._stop.set()
        if self._sender.is_alive():
            self._sender.join(5)
        time.sleep(settle)
        self._receiving = False
        if self._receiver.is_alive():
            self._receiver.join(5)
        self._sock.close()
        return self.sent, len(self.answered)
