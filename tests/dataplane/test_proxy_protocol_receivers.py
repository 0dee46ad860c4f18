"""The PROXY protocol header as real receivers read it: HAProxy (``bind ... accept-proxy``)
and nginx (``listen ... proxy_protocol``, its http and stream modules) as backends.

Each receiver answers with the connection it was told about: the client's address and port
and the address and port the client connected to (HAProxy ``%[src] %[src_port] %[dst]
%[dst_port]``, nginx ``$proxy_protocol_addr $proxy_protocol_port
$proxy_protocol_server_addr $proxy_protocol_server_port``).  The client binds its own
127.213.N.77 address, so what comes back is the client's address, not the proxy's (which
dials from 127.0.0.1); the port proves it is this very connection.  The nginx stream
server answers without reading anything: the client sends nothing, so the header alone
must reach it, as soon as the upstream connection is up.

The receivers are child processes (never daemons) with their configuration in a
temporary directory, started once per module on 127.213.250.x (and ::1) and stopped at
its end.  Missing programs are installed with apt-get (``receiver_programs``), as
bench/README.md lists them.  Addresses: 127.213.0.0/16 is this file's.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import running_proxy, stop_process, wait_listening

pytestmark = pytest.mark.both_loops

PACKAGES = ("haproxy", "nginx", "libnginx-mod-stream")
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
SERVICE_PORT = 8080
_nets = itertools.count(1 + (os.getpid() % 20) * 10)

Address = tuple[str, int]


def _missing() -> list[str]:
    missing = [name for name in ("haproxy", "nginx") if shutil.which(name) is None]
    if not STREAM_MODULE.exists() and "nginx" not in missing:
        missing.append("libnginx-mod-stream")
    return missing


@pytest.fixture(scope="session")
def receiver_programs() -> None:
    """HAProxy and nginx with its stream module, installed with apt-get when missing."""
    if not _missing():
        return
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.fail(
            f"missing {', '.join(_missing())}; install: apt-get install -y {' '.join(PACKAGES)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(
        install, capture_output=True, text=True, env=env, timeout=900, check=False
    )
    if result.returncode != 0:  # a stale package index: refresh it once and try again
        subprocess.run([apt, "update"], capture_output=True, env=env, timeout=900, check=False)
        result = subprocess.run(
            install, capture_output=True, text=True, env=env, timeout=900, check=False
        )
    if _missing():
        pytest.fail(f"apt-get could not install {' '.join(PACKAGES)}:\n{result.stderr[-2000:]}")


def _free_port(ip: str) -> int:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((ip, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Receiver:
    """One receiving server: its name, whether it speaks HTTP, and where it listens."""

    name: str
    http: bool
    ipv4: Address
    ipv6: Address


HAPROXY_CONFIG = """\
global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend proxied
    bind {v4[0]}:{v4[1]} accept-proxy
    bind [{v6[0]}]:{v6[1]} accept-proxy
    http-request return status 200 content-type text/plain lf-string "{seen}"
