"""The backends and the five paths under test: userproxy, HAProxy, nginx stream, a minimal
uvloop relay (bench/relay.py) and direct.

Every address is on 127.0.0.0/8: backends on 127.0.91.1, each proxy on its own
127.0.90.x with the same ports, the direct path straight to the backends.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Procs, can_connect, children, nofile, python, udp_bound, wait_until

BACKEND = "127.0.91.1"
HTTP, IPERF, SP_UDP, SP_TCP, HOLD = 8080, 5201, 11111, 11112, 9000
TCP_PORTS = {"http": HTTP, "iperf": IPERF, "sp-tcp": SP_TCP, "hold": HOLD}
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@dataclass
class Peer:
    """One path from the clients to the backends."""

    name: str
    host: str
    udp: bool
    proc: subprocess.Popen[bytes] | None = None
    worker: bool = False  # the proxying process is the first child (nginx)
    log: str = ""  # the name of its log file in the temp dir

    @property
    def pid(self) -> int | None:
        """The process that relays the traffic (None for the direct path)."""
        if self.proc is None:
            return None
        if self.worker:
            kids = children(self.proc.pid)
            return kids[0] if kids else None
        return self.proc.pid


def max_proxied() -> int:
    """Proxied connections the descriptor limit allows one proxy (two descriptors each)."""
    return (nofile() - 1000) // 2


def _nginx_argv(tmp: Path, name: str, conf: str) -> list[str]:
    prefix = tmp / name
    prefix.mkdir(exist_ok=True)
    (prefix / "conf.nginx").write_text(conf)
    return ["nginx", "-p", str(prefix), "-c", str(prefix / "conf.nginx"), "-e", "stderr"]


def _nginx_head(tmp: Path, name: str, workers: int) -> str:
    prefix = tmp / name
    load = f"load_module {STREAM_MODULE};\n" if STREAM_MODULE.exists() else ""
    return (
        f"{load}worker_processes {workers};\ndaemon off;\nmaster_process on;\n"
        f"pid {prefix}/nginx.pid;\nerror_log stderr warn;\nworker_rlimit_nofile {nofile()};\n"
        f"events {{ worker_connections {nofile() - 100}; }}\n"
    )


def _connectable(address: tuple[str, int]) -> Callable[[], bool]:
    return lambda: can_connect(address)


def start_backends(procs: Procs, tmp: Path, http_workers: int) -> None:
    """nginx http (small body), iperf3 -s, a sockperf TCP server, an idle holder.  The
    sockperf UDP server starts for each UDP run (:class:`UdpBackend`)."""
    temp = tmp / "nginx-backend"
    temp.mkdir(exist_ok=True)
    temps = "".join(
        f"  {kind}_temp_path {temp}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = _nginx_head(tmp, "nginx-backend", http_workers) + (
        "http {\n  access_log off;\n  keepalive_requests 100000000;\n"
        "  keepalive_timeout 300s;\n" + temps + f"  server {{\n    listen {BACKEND}:{HTTP}"
        " backlog=4096;\n    location / { return 200 'hello from the bench backend\\n'; }\n"
        "  }\n}\n"
    )
    procs.start("nginx-backend", _nginx_argv(tmp, "nginx-backend", conf))
    procs.start("iperf3-server", ["iperf3", "-s", "-B", BACKEND, "-p", str(IPERF)])
    procs.start("sockperf-tcp", ["sockperf", "server", "--tcp", "-i", BACKEND, "-p", str(SP_TCP)])
    procs.start("holder", [python(), "-m", "bench.servers", "hold", BACKEND, str(HOLD)])
    for port in TCP_PORTS.values():
        wait_until(_connectable((BACKEND, port)), 15, f"backend {BACKEND}:{port}")


_SERVER_TOTAL = re.compile(r"Total (\d+) messages received")


class UdpBackend:
    """The sockperf UDP echo server on BACKEND:SP_UDP, started afresh for each run: when it
    stops (SIGINT) it prints how many datagrams it received, which is that run's count of
    datagrams the proxy delivered upstream."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.runs = 0
        self.received = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[UdpBackend]:
        """The server runs inside the block; ``received`` is its count afterwards."""
        self.runs += 1
        name = f"sockperf-udp-{self.runs}"
        argv = ["sockperf", "server", "-i", BACKEND, "-p", str(SP_UDP)]
        proc = self.procs.start(name, argv)
        try:
            wait_until(lambda: udp_bound((BACKEND, SP_UDP)), 15, "sockperf UDP server")
            yield self
        finally:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            self.procs.stop(proc)
        counts = _SERVER_TOTAL.findall(self.procs.log_tail(name, 40))
        if not counts:
            raise RuntimeError(
                f"sockperf UDP server printed no total:\n{self.procs.log_tail(name)}"
            )
        self.received = int(counts[-1])


