"""The access log's cost: proxy CPU per connection with ``--access-log`` off, and on to a
file in each format (issue 13: off unchanged, on within 15 %).

    python -m bench.access_log [--connections 4000] [--rounds 3] [--loop uvloop]

Runs ``userproxy run`` in a subprocess per setting in turn (off, text, json; ``rounds``
times, interleaved so machine noise spreads over all of them), against a backend in its
own subprocess that answers one byte and closes; this process's client threads open
short connections (connect, send a byte, read the answer, close), and the proxy's CPU
(utime + stime from /proc) over the run is divided by the number of connections.
Prints one line per setting: median microseconds of proxy CPU per connection and the
ratio to "off".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.procs import can_connect, cpu_seconds, python, wait_until

SERVICE_IP = "127.173.250.1"
BACKEND_IP = "127.173.251.1"
PORT = 8080
BACKEND_PORT = 18080

_BACKEND = f"""
import asyncio
class One(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.t.write(b"!"); self.t.close()
async def main():
    s = await asyncio.get_running_loop().create_server(One, "{BACKEND_IP}", {BACKEND_PORT},
                                                       backlog=4096)
    await s.serve_forever()
asyncio.run(main())
"""


def _manifests(directory: Path) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {"clusterIP": SERVICE_IP, "ports": [{"name": "p", "port": PORT}]},
    }
    endpoints = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "bench-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "bench"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": BACKEND_PORT}],
        "endpoints": [{"addresses": [BACKEND_IP], "conditions": {"ready": True}}],
    }
    (directory / "m.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "List", "items": [service, endpoints]})
    )


def _clients(count: int, threads: int) -> None:
    def work(n: int) -> None:
        for _ in range(n):
            with socket.create_connection((SERVICE_IP, PORT), 10) as sock:
                sock.sendall(b"?")
                assert sock.recv(1) == b"!"

    pool = [threading.Thread(target=work, args=(count // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _one_run(
    directory: Path, setting: str, count: int, loop: str, base: str | None = None
) -> float:
    """Proxy CPU microseconds per connection with ``setting`` (base, off, text or json);
    "base" is "off" run from the source tree ``base`` (the code before the access log)."""
    argv = [python(), "-m", "userproxy", "run", "--manifests", str(directory / "m.json"),
            "--hostname-override", "bench", "--metrics-bind-address", "",
            "--healthz-bind-address", "", "--log-level", "warning", "--loop", loop,
            "--min-sync-period", "0", "--max-connections", "4000",
            "--client-connection-share", "100", "--service-connection-share", "100"]  # fmt: skip
    log = directory / f"access-{setting}.log"
    log.unlink(missing_ok=True)
    env = dict(os.environ)
    if setting == "base":
        assert base is not None
        env["PYTHONPATH"] = base
    elif setting != "off":
        argv += ["--access-log", str(log), "--access-log-format", setting]
    proxy = subprocess.Popen(argv, env=env)
    try:
        wait_until(lambda: can_connect((SERVICE_IP, PORT)), 20, "the proxy")
        _clients(200, 4)  # warm up
        before = cpu_seconds(proxy.pid)
        _clients(count, 8)
        used = cpu_seconds(proxy.pid) - before
    finally:
        proxy.terminate()
        proxy.wait(20)
    if setting in ("text", "json"):
        lines = len(log.read_text().splitlines())
        assert lines >= count + 200, f"{setting}: {lines} lines for {count + 200} connections"
    return used / count * 1e6


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.access_log")
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument(
        "--base",
        metavar="DIR",
        help="also run the proxy from this source tree (e.g. a checkout of main before the "
        "access log), as 'base', to compare the cost with the log off",
    )
    parser.add_argument(
        "--settings", default="off,text,json", help="which to run, of base, off, text, json"
    )
    args = parser.parse_args(argv)
    backend = subprocess.Popen([python(), "-c", _BACKEND])
    wanted = args.settings.split(",")
    if args.base and "base" not in wanted:
        wanted.insert(0, "base")
    results: dict[str, list[float]] = {name: [] for name in wanted}
    try:
        wait_until(lambda: can_connect((BACKEND_IP, BACKEND_PORT)), 10, "the backend")
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            _manifests(directory)
            for _ in range(args.rounds):
                for setting, samples in results.items():
                    samples.append(
                        _one_run(directory, setting, args.connections, args.loop, args.base)
                    )
    finally:
        backend.terminate()
        backend.wait(10)
    off = statistics.median(results.get("off") or next(iter(results.values())))
    print(f"loop={args.loop} connections={args.connections} rounds={args.rounds}")
    for setting, samples in results.items():
        median = statistics.median(samples)
        runs = " ".join(f"{s:.0f}" for s in samples)
        print(f"access log {setting:>4}: {median:7.1f} us proxy CPU/connection "
              f"({median / off:.2f}x off; runs: {runs})")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