"""
HAPROXY_SEEN = "%[src] %[src_port] %[dst] %[dst_port]"

NGINX_SEEN = (
    "$proxy_protocol_addr $proxy_protocol_port"
    " $proxy_protocol_server_addr $proxy_protocol_server_port"
)
NGINX_CONFIG = """\
load_module {module};
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {http4[0]}:{http4[1]} proxy_protocol;
        listen [{http6[0]}]:{http6[1]} proxy_protocol;
        location / {{ return 200 "{seen}"; }}
    }}
}}
stream {{
    server {{
        listen {stream4[0]}:{stream4[1]} proxy_protocol;
        listen [{stream6[0]}]:{stream6[1]} proxy_protocol;
        return "{seen}";
    }}
}}
"""


@pytest.fixture(scope="module")
def receivers(
    receiver_programs: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Receiver]]:
    """HAProxy and nginx running as children of this test process, with every address they
    listen on accepting; both stopped (SIGTERM, then SIGKILL) and reaped at the end."""
    tmp = tmp_path_factory.mktemp("receivers")
    found = {
        name: Receiver(name, http, (ip, _free_port(ip)), ("::1", _free_port("::1")))
        for name, http, ip in (
            ("haproxy-http", True, "127.213.250.11"),
            ("nginx-http", True, "127.213.250.12"),
            ("nginx-stream", False, "127.213.250.13"),
        )
    }
    haproxy = found["haproxy-http"]
    (tmp / "haproxy.cfg").write_text(
        HAPROXY_CONFIG.format(v4=haproxy.ipv4, v6=haproxy.ipv6, seen=HAPROXY_SEEN)
    )
    http, stream = found["nginx-http"], found["nginx-stream"]
    (tmp / "nginx.conf").write_text(
        NGINX_CONFIG.format(
            module=STREAM_MODULE,
            tmp=tmp,
            http4=http.ipv4,
            http6=http.ipv6,
            stream4=stream.ipv4,
            stream6=stream.ipv6,
            seen=NGINX_SEEN,
        )
    )
    commands = {
        "haproxy": ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")],
        "nginx": [
            "nginx",
            "-p", str(tmp),
            "-c", str(tmp / "nginx.conf"),
            "-e", str(tmp / "nginx-error.log"),
            "-g", f"daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log;",
        ],
    }  # fmt: skip
    children: dict[str, subprocess.Popen[Any]] = {}
    try:
        for name, command in commands.items():
            with (tmp / f"{name}.out").open("wb") as out:
                children[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        for receiver in found.values():
            for address in (receiver.ipv4, receiver.ipv6):
                try:
                    wait_listening(address)
                except AssertionError:
                    logs = "\n".join(f"{p.name}: {p.read_text()}" for p in tmp.glob("*.out"))
                    raise AssertionError(
                        f"{receiver.name} not listening on {address}\n{logs}"
                    ) from None
        yield found
    finally:
        for child in children.values():
            stop_process(child)


def ask(receiver: Receiver, address: Address, source: str) -> tuple[Address, str]:
    """(the client's own address, what the receiver says it saw) for one connection from
    ``source`` to ``address``; an HTTP receiver gets a GET, the stream one nothing."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(address)
        local: Address = sock.getsockname()[:2]
        if receiver.http:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: proxied\r\n\r\n")
        chunks = []
        while data := sock.recv(4096):
            chunks.append(data)
    answer = b"".join(chunks).decode()
    if receiver.http:
        head, _, body = answer.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200"), answer
        answer = body
    return local, answer


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("name", ["haproxy-http", "nginx-http", "nginx-stream"])
async def test_receiver_sees_the_client(
    receivers: dict[str, Receiver], tmp_path: Path, name: str, version: str, family: str
) -> None:
    receiver = receivers[name]
    net = next(_nets)
    if family == "ipv4":
        endpoint = receiver.ipv4
        service_address = (f"127.213.{net}.1", SERVICE_PORT)
        source = f"127.213.{net}.77"
    else:
        endpoint = receiver.ipv6
        service_address = ("::1", _free_port("::1"))
        source = "::1"
    svc = service(
        f"pp-{net}",
        service_address[0],
        service_address[1],
        annotations={"userproxy.io/proxy-protocol": version},
    )
    eps = endpoint_slice(f"pp-{net}-1", f"pp-{net}", endpoint[1], [endpoint[0]])
    if family == "ipv6":
        svc["spec"]["ipFamilies"] = ["IPv6"]
        eps["addressType"] = "IPv6"
    (tmp_path / "m").mkdir()
    write(tmp_path / "m" / "pp.json", svc, eps)
    async with running_proxy(tmp_path / "m"):
        client, seen = await asyncio.to_thread(ask, receiver, service_address, source)
    # What the receiver saw: this client's address and port, and the Service's.
    assert seen.split() == [client[0], str(client[1]), service_address[0], str(service_address[1])]
    if family == "ipv4":
        assert client[0] != "127.0.0.1"  # the proxy's own source address when it dials
