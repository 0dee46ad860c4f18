"""Acceptance: a handoff between two ``--manage-addresses`` processes leaves every
service IP on the device the whole time.

In its own pair of namespaces (see ``harness.py``): the old proxy puts the ClusterIP and
externalIP of a Service on its device; a new proxy takes the listening sockets over and
adopts the addresses; the device is sampled every 10 ms from before the new process
starts until the old one has exited, and every sample must hold both addresses.  A client
in the other namespace reaches the Service throughout, and after the old process exits.
At the end the last process removes the addresses, as any shutdown does.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.netns.harness import (
    NODE_NAME,
    REFUSED,
    REPO,
    Agent,
    LabError,
    ManifestFile,
    NoPrivilege,
    backends,
    device_addresses,
    endpoint_slice,
    eventually,
    in_netns,
    network_namespaces,
    service,
    userproxy,
)
from tests.support.proxyrun import stop_process

DEVICE = "upxh0"
CLUSTER_IP, EXTERNAL_IP = "198.19.0.90", "198.19.1.90"


class Sampler:
    """The device's addresses, read every 10 ms in a thread."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.samples: list[set[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(LabError):
                self.samples.append(device_addresses(self.netns, DEVICE))


def test_a_handoff_keeps_every_service_ip_on_the_device(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sock = run / "handoff.sock"
    file = ManifestFile(manifests / "svc.json")
    file.write(
        service("web", CLUSTER_IP, 80, external_ips=[EXTERNAL_IP]),
        endpoint_slice("web", ["local-1"]),
    )
    flags = [
        "--address-device",
        DEVICE,
        "--handoff-socket",
        str(sock),
        "--shutdown-grace",
        "2s",
        "--metrics-bind-address=",
    ]
    wanted = {CLUSTER_IP, EXTERNAL_IP}
    with contextlib.ExitStack() as stack:
        try:
            client_ns, node_ns = stack.enter_context(network_namespaces())
        except NoPrivilege as exc:
            pytest.skip(str(exc))  # as the lab: only without the privilege; CI is root
        log = stack.enter_context((tmp_path / "helpers.log").open("ab"))
        old_log = stack.enter_context((tmp_path / "old.log").open("ab"))
        new_log = stack.enter_context((tmp_path / "new.log").open("ab"))
        stack.enter_context(backends(node_ns, log))
        old = stack.enter_context(userproxy(node_ns, manifests, old_log, flags))
        client = Agent(client_ns, log)
        stack.callback(client.close)
        eventually(
            lambda: device_addresses(node_ns, DEVICE), lambda held: wanted <= held, within=15,
            what="the old process's addresses",
        )  # fmt: skip
        eventually(
            (tmp_path / "old.log").read_text,
            lambda text: "handoff: listening on" in text,
            what="the old process to listen for a successor",
        )
        assert client.connect(CLUSTER_IP, 80, timeout=2.0) == "local-1"
        with Sampler(node_ns) as sampler:
            time.sleep(0.1)
            new = stack.enter_context(userproxy(node_ns, manifests, new_log, flags))
            eventually(
                (tmp_path / "new.log").read_text,
                lambda text: "handoff: took over" in text,
                within=15,
                what="the takeover",
            )
            for host in (CLUSTER_IP, EXTERNAL_IP):
                assert client.connect(host, 80, timeout=2.0) == "local-1"
            assert old.wait(15) == 0
            time.sleep(0.2)
        for host in (CLUSTER_IP, EXTERNAL_IP):
            assert client.connect(host, 80, timeout=2.0) == "local-1"
        assert len(sampler.samples) > 20, sampler.samples
        missing = [sorted(wanted - held) for held in sampler.samples if not wanted <= held]
        assert missing == [], (len(missing), len(sampler.samples), missing[:3])
        new_text = (tmp_path / "new.log").read_text()
        assert f"adopting {CLUSTER_IP}" in new_text
        assert f"manage-addresses: removed {CLUSTER_IP}" not in (tmp_path / "old.log").read_text()
        assert stop_process(new, grace=15) == 0
        assert device_addresses(node_ns, DEVICE) & wanted == set()
        assert client.connect(CLUSTER_IP, 80, timeout=2.0) in {REFUSED, "TIMEOUT", "UNREACHABLE"}


def test_an_old_process_stopped_during_a_takeover_leaves_the_addresses(tmp_path: Path) -> None:
    """The new process holds the sockets but has not served yet (its API server never
    answers) when the old one is stopped: the old one must not remove the addresses the
    new one is adopting.  (When the new one is then stopped too, before ever serving, it
    leaves them as well, marked for ``userproxy cleanup`` or the next start to adopt.)"""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sock = run / "handoff.sock"
    ManifestFile(manifests / "svc.json").write(
        service("web", CLUSTER_IP, 80, external_ips=[EXTERNAL_IP]),
        endpoint_slice("web", ["local-1"]),
    )
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n"
    )
    flags = ["--address-device", DEVICE, "--handoff-socket", str(sock), "--metrics-bind-address="]
    wanted = {CLUSTER_IP, EXTERNAL_IP}
    with contextlib.ExitStack() as stack:
        try:
            _client_ns, node_ns = stack.enter_context(network_namespaces())
        except NoPrivilege as exc:
            pytest.skip(str(exc))  # as the lab: only without the privilege; CI is root
        old_log = stack.enter_context((tmp_path / "old.log").open("ab"))
        new_log = stack.enter_context((tmp_path / "new.log").open("ab"))
        old = stack.enter_context(userproxy(node_ns, manifests, old_log, flags))
        eventually(
            (tmp_path / "old.log").read_text,
            lambda text: "handoff: listening on" in text,
            within=15,
            what="the old process to listen for a successor",
        )
        assert wanted <= device_addresses(node_ns, DEVICE)
        # Not harness.userproxy (it serves manifests, which sync at once): the API.
        argv = [sys.executable, "-m", "userproxy", "run", "--kubeconfig", str(kubeconfig)]
        argv += ["--hostname-override", NODE_NAME, "--manage-addresses"]
        argv += ["--healthz-bind-address=", *flags]
        new = subprocess.Popen(
            in_netns(node_ns, *argv), cwd=REPO, stdin=subprocess.DEVNULL, stdout=new_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        stack.callback(stop_process, new, 15)
        eventually(
            (tmp_path / "new.log").read_text,
            lambda text: "handoff: received" in text,
            within=15,
            what="the new process to receive the sockets",
        )
        assert stop_process(old, grace=15) == 0
        assert wanted <= device_addresses(node_ns, DEVICE)
        assert "manage-addresses: removed" not in (tmp_path / "old.log").read_text()
        stop_process(new, grace=15)
        assert wanted <= device_addresses(node_ns, DEVICE)
