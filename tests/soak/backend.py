"""One soak backend, run as its own process so it can be SIGKILLed and restarted.

Usage: python -m tests.soak.backend NAME IP PORTS REPORT_FILE

Serves TCP and UDP on every port in PORTS (comma-separated) of IP, prints ``READY`` once
listening.  TCP, one thread per connection:

* on accept it sends ``H <name> <conn-id>`` (conn-id = ``<pid>x<n>``);
* the client's first line is ``T <token>``; then commands, one line each:
  ``ECHO n k``      read n bytes (pattern ``<token>.<k>``), echo them, then ``E <cid> <sha>``
  ``STREAM n s``    send n bytes of pattern ``<cid>/<s>``, then ``S <cid> <sha>``
  ``SLOW n s``      the same in 2 KiB pieces 10 ms apart (a slow writer)
  ``UPLOAD n k``    read n bytes (pattern ``<token>.<k>``), reply ``U <cid> <sha>``
  ``SLOWREAD n k``  the same, reading 4 KiB every 5 ms (a slow reader)
  ``HALFCLOSE n k`` read n bytes, then expect EOF, reply ``F <cid> <n> <sha>`` and close
  ``RST_AFTER n s`` send n bytes of pattern ``<cid>/<s>``, then reset (SO_LINGER 0)
  ``BYE``           reply ``B <cid>`` and close (the server ends the connection)
  ``PING``          reply ``P <cid>``
* when the connection ends a line ``R <token> <name> <cid> <how> <state>`` is appended to
  REPORT_FILE: ``how`` is EOF, RST (ECONNRESET), EPIPE, RSTSENT, BYE, HALF, BAD or
  ERR:<errno>; ``state`` says what the connection was doing (``idle``, ``upload:got/n``...).
  Bytes that are not what the client sent (another connection's) give ``BAD`` with the
  mismatch described.

UDP: a datagram ``<token> <payload>`` is answered with ``<name> <token> <sha of payload>``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import signal
import socket
import struct
import sys
import threading
import time

from tests.soak.wire import describe_mismatch, pattern

CHUNK = 65536


class Ended(Exception):
    """The connection ended: ``how`` is EOF, RST, EPIPE or ERR:<errno>."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class Bad(Exception):
    """The client sent something that is not the protocol (or not its own bytes)."""


def _how(exc: OSError) -> str:
    if isinstance(exc, ConnectionResetError):
        return "RST"
    if isinstance(exc, BrokenPipeError):
        return "EPIPE"
    return f"ERR:{errno.errorcode.get(exc.errno or 0, exc.errno)}"


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.state = "greeting"

    def _fill(self, size: int = CHUNK) -> None:
        try:
            data = self.sock.recv(size)
        except OSError as exc:
            raise Ended(_how(exc)) from None
        if not data:
            raise Ended("EOF")
        self.buf += data

    def line(self) -> str:
        while b"\n" not in self.buf:
            if len(self.buf) > 200:
                raise Bad(f"no command line: {bytes(self.buf[:80])!r}")
            self._fill()
        index = self.buf.index(b"\n")
        raw = bytes(self.buf[:index])
        del self.buf[: index + 1]
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise Bad(f"not a command line: {raw[:80]!r}") from None

    def exact(self, size: int, piece: int = CHUNK, delay: float = 0.0) -> bytes:
        """Read exactly ``size`` bytes (``state`` tracks the progress)."""
        what = self.state
        out = bytearray()
        while len(out) < size:
            if not self.buf:
                if delay:
                    time.sleep(delay)
                self._fill(min(piece, size - len(out)))
            take = min(size - len(out), len(self.buf))
            out += self.buf[:take]
            del self.buf[:take]
            self.state = f"{what}:{len(out)}/{size}"
        return bytes(out)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise Ended(_how(exc)) from None


