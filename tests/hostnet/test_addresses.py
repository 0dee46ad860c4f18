"""Tests of userproxy.hostnet.host_addresses and userproxy.hostnet.address_device.

``select_nodeport_addresses`` is pure and table-tested.  Everything that touches netlink runs
in a network namespace of its own (``upt-<random>``), inside a worker process started with
``ip netns exec``; this test process stays in the root namespace and observes the namespace
independently with ``ip -n NS -j ...``.  Deleting the namespace destroys every device created
in it, so the fixtures clean up even when a test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from userproxy.hostnet.host_addresses import read_host, select_nodeport_addresses

REPO = Path(__file__).resolve().parents[2]
CAP_NET_ADMIN = 12
DEVICE = "userproxy0"

# ---------------------------------------------------------------------------------------
# Pure: select_nodeport_addresses

ADDRS = ("10.0.0.5", "192.168.1.7", "127.0.0.1", "::1", "2001:db8::7", "fd00::5", "10.0.0.5")


@pytest.mark.parametrize(
    ("cidrs", "primary", "expected"),
    [
        pytest.param(
            (),
            (),
            ("10.0.0.5", "127.0.0.1", "192.168.1.7", "::1", "2001:db8::7", "fd00::5"),
            id="empty-means-all",
        ),
        pytest.param(("10.0.0.0/8",), (), ("10.0.0.5",), id="v4-cidr"),
        pytest.param(("2001:db8::/32",), (), ("2001:db8::7",), id="v6-cidr"),
        pytest.param(("fd00:0::/8",), (), ("fd00::5",), id="v6-cidr-noncanonical"),
        pytest.param(
            ("primary",),
            ("192.168.1.7", "2001:db8::7"),
            ("192.168.1.7", "2001:db8::7"),
            id="primary",
        ),
        pytest.param(("primary",), (), (), id="primary-none-known"),
        pytest.param(
            ("127.0.0.0/8", "primary", "fd00::/8"),
            ("192.168.1.7",),
            ("127.0.0.1", "192.168.1.7", "fd00::5"),
            id="mixed",
        ),
        pytest.param(
            ("10.0.0.0/8", "10.0.0.5/32", "primary"),
            ("10.0.0.5",),
            ("10.0.0.5",),
            id="dedup",
        ),
        pytest.param(("172.16.0.0/12", "2001:db9::/32"), (), (), id="none-matching"),
        pytest.param(("10.1.2.3/8",), (), ("10.0.0.5",), id="host-bits-set"),
    ],
)
def test_select_nodeport_addresses(
    cidrs: tuple[str, ...], primary: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    assert select_nodeport_addresses(cidrs, ADDRS, primary) == expected


def test_select_nodeport_addresses_sorts_numerically_and_canonicalises() -> None:
    got = select_nodeport_addresses((), ["10.0.0.10", "10.0.0.9", "2001:DB8:0::1", "9.1.1.1"])
    assert got == ("9.1.1.1", "10.0.0.9", "10.0.0.10", "2001:db8::1")


@pytest.mark.both_loops
async def test_local_addresses_work_inside_a_running_event_loop() -> None:
    # pyroute2's default asyncio transport cannot be opened on uvloop (AF_NETLINK); the
    # module must hide that.  Read-only on the root namespace.
    here = (await read_host(routes=False)).local()
    assert here
    assert not any(a.startswith("fe80:") for a in here)
    assert (await read_host()).primary() <= here


# ---------------------------------------------------------------------------------------
# Namespaces

WORKER = r"""
import asyncio, json, logging, socket, sys
from userproxy.hostnet.address_device import AddressManager
from userproxy.hostnet.host_addresses import read_host

records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("userproxy").addHandler(Keep())
logging.getLogger("userproxy").setLevel(logging.INFO)

