"""Proxy memory with many idle proxied connections open."""

from __future__ import annotations

import select
import subprocess
import time

from bench.measure import Sample
from bench.peers import HOLD, Peer
from bench.procs import Procs, python, rss_bytes


def idle_connections(procs: Procs, peer: Peer, count: int, timeout: float = 60.0) -> Sample:
    """RSS of the proxying process before and with ``count`` idle connections open through
    it (each answered once by the backend, so the proxy has dialled upstream)."""
    pid = peer.pid
    assert pid is not None
    idle = rss_bytes(pid)
    client = procs.start(
        f"clients-{peer.name}",
        [python(), "-m", "bench.servers", "clients", peer.host, str(HOLD), str(count)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        assert client.stdin is not None
        ready, _, _ = select.select([client.stdout], [], [], timeout)
        line = client.stdout.readline().decode().strip() if ready else "timeout"
        if not line.startswith("ready"):
            raise RuntimeError(f"{count} idle connections through {peer.name}: {line}")
        time.sleep(1.0)
        loaded = rss_bytes(pid)
        client.stdin.close()
        client.wait(30)
    finally:
        procs.stop(client)
    time.sleep(1.0)  # let the proxy close its side before the next peer
    return {
        "mem_idle_mib": idle / 2**20,
        "mem_loaded_mib": loaded / 2**20,
        "mem_per_conn_kib": (loaded - idle) / count / 1024,
    }