class Server:
    def __init__(self, name: str, ip: str, ports: list[int], report: str) -> None:
        self.name = name
        self.ip = ip
        self.ports = ports
        self.report_fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.ids = itertools.count(1)
        self.pid = os.getpid()

    def report(self, token: str, cid: str, how: str, state: str) -> None:
        line = f"R {token} {self.name} {cid} {how} {state}\n"
        os.write(self.report_fd, line.replace("\n", " ").rstrip().encode() + b"\n")

    # -- TCP -----------------------------------------------------------------------------
    def listen_tcp(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.ip, port))
        sock.listen(1024)
        return sock

    def accept(self, sock: socket.socket) -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, sock: socket.socket) -> None:
        cid = f"{self.pid}x{next(self.ids)}"
        conn = Conn(sock)
        token = "-"
        how = "?"
        try:
            conn.send(f"H {self.name} {cid}\n".encode())
            first = conn.line()
            if not first.startswith("T "):
                raise Bad(f"first line {first[:80]!r}")
            token = first[2:].strip()
            how = self.commands(conn, token, cid)
        except Ended as end:
            how = end.how
        except Bad as bad:
            how = "BAD"
            conn.state += f" {bad}"
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            with contextlib.suppress(OSError):
                sock.close()
        self.report(token, cid, how, conn.state)

    def commands(self, conn: Conn, token: str, cid: str) -> str:
        while True:
            conn.state = "idle"
            words = conn.line().split()
            if not words:
                raise Bad("empty command")
            cmd, args = words[0], words[1:]
            conn.state = cmd.lower()
            if cmd in ("ECHO", "UPLOAD", "SLOWREAD", "HALFCLOSE"):
                size, k = int(args[0]), args[1]
                expected = pattern(f"{token}.{k}", size)
                if cmd == "ECHO":
                    got = bytearray()
                    while len(got) < size:
                        piece = conn.exact(min(CHUNK, size - len(got)))
                        got += piece
                        conn.send(piece)
                    data = bytes(got)
                elif cmd == "SLOWREAD":
                    data = conn.exact(size, piece=4096, delay=0.005)
                else:
                    data = conn.exact(size)
                if data != expected:
                    raise Bad("client bytes " + describe_mismatch(data, expected)[1])
                digest = hashlib.sha256(data).hexdigest()
                if cmd == "ECHO":
                    conn.send(f"E {cid} {digest}\n".encode())
                elif cmd == "HALFCLOSE":
                    conn.state = "halfclose:await-eof"
                    try:
                        extra = conn.line()
                    except Ended as end:
                        if end.how != "EOF":
                            raise
                    else:
                        raise Bad(f"data after HALFCLOSE payload: {extra[:80]!r}")
                    conn.send(f"F {cid} {size} {digest}\n".encode())
                    conn.sock.shutdown(socket.SHUT_WR)
                    return "HALF"
                else:
                    conn.send(f"U {cid} {digest}\n".encode())
            elif cmd in ("STREAM", "SLOW", "RST_AFTER"):
                size, seed = int(args[0]), args[1]
                data = pattern(f"{cid}/{seed}", size)
                if cmd == "SLOW":
                    for i in range(0, size, 2048):
                        conn.send(data[i : i + 2048])
                        time.sleep(0.01)
                else:
                    for i in range(0, size, CHUNK):
                        conn.send(data[i : i + CHUNK])
                if cmd == "RST_AFTER":
                    conn.sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    return "RSTSENT"
                conn.send(f"S {cid} {hashlib.sha256(data).hexdigest()}\n".encode())
            elif cmd == "BYE":
                conn.send(f"B {cid}\n".encode())
                return "BYE"
            elif cmd == "PING":
                conn.send(f"P {cid}\n".encode())
            else:
                raise Bad(f"unknown command {cmd[:40]!r}")

    # -- UDP -----------------------------------------------------------------------------
    def bind_udp(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((self.ip, port))
        return sock

    def serve_udp(self, sock: socket.socket) -> None:
        while True:
            data, peer = sock.recvfrom(65535)
            token, _, payload = data.partition(b" ")
            digest = hashlib.sha256(payload).hexdigest()
            with contextlib.suppress(OSError):
                sock.sendto(f"{self.name} ".encode() + token + f" {digest}".encode(), peer)


def main() -> None:
    name, ip, ports, report = sys.argv[1:5]
    server = Server(name, ip, [int(p) for p in ports.split(",")], report)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threads = []
    for port in server.ports:
        tcp = server.listen_tcp(port)
        udp = server.bind_udp(port)
        threads.append(threading.Thread(target=server.accept, args=(tcp,), daemon=True))
        threads.append(threading.Thread(target=server.serve_udp, args=(udp,), daemon=True))
    for thread in threads:
        thread.start()
    print("READY", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
