"""Test peers: plain blocking sockets in threads, independent of the loop under test."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable


class Backend:
    """A TCP server on ``ip``: a thread accepts, and a thread per connection runs ``handle``.

    ``connections`` counts accepted connections; ``stop()`` closes everything it opened.
    """

    def __init__(self, ip: str, handle: Callable[[socket.socket], None], port: int = 0) -> None:
        self.ip = ip
        self._handle = handle
        self._sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((ip, port))
        self._sock.listen(512)
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._stopped:
                    conn.close()
                    return
                self.connections += 1
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def stop(self) -> None:
        """Stop listening and reset every open connection."""
        with self._lock:
            self._stopped = True
            conns = list(self._open)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then send FIN (relays half-close back)."""
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def name_server(name: str) -> Callable[[socket.socket], None]:
    """Answer each line received with ``name`` (one line per request), until EOF."""

    def handle(conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        for _line in reader:
            conn.sendall(name.encode() + b"\n")
        conn.shutdown(socket.SHUT_WR)

    return handle


def slow_reader(delay: float, chunk: int = 65536) -> Callable[[socket.socket], None]:
    """Read ``chunk`` bytes every ``delay`` seconds; answer the total at EOF."""

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        total = 0
        while data := conn.recv(chunk):
            total += len(data)
            time.sleep(delay)
        conn.sendall(str(total).encode())
        conn.shutdown(socket.SHUT_WR)

    return handle


def ask(
    address: tuple[str, int],
    line: bytes = b"hi\n",
    source: str | None = None,
    timeout: float = 5.0,
) -> str:
    """Open a connection, send one line, read the one-line answer, close."""
    with socket.create_connection(
        address, timeout=timeout, source_address=(source, 0) if source else None
    ) as sock:
        sock.sendall(line)
        return sock.makefile("rb").readline().decode().strip()


def echo_through(address: tuple[str, int], payload: bytes, timeout: float = 20.0) -> bytes:
    """Send ``payload`` to an echo at ``address`` while reading as many bytes back (two
    threads, no half-close: a port-forward has none); what came back."""
    with socket.create_connection(address, timeout=timeout) as conn:
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            got += chunk
        sender.join(timeout)
        return bytes(got)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


class UdpBackend:
    """A UDP server on ``ip`` in a thread: answers each datagram with ``handle(data)``
    (default: echo) and counts what it received; ``stop()`` closes it."""

    def __init__(
        self, ip: str, handle: Callable[[bytes], bytes | None] | None = None, port: int = 0
    ) -> None:
        self.ip = ip
        self._handle = handle or (lambda data: data)
        self._sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET,
                                   socket.SOCK_DGRAM)  # fmt: skip
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((ip, port))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self.received = 0
        self.peers: set[tuple[str, int]] = set()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                data, peer = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            self.peers.add(peer[:2])
            reply = self._handle(data)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._sock.sendto(reply, peer)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._sock.close()