def userproxy_manifests(host: str) -> dict[str, Any]:
    names = {**TCP_PORTS, "sp-udp": SP_UDP}
    proto = {name: "UDP" if name == "sp-udp" else "TCP" for name in names}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "clusterIP": host,
            "ports": [
                {"name": n, "protocol": proto[n], "port": p, "targetPort": n}
                for n, p in names.items()
            ],
        },
    }
    eps = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "bench-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "bench"},
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "protocol": proto[n], "port": p} for n, p in names.items()],
        "endpoints": [{"addresses": [BACKEND], "conditions": {"ready": True}}],
    }
    return {"apiVersion": "v1", "kind": "List", "items": [service, eps]}


def userproxy_argv(manifests: Path, *extra: str) -> list[str]:
    return [
        python(),
        "-m",
        "userproxy",
        "run",
        "--manifests",
        str(manifests),
        "--hostname-override",
        "bench-node",
        "--loop",
        "uvloop",
        "--log-level",
        "warning",
        "--healthz-bind-address=",
        "--min-sync-period",
        "0",
        # UDP with the defaults (no per-client rate limit).  The memory test is one client
        # holding 10 000 connections to one Service, which the default fair shares (50 %
        # per Service, 25 % per client IP) would cut to a quarter; HAProxy and nginx run
        # without such bounds here too.
        "--max-connections",
        str(nofile() // 2),
        "--service-connection-share",
        "100",
        "--client-connection-share",
        "100",
        *extra,
    ]


def start_userproxy(procs: Procs, tmp: Path) -> Peer:
    host = "127.0.90.1"
    mdir = tmp / "userproxy-manifests"
    mdir.mkdir(exist_ok=True)
    (mdir / "bench.json").write_text(json.dumps(userproxy_manifests(host)))
    argv = userproxy_argv(mdir, "--metrics-bind-address=")
    peer = Peer("userproxy", host, udp=True, proc=procs.start("userproxy", argv))
    _wait_peer(procs, peer)
    return peer


def start_haproxy(procs: Procs, tmp: Path) -> Peer:
    host = "127.0.90.2"
    conf = (
        f"global\n  nbthread 1\n  maxconn {max_proxied()}\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n"
        "  timeout server 1h\n"
    )
    for name, port in TCP_PORTS.items():
        conf += f"listen {name}\n  bind {host}:{port}\n  server s1 {BACKEND}:{port}\n"
    path = tmp / "haproxy.cfg"
    path.write_text(conf)
    proc = procs.start("haproxy", ["haproxy", "-db", "-f", str(path)])
    peer = Peer("haproxy", host, udp=False, proc=proc)
    _wait_peer(procs, peer)
    return peer


def start_nginx_stream(procs: Procs, tmp: Path) -> Peer:
    host = "127.0.90.3"
    servers = "".join(
        f"  server {{ listen {host}:{port}; proxy_pass {BACKEND}:{port}; }}\n"
        for port in TCP_PORTS.values()
    )
    servers += (
        f"  server {{ listen {host}:{SP_UDP} udp; proxy_pass {BACKEND}:{SP_UDP};"
        " proxy_timeout 10s; }\n"
    )
    conf = _nginx_head(tmp, "nginx-stream", 1) + "stream {\n" + servers + "}\n"
    argv = _nginx_argv(tmp, "nginx-stream", conf)
    proc = procs.start("nginx-stream", argv)
    peer = Peer("nginx", host, udp=True, proc=proc, worker=True, log="nginx-stream")
    _wait_peer(procs, peer)
    wait_until(lambda: peer.pid is not None, 10, "the nginx stream worker")
    return peer


RELAY = "127.0.90.4"


def start_relay(procs: Procs) -> Peer:
    """bench/relay.py on uvloop: every TCP port and the UDP port, no features."""
    argv = [python(), "-m", "bench.relay"]
    for port in TCP_PORTS.values():
        argv += ["--tcp", f"{RELAY}:{port}={BACKEND}:{port}"]
    argv += ["--udp", f"{RELAY}:{SP_UDP}={BACKEND}:{SP_UDP}"]
    peer = Peer("relay", RELAY, udp=True, proc=procs.start("relay", argv))
    _wait_peer(procs, peer)
    return peer


def direct() -> Peer:
    return Peer("direct", BACKEND, udp=True)


def _wait_peer(procs: Procs, peer: Peer) -> None:
    def up() -> bool:
        if peer.proc is not None and peer.proc.poll() is not None:
            raise RuntimeError(
                f"{peer.name} exited with {peer.proc.returncode}:\n"
                + procs.log_tail(peer.log or peer.name)
            )
        ok = all(can_connect((peer.host, p)) for p in TCP_PORTS.values())
        return ok and (not peer.udp or udp_bound((peer.host, SP_UDP)))

    wait_until(up, 20, f"{peer.name} listening on {peer.host}")


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, argv in {
        "haproxy": ["haproxy", "-v"],
        "nginx": ["nginx", "-v"],
        "iperf3": ["iperf3", "-v"],
        "sockperf": ["sockperf", "--version"],
        "wrk": ["wrk", "-v"],
    }.items():
        if shutil.which(argv[0]) is None:
            continue
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        text = (res.stdout + res.stderr).strip().splitlines()
        out[name] = text[0] if text else "?"
    return out
