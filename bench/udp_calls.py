"""What each UDP system-call choice costs per datagram, in this process, on loopback.

    .venv/bin/python -m bench.udp_calls [--datagrams 20000] [--repeats 9]

The UDP relay's per-datagram path (userproxy/dataplane/udp_listener.py and
udp_session.py) is a receive on one socket and a send on another.  This measures the
choices that path made, each as the CPU time of this process (utime + stime) per datagram,
the median of ``--repeats`` runs of ``--datagrams`` 64-byte datagrams queued beforehand
(``SO_RCVBUFFORCE``, so nothing is lost; needs root, else the kernel's rmem_max caps the
queue and the run says so):

* receiving: ``recvfrom(65535)`` (a fresh bytes object per datagram, what the relay does)
  against ``recvfrom_into`` a reused buffer, and against a small ``recvfrom(2048)``;
* sending upstream: ``send`` on a *connected* socket (what each session does) against
  ``sendto`` with the address on every call;
* reading per readiness event: a loop reader callback (``loop.add_reader``) that reads up
  to 128 datagrams per wake-up (what the relay does) against one datagram per wake-up, on
  uvloop and on the stock asyncio loop.

Only loopback sockets this process opens; nothing else is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import statistics
from collections.abc import Callable

import uvloop

#: SO_RCVBUFFORCE (Linux): a receive buffer beyond net.core.rmem_max, for root.
SO_RCVBUFFORCE = 33
PAYLOAD = b"x" * 64
QUEUE_BYTES = 64 << 20


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def udp_socket(queue: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    if queue:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, QUEUE_BYTES)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, QUEUE_BYTES)
    sock.setblocking(False)
    return sock


class Rig:
    """A sender, the relay's inbound socket, and a sink with a connected sender to it."""

    def __init__(self) -> None:
        self.source = udp_socket()
        self.inbound = udp_socket(queue=True)
        self.sink = udp_socket(queue=True)
        self.upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.upstream.connect(self.sink.getsockname())
        self.upstream.setblocking(False)
        self.unconnected = udp_socket()

    def fill(self, count: int) -> None:
        to = self.inbound.getsockname()
        for _ in range(count):
            self.source.sendto(PAYLOAD, to)

    def drain(self) -> int:
        got = 0
        for sock in (self.inbound, self.sink):
            while True:
                try:
                    sock.recv(65535)
                except BlockingIOError:
                    break
                got += sock is self.sink
        return got

    def close(self) -> None:
        for sock in (self.source, self.inbound, self.sink, self.upstream, self.unconnected):
            sock.close()


def per_datagram(rig: Rig, count: int, repeats: int, run: Callable[[int], None]) -> float:
    """Median CPU µs per datagram of ``run(count)`` over queued datagrams."""
    samples = []
    for _ in range(repeats):
        rig.drain()
        rig.fill(count)
        before = cpu()
        run(count)
        samples.append((cpu() - before) / count * 1e6)
    rig.drain()
    return statistics.median(samples)


def call_choices(rig: Rig, count: int, repeats: int) -> list[tuple[str, float]]:
    inbound, upstream, unconnected = rig.inbound, rig.upstream, rig.unconnected
    sink = rig.sink.getsockname()
    buffer = bytearray(65535)
    view = memoryview(buffer)

    def recvfrom_large(n: int) -> None:
        for _ in range(n):
            inbound.recvfrom(65535)

    def recvfrom_into(n: int) -> None:
        for _ in range(n):
            inbound.recvfrom_into(buffer)

    def recvfrom_small(n: int) -> None:
        for _ in range(n):
            inbound.recvfrom(2048)

    def relay_connected(n: int) -> None:
        for _ in range(n):
            data, _client = inbound.recvfrom(65535)
            upstream.send(data)

    def relay_into_connected(n: int) -> None:
        for _ in range(n):
            size, _client = inbound.recvfrom_into(buffer)
            upstream.send(view[:size])

    def relay_sendto(n: int) -> None:
        for _ in range(n):
            data, _client = inbound.recvfrom(65535)
            unconnected.sendto(data, sink)

    return [
        (name, per_datagram(rig, count, repeats, run))
        for name, run in (
            ("receive: recvfrom(65535) [the relay's]", recvfrom_large),
            ("receive: recvfrom_into(reused buffer)", recvfrom_into),
            ("receive: recvfrom(2048)", recvfrom_small),
            ("relay: recvfrom + connected send [the relay's]", relay_connected),
            ("relay: recvfrom_into + connected send(view)", relay_into_connected),
            ("relay: recvfrom + sendto(address)", relay_sendto),
        )
    ]


def reader_batches(rig: Rig, count: int, repeats: int, use_uvloop: bool) -> list[float]:
    """CPU µs per datagram relayed by a loop reader reading 128, then 1, per wake-up."""
    inbound, upstream = rig.inbound, rig.upstream

    async def one_run(batch: int) -> float:
        loop = asyncio.get_running_loop()
        rig.drain()
        rig.fill(count)
        done = loop.create_future()
        moved = 0

        def readable() -> None:
            nonlocal moved
            for _ in range(batch):
                try:
                    data, _client = inbound.recvfrom(65535)
                except BlockingIOError:
                    break
                upstream.send(data)
                moved += 1
            if moved >= count and not done.done():
                done.set_result(None)

        before = cpu()
        loop.add_reader(inbound.fileno(), readable)
        await done
        loop.remove_reader(inbound.fileno())
        return (cpu() - before) / count * 1e6

    async def relay(batch: int) -> float:
        samples = [await one_run(batch) for _ in range(repeats)]
        rig.drain()
        return statistics.median(samples)

    async def both() -> list[float]:
        return [await relay(128), await relay(1)]

    if use_uvloop:
        return uvloop.run(both())
    return asyncio.run(both())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udp_calls", description=__doc__)
    parser.add_argument("--datagrams", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    rig = Rig()
    try:
        print("| per datagram (64 B, loopback) | CPU µs |")
        print("|---|---:|")
        for name, value in call_choices(rig, args.datagrams, args.repeats):
            print(f"| {name} | {value:.2f} |")
        for loop_name, use in (("uvloop", True), ("asyncio", False)):
            batched, single = reader_batches(rig, args.datagrams, args.repeats, use)
            print(f"| {loop_name} reader: up to 128 per wake-up [the relay's] | {batched:.2f} |")
            print(f"| {loop_name} reader: 1 per wake-up | {single:.2f} |")
    except BlockingIOError:
        print("the kernel queued fewer datagrams than asked: run as root or lower --datagrams")
        return 1
    finally:
        rig.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
