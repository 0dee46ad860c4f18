"""A fake cluster for ``userproxy connect`` tests: the fake API server with its pod
port-forward, pods that are local servers, and ``userproxy connect`` as a child process.

Addresses: pods on 127.0.131.N (HTTP on 8080 answering the pod's name, echo on 9000,
a reset after 1 MB on 9100); each child's Services in a /24 of its own (127.0.134.0/24,
127.0.135.0/24...), its DNS responder on 127.0.130.N:5353.  No other test uses these.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.backends import Backend, echo
from tests.support.fake_apiserver import FakeApiServer
from tests.support.manifests import endpoint_slice, service
from tests.support.proxyrun import proxy_process, wait_logged

POD_NET = "127.0.131"
HTTP_PORT, ECHO_PORT, RESET_PORT = 8080, 9000, 9100
SUMMARY = "Services served here:"
#: The child's stdout names each Service's address in the summary table.
REPO = Path(__file__).resolve().parents[2]


def http_name(name: str) -> Any:
    """An HTTP/1.1 server answering every request with ``name`` (then closing)."""

    def handle(conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            data = conn.recv(4096)
            if not data:
                return
            request += data
        body = name.encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    return handle


def reset_after(count: int) -> Any:
    """Send ``count`` bytes, then reset the connection (SO_LINGER 0)."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(b"x" * count)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    return handle