def serve(address):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((address, 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection((address, port), timeout=2) as client:
            conn, peer = server.accept()
            with conn:
                conn.sendall(b"hello")
                return {"reply": client.recv(5).decode(), "port": port}

async def local(exclude):
    host = await read_host()
    return sorted(host.local(exclude)), sorted(host.primary())

loop = asyncio.new_event_loop()

# How often a ticker task ran while make() was awaited, and its result.
async def ticks_during(make):
    ticks = 0
    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    before = ticks
    result = await make()
    during = ticks - before
    ticker.cancel()
    return during, result

async def read_and_sync(device, wanted):
    read, host = await ticks_during(read_host)
    manager = AddressManager(device)
    await manager.open()
    synced, _ = await ticks_during(lambda: manager.sync(wanted))
    await manager.close()
    return {"read": read, "addresses": len(host.addresses), "sync": synced}

def fresh_loop(name):
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()

manager = None
for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    if op == "open":
        manager = AddressManager(req.get("device", "userproxy0"))
        loop.run_until_complete(manager.open())
        out = {"created": manager.created, "kind": manager.kind}
    elif op == "sync":
        loop.run_until_complete(manager.sync(req["wanted"]))
        out = {}
    elif op == "close":
        loop.run_until_complete(manager.close())
        out = {}
    elif op == "serve":
        out = serve(req["address"])
    elif op == "local":
        here, primary = loop.run_until_complete(local(req.get("exclude", ())))
        out = {"local": here, "primary": primary}
    elif op == "ticks":
        other = fresh_loop(req["loop"])
        try:
            out = other.run_until_complete(read_and_sync(req["device"], req["wanted"]))
        finally:
            other.close()
    elif op == "local_in_loop":
        out = {"local": loop.run_until_complete(local(()))[0]}
    else:
        raise SystemExit(f"unknown op {op}")
    if manager is not None:
        out["added"] = sorted(manager.added)
    out["logs"] = records[:]
    records.clear()
    print(json.dumps(out), flush=True)
"""


def _has_cap_net_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return os.geteuid() == 0


def run(*argv: str, input: str | None = None) -> str:
    done = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=10, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str, input: str | None = None) -> str:
        return run("ip", "-n", self.name, *args, input=input)

    def addresses(self, device: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """ifname -> addr_info entries (link-local left out), as iproute2 reports them."""
        args = ("-j", "addr", "show") + (("dev", device) if device else ())
        links: list[dict[str, Any]] = json.loads(self.ip(*args))
        return {
            link["ifname"]: [a for a in link["addr_info"] if a.get("scope") != "link"]
            for link in links
        }

    def addrs_on(self, device: str) -> set[str]:
        return {a["local"] for a in self.addresses(device).get(device, [])}

    def link(self, device: str) -> dict[str, Any] | None:
        links: list[dict[str, Any]] = json.loads(self.ip("-j", "-d", "link", "show"))
        return next((link for link in links if link["ifname"] == device), None)


@pytest.fixture
def netns() -> Iterator[Netns]:
    if not _has_cap_net_admin():
        pytest.fail(
            "tests/hostnet need CAP_NET_ADMIN (run as root) to create network namespaces; "
            "CI runs them as root"
        )
    ns = Netns(f"upt-{secrets.token_hex(4)}")
    run("ip", "netns", "add", ns.name)
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], check=False, timeout=10)


class Worker:
    """A Python process inside the namespace driving the code under test."""

    def __init__(self, ns: Netns) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def __call__(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker died during {op} (exit {self.proc.wait(5)})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def worker(netns: Netns) -> Iterator[Worker]:
    w = Worker(netns)
    try:
        yield w
    finally:
        w.stop()


V4, V4B, V4C = "198.18.0.1", "198.18.0.2", "198.18.0.3"
V6, V6B = "2001:db8::1", "2001:db8::2"


def test_open_creates_bridge_when_dummy_is_missing(netns: Netns, worker: Worker) -> None:
    reply = worker("open")
    assert reply["created"] is True
    link = netns.link(DEVICE)
    assert link is not None
    expected_kind = reply["kind"]
    assert link["linkinfo"]["info_kind"] == expected_kind
    assert expected_kind in {"dummy", "bridge"}
    if not Path("/sys/module/dummy").exists():
        assert expected_kind == "bridge"
    assert "UP" in link["flags"]


def test_sync_adds_usable_v4_and_v6_addresses(netns: Netns, worker: Worker) -> None:
    worker("open")
    reply = worker("sync", wanted=[V4, V6, V4B])
    assert reply["added"] == sorted([V4, V4B, V6])
    infos = {a["local"]: a for a in netns.addresses(DEVICE)[DEVICE]}
    assert set(infos) == {V4, V4B, V6}
    assert infos[V4]["prefixlen"] == 32
    assert infos[V6]["prefixlen"] == 128
    assert not infos[V6].get("tentative"), "IPv6 address must be usable at once (nodad)"
    for address in (V4, V6):
        assert worker("serve", address=address)["reply"] == "hello"
    assert any(V6 in message for message in reply["logs"])


def test_sync_with_smaller_set_removes_only_those(netns: Netns, worker: Worker) -> None:
    worker("open")
    worker("sync", wanted=[V4, V4B, V4C, V6, V6B])
    reply = worker("sync", wanted=[V4B, V6B])
    assert reply["added"] == [V4B, V6B]
    assert netns.addrs_on(DEVICE) == {V4B, V6B}
    reply = worker("sync", wanted=[V4B, V6B])  # no change: nothing logged
    assert reply["logs"] == []
    assert netns.addrs_on(DEVICE) == {V4B, V6B}


def test_address_already_on_lo_is_never_added_nor_removed(netns: Netns, worker: Worker) -> None:
    netns.ip("addr", "add", f"{V4C}/32", "dev", "lo")
    worker("open")
    reply = worker("sync", wanted=[V4, V4C])
    assert reply["added"] == [V4]
    assert netns.addrs_on(DEVICE) == {V4}
    worker("sync", wanted=[])
    worker("close")
    assert V4C in netns.addrs_on("lo")
    assert netns.link(DEVICE) is None


def test_foreign_address_on_existing_device_is_left_alone(netns: Netns, worker: Worker) -> None:
    netns.ip("link", "add", DEVICE, "type", "bridge")
    netns.ip("addr", "add", f"{V4C}/32", "dev", DEVICE)
    reply = worker("open")
    assert reply["created"] is False
    reply = worker("sync", wanted=[V4, V4C])
    assert reply["added"] == [V4]
    assert netns.addrs_on(DEVICE) == {V4, V4C}
    reply = worker("sync", wanted=[])
    assert reply["added"] == []
    assert netns.addrs_on(DEVICE) == {V4C}
    worker("sync", wanted=[V4, V6])
    worker("close")
    assert netns.link(DEVICE) is not None, "a device we did not create is not deleted"
    assert netns.addrs_on(DEVICE) == {V4C}


def test_close_removes_everything_and_deletes_device(netns: Netns, worker: Worker) -> None:
    worker("open")
    worker("sync", wanted=[V4, V6])
    reply = worker("close")
    assert reply["added"] == []
    assert netns.link(DEVICE) is None
    assert reply["logs"][-1] == f"manage-addresses: deleted device {DEVICE}"
    assert worker("close")["logs"] == []  # idempotent


def test_errors_are_per_address(netns: Netns, worker: Worker) -> None:
    worker("open")
    sysctl = f"net.ipv6.conf.{DEVICE}.disable_ipv6=1"
    run("ip", "netns", "exec", netns.name, "sysctl", "-qw", sysctl)
    reply = worker("sync", wanted=[V6, "not-an-ip", V4])
    assert reply["added"] == [V4]
    assert netns.addrs_on(DEVICE) == {V4}
    errors = [m for m in reply["logs"] if "cannot add" in m or "not an IP" in m]
    assert len(errors) == 2
    assert any(V6 in m and "errno" in m for m in errors)


def test_leftovers_of_a_killed_run_are_adopted(netns: Netns) -> None:
    first = Worker(netns)
    try:
        first("open")
        first("sync", wanted=[V4, V6])
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.stop()
    netns.ip("addr", "add", f"{V4C}/32", "dev", DEVICE)  # someone else's
    second = Worker(netns)
    try:
        reply = second("open")
        assert reply["added"] == sorted([V4, V6])
        second("sync", wanted=[V6])
        assert netns.addrs_on(DEVICE) == {V6, V4C}
    finally:
        second.stop()


def test_local_and_primary_addresses_in_a_namespace(netns: Netns, worker: Worker) -> None:
    netns.ip("link", "add", "upa", "type", "veth", "peer", "name", "upb")
    netns.ip("addr", "add", "198.18.1.1/24", "dev", "upa")
    netns.ip("addr", "add", "198.18.2.1/24", "dev", "upb")
    netns.ip("addr", "add", "2001:db8:2::1/64", "dev", "upb", "nodad")
    for device in ("upa", "upb"):
        netns.ip("link", "set", device, "up")
    reply = worker("local")
    assert reply["local"] == sorted(
        ["127.0.0.1", "::1", "198.18.1.1", "198.18.2.1", "2001:db8:2::1"]
    )
    # No default route: the first non-loopback address per family.
    assert len(reply["primary"]) == 2
    assert "2001:db8:2::1" in reply["primary"]
    netns.ip("route", "add", "default", "via", "198.18.1.2", "dev", "upa")
    assert worker("local")["primary"] == ["198.18.1.1", "2001:db8:2::1"]
    assert worker("local_in_loop")["local"] == reply["local"]
    worker("open")
    worker("sync", wanted=[V4])
    assert V4 in worker("local")["local"]
    assert V4 not in worker("local", exclude=[DEVICE])["local"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_reads_and_syncs_await_the_kernel_and_let_the_loop_run(
    netns: Netns, worker: Worker, loop: str
) -> None:
    """The property bench/node_addresses.py measures, without a clock: while a read of
    1000 addresses (and a sync adding 200) is in flight, a task doing nothing but
    ``await asyncio.sleep(0)`` keeps running.  A read that blocked the loop (the sync
    IPRoute, or a thread joined from the loop) lets it run not once."""
    netns.ip("link", "add", "upmany", "type", "bridge")
    many = (f"addr add 198.18.{i // 250}.{i % 250 + 1}/32 dev upmany\n" for i in range(1000))
    netns.ip("-batch", "-", input="".join(many))
    wanted = [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(200)]
    reply = worker("ticks", loop=loop, device=DEVICE, wanted=wanted)
    assert reply["addresses"] >= 1000
    # One turn per datagram of about 40 addresses, one per address added: generous floors.
    assert reply["read"] >= 10, reply
    assert reply["sync"] >= 100, reply
