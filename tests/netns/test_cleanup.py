"""Acceptance: ``userproxy cleanup`` removes what a crashed ``--manage-addresses`` run left.

Each test makes its own namespaces (``harness.network_namespaces``; not the module's lab,
whose proxy must keep running): a proxy serving two Service IPs is SIGKILLed inside the
node namespace, its device and addresses are seen to remain, and ``userproxy cleanup`` run
in that namespace removes them, and nothing else.

Addresses: ClusterIP 198.19.5.10 and externalIP 198.19.6.10 (no other netns test uses them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.harness import (
    DEVICE,
    REPO,
    LabError,
    ManifestFile,
    NoPrivilege,
    device_addresses,
    endpoint_slice,
    eventually,
    in_netns,
    ip,
    network_namespaces,
    service,
    userproxy,
)

CLUSTER_IP = "198.19.5.10"
EXTERNAL_IP = "198.19.6.10"


@pytest.fixture
def node_ns() -> Iterator[str]:
    """A fresh node namespace (with its client peer), deleted at the end."""
    try:
        with network_namespaces() as (_client, node):
            yield node
    except NoPrivilege as exc:
        pytest.skip(str(exc))


def cleanup(netns: str, *args: str, privileged: bool = True) -> subprocess.CompletedProcess[str]:
    """``userproxy cleanup ARGS`` in ``netns``; with ``privileged=False`` without
    CAP_NET_ADMIN (dropped from the bounding set, as a container without that capability
    runs: still root, so it can read the clone and its venv wherever they are, which a
    switch to another user could not when the checkout is private, e.g. under mktemp -d)."""
    command = [sys.executable, "-m", "userproxy", "cleanup", *args]
    if not privileged:
        command = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", *command]
    return subprocess.run(
        in_netns(netns, *command),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def link(netns: str) -> dict[str, object] | None:
    """``ip -j link show DEVICE`` in ``netns``, or None when there is no such device."""
    try:
        out = ip("-n", netns, "-j", "link", "show", "dev", DEVICE)
    except LabError as exc:
        if "does not exist" in str(exc):
            return None
        raise
    links: list[dict[str, object]] = json.loads(out)
    return links[0]


def crash_a_proxy(netns: str, tmp_path: Path) -> None:
    """Run ``userproxy run --manage-addresses`` in ``netns`` until its two Service IPs are
    on the device, then SIGKILL it (no cleanup of its own)."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    ManifestFile(manifests / "web.json").write(
        service("web", CLUSTER_IP, external_ips=[EXTERNAL_IP]),
        endpoint_slice("web", ["local-1"]),
    )
    with (
        (tmp_path / "userproxy.log").open("wb") as log,
        userproxy(netns, manifests, log, flags=("--metrics-bind-address=",)) as proc,
    ):
        eventually(
            lambda: device_addresses(netns),
            lambda held: {CLUSTER_IP, EXTERNAL_IP} <= held,
            within=15,
            what="the proxy to add its Service IPs",
        )
        proc.kill()  # as a crash or the OOM killer would: no cleanup
        proc.wait(timeout=10)


def test_cleanup_removes_the_addresses_and_device_a_killed_proxy_left(
    node_ns: str, tmp_path: Path
) -> None:
    ip("-n", node_ns, "addr", "add", "198.18.7.1/32", "dev", "lo")  # not userproxy's
    crash_a_proxy(node_ns, tmp_path)
    left = link(node_ns)
    assert left is not None, "the killed proxy's device is still there"
    assert left.get("ifalias") == "userproxy: created by --manage-addresses"
    assert {CLUSTER_IP, EXTERNAL_IP} <= device_addresses(node_ns)

    done = cleanup(node_ns)
    assert done.returncode == 0, done.stderr
    assert "removed 2 addresses from userproxy0" in done.stdout, done.stdout
    assert "deleted device userproxy0" in done.stdout, done.stdout
    assert link(node_ns) is None
    assert "198.18.7.1" in ip("-n", node_ns, "addr", "show", "dev", "lo"), "others' stay"

    again = cleanup(node_ns)
    assert again.returncode == 0, again.stderr
    assert "nothing to clean up: no device userproxy0" in again.stdout


def test_cleanup_keeps_a_device_made_by_hand_and_its_own_addresses(node_ns: str) -> None:
    """Only what carries userproxy's marks goes: here one address with proto 0x75 on a
    device the operator made (no alias), next to an address the operator added."""
    ip("-n", node_ns, "link", "add", "upxhand", "type", "bridge")
    ip("-n", node_ns, "link", "set", "upxhand", "up")
    # iproute2 6.1 cannot set an address's proto: pyroute2 can, in the namespace.
    add_marked = (
        "from pyroute2 import IPRoute\n"
        "with IPRoute() as ipr:\n"
        "    index = ipr.link_lookup(ifname='upxhand')[0]\n"
        "    ipr.addr('add', index=index, address='198.19.5.20', prefixlen=32, proto=0x75)\n"
    )
    subprocess.run(
        in_netns(node_ns, sys.executable, "-c", add_marked), timeout=30, check=True, cwd=REPO
    )
    ip("-n", node_ns, "addr", "add", "198.19.5.21/32", "dev", "upxhand")

    done = cleanup(node_ns, "--address-device", "upxhand")
    assert done.returncode == 0, done.stderr
    assert "removed 1 addresses from upxhand (198.19.5.20)" in done.stdout, done.stdout
    assert "kept device upxhand: not created by userproxy" in done.stdout, done.stdout
    kept = {a for a in device_addresses(node_ns, "upxhand") if not a.startswith("fe80:")}
    assert kept == {"198.19.5.21"}


def test_cleanup_without_privilege_exits_2_naming_the_capability(
    node_ns: str, tmp_path: Path
) -> None:
    crash_a_proxy(node_ns, tmp_path)
    refused = cleanup(node_ns, privileged=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "CAP_NET_ADMIN" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert {CLUSTER_IP, EXTERNAL_IP} <= device_addresses(node_ns), "nothing half-removed"
    assert cleanup(node_ns).returncode == 0
    assert link(node_ns) is None
