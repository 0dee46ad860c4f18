"""How long a Node update holds the event loop with many Services loaded.

``python -m bench.node_update [--services 10000] [--loop uvloop|asyncio] [--json]``

One proxy runs in this process on manifests with ``--services`` ClusterIP Services (one
endpoint each) and its own Node.  A task wakes every millisecond and records how late it
woke: the loop's longest stall.  Then the Node manifest is rewritten three ways and, for
each, the script prints the longest stall from the rewrite until 300 ms after the sync that
applied it, the sync's duration and how many Services it planned again:

* a label and taint change outside the zone: nothing to re-plan (upstream's
  NodeTopologyConfig rule);
* a zone change: every Service is planned again, in slices of a few milliseconds;
* a node address added, then removed (as root only: the proxy then runs in a network
  namespace the script creates, ``upx-nodeupd-<random>``, and always deletes; the address
  goes on a dummy device there): the netlink watch reads the host's addresses again and
  the sync re-plans what the NodePort addresses touch;
* for comparison, every Service planned in one go, unsliced: what any Node update cost
  before both changes (about 1.4 s was measured with 10 000).

``--json`` prints one JSON object instead (``bench/controlplane.py`` reads it):
``node_label_stall_ms``, ``node_zone_stall_ms``, ``node_address_stall_ms`` (the longer of
the add and the remove) and ``node_unsliced_stall_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from bench.controlplane import write_manifests
from userproxy.config import Settings
from userproxy.proxy import Proxy

NODE = "bench-node"


def write_node(mdir: Path, zone: str, labels: dict[str, str], taint: bool = False) -> None:
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone, **labels}},
        "spec": {},
    }
    if taint:
        node["spec"]["taints"] = [
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}
        ]
    tmp = mdir / "node.json.tmp"
    tmp.write_text(json.dumps(node))
    tmp.replace(mdir / "node.json")


class StallMeter:
    """Wakes every millisecond; ``worst`` is the longest lateness since ``reset()``."""

    def __init__(self) -> None:
        self.worst = 0.0

    def reset(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - before - 0.001)


async def measure(
    proxy: Proxy, meter: StallMeter, change: Callable[[], None]
) -> tuple[float, float, int]:
    """(longest stall, sync duration, Services planned) around one change."""
    status = proxy.proxier.status
    after = status.syncs
    meter.reset()
    change()
    async with asyncio.timeout(120):
        await proxy.wait_sync(after)
    await asyncio.sleep(0.3)
    return meter.worst, status.last_duration, status.services_planned


async def main(services: int, *, addresses: bool = False, as_json: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="userproxy-node-update-") as tmp:
        mdir = Path(tmp)
        write_manifests(mdir, services, 1)
        write_node(mdir, "zone-a", {"team": "one"})
        settings = Settings(
            hostname=NODE,
            manifests=(mdir,),
            min_sync_period=0.0,
            manifest_poll_interval=0.05,
            healthz_bind_address="",
            metrics_bind_address="",
        )
        proxy = Proxy(settings)
        task = asyncio.create_task(proxy.run())
        meter = StallMeter()
        ticker = asyncio.create_task(meter.run())
        try:
            async with asyncio.timeout(300):
                while len(proxy.proxier.plans) < services:  # every Service planned
                    await proxy.wait_sync(proxy.proxier.status.syncs)
            await asyncio.sleep(1.0)
            rows = [
                (
                    "label + taint, same zone",
                    await measure(
                        proxy,
                        meter,
                        lambda: write_node(mdir, "zone-a", {"team": "two"}, taint=True),
                    ),
                ),
                (
                    "zone change (sliced)",
                    await measure(proxy, meter, lambda: write_node(mdir, "zone-b", {})),
                ),
            ]
            if addresses:
                for verb in ("add", "del"):
                    rows.append((f"node address {verb}", await _address(proxy, meter, verb)))
            # The same full re-plan, unsliced: what a Node update cost before.
            rows.append(("every Service, unsliced", await _unsliced(proxy, meter)))
        finally:
            ticker.cancel()
            proxy.stop()
            await task
    if as_json:
        stall = {name: row[0] * 1000 for name, row in rows}
        out = {
            "node_label_stall_ms": stall["label + taint, same zone"],
            "node_zone_stall_ms": stall["zone change (sliced)"],
            "node_unsliced_stall_ms": stall["every Service, unsliced"],
        }
        if addresses:
            out["node_address_stall_ms"] = max(stall["node address add"], stall["node address del"])
        print(json.dumps(out))
        return
    print(f"{services} Services, loop {type(asyncio.get_running_loop()).__module__}")
    print(f"{'Node update':28} {'longest stall':>14} {'sync':>10} {'planned':>8}")
    for name, (stall_s, duration, planned) in rows:
        print(f"{name:28} {stall_s * 1000:11.1f} ms {duration * 1000:7.1f} ms {planned:8d}")


ADDRESS = "10.255.77.1/32"


async def _address(proxy: Proxy, meter: StallMeter, verb: str) -> tuple[float, float, int]:
    """Add (or delete) ADDRESS on the dummy device; the longest stall until the sync the
    watcher asks for has run (or 2 s) and 300 ms more."""
    status = proxy.proxier.status
    after = status.syncs
    meter.reset()
    await asyncio.to_thread(
        subprocess.run, ["ip", "addr", verb, ADDRESS, "dev", "upxnode"], check=True
    )
    try:
        async with asyncio.timeout(2.0):
            await proxy.wait_sync(after)
    except TimeoutError:
        pass  # the NodePort addresses did not change: no sync, the read is what ran
    await asyncio.sleep(0.3)
    return meter.worst, status.last_duration, status.services_planned


async def _unsliced(proxy: Proxy, meter: StallMeter) -> tuple[float, float, int]:
    """Plan every Service in one go, as the sync did for any Node update before."""
    proxier = proxy.proxier
    keys = list(proxier.state.services)
    await asyncio.sleep(0.01)
    meter.reset()
    started = time.perf_counter()
    for key in keys:
        proxier.plan(key)
    duration = time.perf_counter() - started
    await asyncio.sleep(0.05)
    return meter.worst, duration, len(keys)


def _in_namespace(argv: list[str]) -> int:
    """Run this script again inside a network namespace of its own (deleted at the end),
    with a dummy device for the address changes; none of the host's addresses change."""
    netns = f"upx-nodeupd-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    try:

        def ip(*command: str) -> None:
            subprocess.run(["ip", "-n", netns, *command], check=True, capture_output=True)

        ip("link", "set", "lo", "up")
        try:
            ip("link", "add", "upxnode", "type", "dummy")
        except subprocess.CalledProcessError:  # no dummy driver: an empty bridge will do
            ip("link", "add", "upxnode", "type", "bridge")
        ip("link", "set", "upxnode", "up")
        inner = ["ip", "netns", "exec", netns, sys.executable, "-m", "bench.node_update"]
        return subprocess.run([*inner, *argv, "--inside"], check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside and os.geteuid() == 0:
        sys.exit(_in_namespace(sys.argv[1:]))
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args.services, addresses=args.inside, as_json=args.json))
