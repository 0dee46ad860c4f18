"""Network-namespace lab for the acceptance tests: namespaces, backends, clients, the proxy.

Layout (every address inside the namespaces is loopback or from 198.18.0.0/15, the range
RFC 2544 reserves for such tests)::

    client namespace                       node namespace
    upxc 198.18.0.2/24, 198.18.0.3/24  <->  upxn 198.18.0.1/24
    route 198.19.0.0/16 via 198.18.0.1       userproxy run --manage-addresses (userproxy0)
                                             backends on 127.0.0.2, 127.0.0.3 (lo)

Service addresses: ClusterIPs 198.19.0.0/24, externalIPs 198.19.1.0/24, load-balancer IPs
198.19.2.0/24; NodePorts on 198.18.0.1.

The same module is also the program run *inside* the namespaces
(``ip netns exec NS python -m tests.netns.harness ...``):

* ``backends NAME=IP:PORT ...``: TCP servers that answer each connection with their name
  and a newline, then echo every line they receive (so a long-lived connection can be
  checked); ``ready`` on stdout once all listen; they exit when stdin closes.
* ``agent``: a client that takes one JSON request per stdin line and answers one JSON line
  per request: ``connect`` (one connection: the backend's name, or REFUSED / RESET /
  TIMEOUT / UNREACHABLE / CLOSED), ``hold`` / ``send`` / ``drop`` (a kept connection),
  ``http`` (one GET).  Every operation is bounded by its own timeout.  It exits when stdin
  closes, closing whatever it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import http.client
import json
import os
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

# Re-exported: tests/netns/test_cleanup.py takes it from here.
from tests.support.proxyrun import stop_process

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]

NODE_IP = "198.18.0.1"
CLIENT_IP = "198.18.0.2"
#: A second client address (for the denied source of loadBalancerSourceRanges).
OTHER_CLIENT_IP = "198.18.0.3"
SERVICE_ROUTE = "198.19.0.0/16"
NODE_NAME = "node-a"
OTHER_NODE = "node-b"
DEVICE = "userproxy0"
METRICS_ADDRESS = ("127.0.0.1", 10249)
BACKEND_PORT = 9000

#: name -> (ip, nodeName).  Both live in the node namespace: the data path only dials
#: ip:port, so a "remote" endpoint is remote only by its slice's nodeName (another node).
BACKENDS: dict[str, tuple[str, str]] = {
    "local-1": ("127.0.0.2", NODE_NAME),
    "remote-1": ("127.0.0.3", OTHER_NODE),
}

#: What a client may see instead of a backend's name.
REFUSED = "REFUSED"
RESET = "RESET"
TIMEOUT = "TIMEOUT"
UNREACHABLE = "UNREACHABLE"
CLOSED = "CLOSED"

COMMAND_TIMEOUT = 10.0
MAX_LINE = 4096


# ================================================================ run inside the namespaces


def _readline(sock: socket.socket, deadline: float) -> str:
    """One line from ``sock`` ('' at EOF before any newline), bounded by ``deadline``."""
    data = b""
    for _ in range(MAX_LINE):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no line before the deadline")
        sock.settimeout(left)
        chunk = sock.recv(MAX_LINE)
        if not chunk:
            return ""
        data += chunk
        if b"\n" in data or len(data) >= MAX_LINE:
            break
    return data.partition(b"\n")[0].decode(errors="replace")


def _outcome(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return RESET
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return UNREACHABLE
    return f"ERROR {exc.errno} {exc.strerror}"


class _Agent:
    def __init__(self) -> None:
        self.held: dict[str, socket.socket] = {}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        timeout = float(request.get("timeout", 3.0))
        started = time.monotonic()
        try:
            if op == "connect":
                sock, name = self._open(request, started + timeout)
                sock.close()
                result: dict[str, Any] = {"result": name}
            elif op == "hold":
                self.held[request["id"]], name = self._open(request, started + timeout)
                result = {"result": name}
            elif op == "send":
                sock = self.held[request["id"]]
                sock.settimeout(timeout)
                sock.sendall(request["line"].encode() + b"\n")
                line = _readline(sock, started + timeout)
                result = {"result": line if line else CLOSED}
            elif op == "drop":
                self.held.pop(request["id"]).close()
                result = {"result": "dropped"}
            elif op == "http":
                result = self._http(request, timeout)
            else:
                result = {"result": f"ERROR unknown op {op!r}"}
        except OSError as exc:
            result = {"result": _outcome(exc)}
        result["elapsed"] = time.monotonic() - started
        return result

    def _open(self, request: dict[str, Any], deadline: float) -> tuple[socket.socket, str]:
        """A connection and the first line it got (the backend's name, or CLOSED)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if request.get("source"):
                sock.bind((request["source"], 0))
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.connect((request["host"], int(request["port"])))
            name = _readline(sock, deadline)
        except BaseException:
            sock.close()
            raise
        return sock, name or CLOSED

    def _http(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        conn = http.client.HTTPConnection(request["host"], int(request["port"]), timeout=timeout)
        try:
            conn.request("GET", request.get("path", "/"))
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
            return {"result": "http", "status": response.status, "body": body}
        finally:
            conn.close()

    def close(self) -> None:
        for sock in self.held.values():
            sock.close()
        self.held.clear()


def run_agent() -> None:
    agent = _Agent()
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:  # ends when the test closes our stdin
            if line.strip():
                print(json.dumps(agent.handle(json.loads(line))), flush=True)
    finally:
        agent.close()


async def _backend(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(name.encode() + b"\n")
        await writer.drain()
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def run_backends(specs: Sequence[str]) -> None:
    servers = []
    for spec in specs:
        name, _, address = spec.partition("=")
        host, _, port = address.rpartition(":")

        async def serve(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = name
        ) -> None:
            await _backend(name, reader, writer)

        servers.append(await asyncio.start_server(serve, host, int(port)))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    for server in servers:
        server.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.netns.harness")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("agent")
    backends = commands.add_parser("backends")
    backends.add_argument("specs", nargs="+", metavar="NAME=IP:PORT")
    args = parser.parse_args(argv)
    if args.command == "agent":
        run_agent()
    else:
        asyncio.run(run_backends(args.specs))


# ================================================================ the test side


class LabError(RuntimeError):
    """The lab itself could not be built or driven (not a finding about userproxy)."""


class NoPrivilege(LabError):
    """``ip netns add`` was refused: the tests cannot run here."""


def ip(*args: str) -> str:
    """Run ``ip ARGS`` (bounded); its stdout, or LabError with its stderr."""
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def namespaces() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def device_addresses(netns: str, device: str = DEVICE) -> set[str]:
    """The IPv4/IPv6 addresses on ``device`` in ``netns`` (empty if the device is gone)."""
    try:
        out = ip("-n", netns, "-j", "addr", "show", "dev", device)
    except LabError as exc:
        if "does not exist" in str(exc):
            return set()
        raise
    return {info["local"] for link in json.loads(out or "[]") for info in link["addr_info"]}


@contextlib.contextmanager
def network_namespaces() -> Iterator[tuple[str, str]]:
    """The client and node namespaces joined by a veth pair; both deleted at exit.

    Raises NoPrivilege when ``ip netns add`` is refused for lack of privilege.
    """
    token = secrets.token_hex(4)
    client, node = f"upx-{token}-client", f"upx-{token}-node"
    created: list[str] = []
    try:
        for name in (client, node):
            try:
                ip("netns", "add", name)
            except LabError as exc:
                text = str(exc)
                if "Permission denied" in text or "Operation not permitted" in text:
                    raise NoPrivilege(
                        f"cannot create network namespaces (needs CAP_SYS_ADMIN and "
                        f"CAP_NET_ADMIN): {text}"
                    ) from exc
                raise
            created.append(name)
        # Created inside the namespaces, so the names never meet the host's devices.
        ip(
            "-n",
            node,
            "link",
            "add",
            "upxn",
            "type",
            "veth",
            "peer",
            "name",
            "upxc",
            "netns",
            client,
        )
        ip("-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "upxn")
        ip("-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "upxc")
        ip("-n", client, "addr", "add", f"{OTHER_CLIENT_IP}/24", "dev", "upxc")
        for netns, dev in ((node, "upxn"), (client, "upxc")):
            ip("-n", netns, "link", "set", "lo", "up")
            ip("-n", netns, "link", "set", dev, "up")
        ip("-n", client, "route", "add", SERVICE_ROUTE, "via", NODE_IP)
        yield client, node
    finally:
        errors = []
        for name in reversed(created):
            try:
                ip("netns", "del", name)
            except LabError as exc:
                errors.append(str(exc))
        left = namespaces() & set(created)
        if errors or left:
            raise LabError(f"namespaces left behind: {sorted(left)}; errors: {errors}")


def in_netns(netns: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *command]


class Agent:
    """Drives one ``agent`` subprocess in a namespace: one JSON request, one JSON answer."""

    def __init__(self, netns: str, log: IO[bytes]) -> None:
        self.netns = netns
        self.proc = subprocess.Popen(
            in_netns(netns, sys.executable, "-m", "tests.netns.harness", "agent"),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            bufsize=0,
        )
        self._buffer = b""
        try:
            self._read(COMMAND_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            if b"\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\n")
                answer: dict[str, Any] = json.loads(line)
                return answer
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise LabError(f"agent in {self.netns} exited ({self.proc.poll()})")
                self._buffer += chunk
        raise LabError(f"agent in {self.netns} gave no answer within {timeout}s")

    def call(self, op: str, *, timeout: float = 3.0, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "timeout": timeout, **request}).encode())
        self.proc.stdin.write(b"\n")
        return self._read(timeout + COMMAND_TIMEOUT)

    def connect(
        self, host: str, port: int, *, source: str | None = None, timeout: float = 3.0
    ) -> str:
        """A new connection: the answering backend's name, or REFUSED, RESET, ..."""
        result: str = self.call("connect", host=host, port=port, source=source, timeout=timeout)[
            "result"
        ]
        return result

    def connect_timed(
        self, host: str, port: int, *, source: str | None = None, timeout: float = 3.0
    ) -> tuple[str, float]:
        answer = self.call("connect", host=host, port=port, source=source, timeout=timeout)
        return answer["result"], answer["elapsed"]

    def http(self, host: str, port: int, path: str = "/") -> dict[str, Any]:
        return self.call("http", host=host, port=port, path=path)

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        stop_process(self.proc)


@contextlib.contextmanager
def backends(netns: str, log: IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Every backend of BACKENDS, listening in ``netns``."""
    specs = [f"{name}={address}:{BACKEND_PORT}" for name, (address, _) in BACKENDS.items()]
    proc = subprocess.Popen(
        in_netns(netns, sys.executable, "-m", "tests.netns.harness", "backends", *specs),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], COMMAND_TIMEOUT)
        if not ready or proc.stdout.readline().strip() != b"ready":
            raise LabError(f"backends did not start (exit status {proc.poll()})")
        yield proc
    finally:
        stop_process(proc)


#: The lab's flags for ``userproxy``: a sync at once, metrics on METRICS_ADDRESS, debug logs.
LAB_FLAGS = (
    "--min-sync-period",
    "0",
    "--metrics-bind-address={}:{}".format(*METRICS_ADDRESS),
    "--log-level",
    "debug",
)


@contextlib.contextmanager
def userproxy(
    netns: str, manifests: Path, log: IO[bytes], flags: Sequence[str] = LAB_FLAGS
) -> Iterator[subprocess.Popen[bytes]]:
    """``userproxy run --manage-addresses`` in ``netns`` serving ``manifests``, with
    ``flags`` added; stopped (SIGTERM, then SIGKILL) at the end."""
    proc = subprocess.Popen(
        in_netns(
            netns,
            sys.executable,
            "-m",
            "userproxy",
            "run",
            "--manifests",
            str(manifests),
            "--hostname-override",
            NODE_NAME,
            "--manage-addresses",
            "--healthz-bind-address=",
            *flags,
        ),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        stop_process(proc, grace=15)


def eventually(
    probe: Callable[[], T],
    accept: Callable[[T], bool],
    *,
    within: float = 5.0,
    interval: float = 0.1,
    what: str = "the condition",
) -> T:
    """Call ``probe`` until ``accept`` takes its result (bounded in time and count)."""
    deadline = time.monotonic() + within
    last: T | None = None
    for _ in range(int(within / interval) + 2):
        last = probe()
        if accept(last):
            return last
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last result: {last!r}")


# ---------------------------------------------------------------- manifests as plain dicts


def service(
    name: str,
    cluster_ip: str,
    port: int = 80,
    *,
    type: str = "ClusterIP",
    node_port: int | None = None,
    external_ips: Sequence[str] = (),
    lb_ips: Sequence[str] = (),
    source_ranges: Sequence[str] = (),
    external_policy: str | None = None,
    internal_policy: str | None = None,
    health_check_node_port: int | None = None,
) -> dict[str, Any]:
    service_port: dict[str, Any] = {
        "name": "tcp",
        "protocol": "TCP",
        "port": port,
        "targetPort": "tcp",
    }
    if node_port is not None:
        service_port["nodePort"] = node_port
    spec: dict[str, Any] = {"type": type, "clusterIP": cluster_ip, "ports": [service_port]}
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    if external_policy is not None:
        spec["externalTrafficPolicy"] = external_policy
    if internal_policy is not None:
        spec["internalTrafficPolicy"] = internal_policy
    if health_check_node_port is not None:
        spec["healthCheckNodePort"] = health_check_node_port
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": lb} for lb in lb_ips]}}
    return obj


def endpoint_slice(service_name: str, backend_names: Sequence[str]) -> dict[str, Any]:
    """The slice of ``service_name`` with the named BACKENDS (each with its nodeName)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "protocol": "TCP", "port": BACKEND_PORT}],
        "endpoints": [
            {
                "addresses": [BACKENDS[name][0]],
                "conditions": {"ready": True},
                "nodeName": BACKENDS[name][1],
            }
            for name in backend_names
        ],
    }


@dataclass
class ManifestFile:
    """One test's manifest file in the directory the proxy polls (every 0.2 s)."""

    path: Path
    written: list[dict[str, Any]] = field(default_factory=list)

    def write(self, *objects: dict[str, Any]) -> None:
        """Replace the file's objects atomically (the proxy never sees half a file)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
        tmp.replace(self.path)
        self.written = list(objects)


@dataclass
class Lab:
    """The running lab a test drives."""

    client_ns: str
    node_ns: str
    manifests: Path
    logs: Path
    proxy: subprocess.Popen[bytes]
    client: Agent
    node: Agent

    def device_addresses(self) -> set[str]:
        return device_addresses(self.node_ns)

    def metrics(self) -> str:
        answer = self.node.http(*METRICS_ADDRESS, "/metrics")
        assert answer.get("status") == 200, f"metrics scrape failed: {answer}"
        body: str = answer["body"]
        return body

    def log_tails(self, lines: int = 150) -> list[tuple[str, str]]:
        tails = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            tails.append((path.name, "\n".join(text)))
        return tails


if __name__ == "__main__":
    main()