def pod_endpoint(ip: str, pod: str | None, ready: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": ready}}
    if pod is not None:
        entry["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "default"}
    return entry


@dataclass
class FakeCluster:
    """Services ``web`` (80 -> pods' 8080), ``db`` (5432 -> echo on 9000), ``flaky``
    (7000 -> 9100, resets after 1 MB) and ``dns`` (53/UDP) in ``default``; ``other`` in
    namespace ``team``.  ``set_web(n...)`` makes pods web-n the ready endpoints of web."""

    api: FakeApiServer
    pods: dict[str, list[Backend]] = field(default_factory=dict)

    def add_pod(self, name: str, index: int) -> str:
        ip = f"{POD_NET}.{index}"
        if name not in self.pods:
            self.pods[name] = [
                Backend(ip, http_name(name), HTTP_PORT),
                Backend(ip, echo, ECHO_PORT),
                Backend(ip, reset_after(1 << 20), RESET_PORT),
            ]
        self.api.pods[("default", name)] = ip
        return ip

    def set_web(self, *indexes: int, podless: Sequence[int] = ()) -> None:
        endpoints = [pod_endpoint(self.add_pod(f"web-{i}", i), f"web-{i}") for i in indexes]
        endpoints += [pod_endpoint(f"{POD_NET}.{i}", None) for i in podless]
        self.api.apply(
            "endpointslices",
            endpoint_slice("web-abc", "web", {"http": HTTP_PORT}, endpoints=endpoints),
        )

    def setup(self) -> None:
        api = self.api
        api.namespaces.add("team")
        api.create("services", service("web", "10.96.0.10", {"http": 80}))
        self.set_web(1, 2, 3)
        api.create("services", service("db", "10.96.0.11", {"tcp": 5432}))
        db_ip = self.add_pod("db-0", 10)
        api.create(
            "endpointslices",
            endpoint_slice(
                "db-x", "db", {"tcp": ECHO_PORT}, endpoints=[pod_endpoint(db_ip, "db-0")]
            ),
        )
        api.create("services", service("flaky", "10.96.0.12", {"tcp": 7000}))
        api.create(
            "endpointslices",
            endpoint_slice(
                "flaky-x", "flaky", {"tcp": RESET_PORT}, endpoints=[pod_endpoint(db_ip, "db-0")]
            ),
        )
        api.create("services", service("dns", "10.96.0.13", {"dns": 53}, protocol="UDP"))
        api.create("services", service("other", "10.96.0.14", {"tcp": 80}, namespace="team"))

    def stop(self) -> None:
        for backends in self.pods.values():
            for backend in backends:
                backend.stop()


@contextlib.asynccontextmanager
async def fake_cluster() -> AsyncIterator[FakeCluster]:
    async with FakeApiServer() as api:
        cluster = FakeCluster(api)
        try:
            cluster.setup()
            yield cluster
        finally:
            cluster.stop()


@dataclass
class Connect:
    """One ``userproxy connect`` child: its log (stdout and stderr) and hosts file."""

    proc: subprocess.Popen[str]
    log: Path
    hosts: Path
    dns: tuple[str, int]

    def summary(self) -> str:
        return wait_logged(self.log, SUMMARY)

    def address(self, name: str) -> str:
        """The local address of Service ``name`` (``web.default``), from the summary."""
        for line in self.log.read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == name:
                return fields[1]
        raise AssertionError(f"{name} is not in the summary:\n{self.log.read_text()}")


@contextlib.contextmanager
def connect_process(
    tmp_path: Path,
    kubeconfig: Path,
    *,
    loop: str,
    net: int,
    args: Sequence[str] = (),
    prefix: Sequence[str] = (),
    hosts_text: str = "127.0.0.1\tlocalhost\n",
) -> Iterator[Connect]:
    """``userproxy connect`` with a hosts file and the DNS responder, Services on
    127.0.<net>.0/24, DNS on 127.0.130.<net - 130>:5353; its files in ``tmp_path /
    connect-<net>`` (open to every user: the child may run as another)."""
    work = tmp_path / f"connect-{net}"
    work.mkdir(exist_ok=True)
    work.chmod(0o777)
    hosts = work / "hosts"
    if not hosts.exists():
        hosts.write_text(hosts_text)
    dns = (f"127.0.130.{net - 130}", 5353)
    log = work / "log"
    flags = [
        "connect", "--kubeconfig", str(kubeconfig), "-n", "default", "--loop", loop,
        "--address-range", f"127.0.{net}.0/24", "--hosts-file", str(hosts),
        "--dns", f"{dns[0]}:{dns[1]}", *args,
    ]  # fmt: skip
    with proxy_process(flags, REPO, prefix=prefix, log=log, env=_env()) as proc:
        yield Connect(proc, log, hosts, dns)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


def resolve_by_hosts_file(hosts: Path, names: Sequence[str]) -> dict[str, str]:
    """What the C library resolves ``names`` to with ``hosts`` as /etc/hosts (in a mount
    namespace of its own: the machine's /etc/hosts is never touched)."""
    script = "; ".join(f"getent hosts {name} || echo '- {name}'" for name in names)
    out = _in_mount_namespace(hosts, ["sh", "-c", script])
    found = {}
    for line in out.splitlines():
        address, *aliases = line.split()
        for name in names:
            if name in aliases:
                found[name] = address
    return found


def http_by_name(hosts: Path, url: str, count: int) -> list[str]:
    """``count`` GETs of ``url`` (a name resolved through ``hosts`` as /etc/hosts, by the
    C library, as curl would), each on a new connection; their bodies."""
    code = (
        "import json, urllib.request\n"
        f"print(json.dumps([urllib.request.urlopen({url!r}, timeout=5).read().decode() "
        f"for _ in range({count})]))"
    )
    return list(json.loads(_in_mount_namespace(hosts, [sys.executable, "-c", code])))


def _in_mount_namespace(hosts: Path, command: list[str]) -> str:
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed"
    wrapped = ["sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$@"', "sh", *command]
    result = subprocess.run(
        [unshare, "--mount", *wrapped], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def unprivileged_prefix(work: Path) -> list[str]:
    """A command prefix that runs a child as the unprivileged user nobody (uid 65534, no
    capabilities): ``setpriv`` when nobody can reach the interpreter, the project and
    ``work``; else (a checkout in a private directory) a user namespace in which the
    child is uid 65534, with no privilege in the machine's network namespace, and reads
    the checkout through the mapping of its owner."""
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [*setpriv, sys.executable, "-c", f"import os, userproxy; os.listdir({str(work)!r})"],
        cwd=REPO, env=_env(), capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    if probe.returncode == 0:
        return setpriv
    return ["unshare", "--user", "--map-user=65534", "--map-group=65534"]
