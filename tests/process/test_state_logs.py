"""What an operator reads in the log of a running proxy: the version and loop at start, the
listeners opening and closing with the reason, the endpoint counts of a Service port when
they change, and the watch resuming after an API outage.

The first test runs ``python -m userproxy run`` as a child on each loop (``--loop``), reads
its log and scrapes its /metrics (``userproxy_build_info`` names the same loop); the
second runs a proxy in-process (both loops) fed by the fake API server, which goes away
for a second.  Peers are blocking sockets in threads.

Addresses: Services on 127.224.20N.1, backends on 127.225.20N.x (N fresh per test; the
nets 200 and up of these two /8 ranges are this module's, tests/admin/test_state_metrics.py
uses the ones below).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import platform
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backends import Backend, ask, name_server
from tests.support.fake_apiserver import FakeApiServer
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import (
    assert_clean_log,
    eventually,
    free_port,
    proxy_process,
    running_proxy,
    wait_listening,
    wait_logged,
)
from userproxy import __version__
from userproxy.dataplane import fast_relay

PORT = 8080
_nets = itertools.count(200)
START_LINE = re.compile(
    rf"userproxy {re.escape(__version__)} on (uvloop \d+\.\d+\.\d+|asyncio), "
    rf"Python {re.escape(platform.python_version())}$"
)


def build_info(port: int) -> dict[str, str]:
    """The labels of the one ``userproxy_build_info`` sample (value 1) of a /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        if family.name == "userproxy_build_info"
        for sample in family.samples
    ]
    assert len(samples) == 1, samples
    assert samples[0].value == 1.0
    return dict(samples[0].labels)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_log_of_a_running_proxy_tells_its_state(tmp_path: Path, loop: str) -> None:
    net = next(_nets)
    cluster_ip = f"127.224.{net}.1"
    b1 = Backend(f"127.225.{net}.1", name_server("b1"))
    b2 = Backend(f"127.225.{net}.2", name_server("b2"), port=b1.port)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    manifest = manifests / "web.json"

    def apply(*ips: str, ready: tuple[bool, ...] | None = None) -> None:
        objects: list[dict[str, Any]] = [service("web", cluster_ip, PORT, port_name="http")]
        if ips:
            objects.append(
                endpoint_slice("web-1", "web", b1.port, ips, port_name="http", ready=ready)
            )
        write(manifest, *objects)

    apply(b1.ip, b2.ip)
    metrics = free_port()
    log = tmp_path / "proxy.log"
    where = f"{cluster_ip}:{PORT}"
    try:
        args = [
            "run",
            "--manifests",
            str(manifests),
            "--loop",
            loop,
            f"--metrics-bind-address=127.0.0.1:{metrics}",
            "--min-sync-period=0s",
        ]
        with proxy_process(args, log=log):
            wait_listening((cluster_ip, PORT))
            assert ask((cluster_ip, PORT)) in {"b1", "b2"}
            output = wait_logged(log, "metrics server listening")
            start = [m for line in output.splitlines() if (m := START_LINE.search(line))]
            assert len(start) == 1, output
            loop_named = start[0].group(1)
            assert loop_named.split()[0] == loop
            # /metrics says the same.
            labels = build_info(metrics)
            assert labels == {
                "version": __version__,
                "python": platform.python_version(),
                "loop": loop_named,
                # The child picks as fast_relay does: compiled when built, unless told not to.
                "relay": "compiled"
                if fast_relay.AVAILABLE and not os.environ.get(fast_relay.ENV)
                else "python",
            }
            assert "default/web:http/TCP: 0 -> 2 ready endpoints" in output, output
            assert f"default/web:http/TCP: listening on {where} (ClusterIP, 2 endpoints)" in output

            apply(b1.ip, b2.ip, ready=(True, False))
            wait_logged(log, "default/web:http/TCP: 2 -> 1 ready endpoints (1 not ready)")
            assert ask((cluster_ip, PORT)) == "b1"
            apply()
            wait_logged(log, f"stopped listening on {where}: no endpoints")
            apply(b2.ip)
            wait_logged(log, f"listening on {where} again: endpoints are back")
            assert ask((cluster_ip, PORT)) == "b2"
            write(manifest)
            wait_logged(log, f"stopped listening on {where}: Service port removed")
    finally:
        b1.stop()
        b2.stop()
    output = log.read_text()
    assert_clean_log(log)
    # Each change once, in the order it happened.
    expected = [
        "default/web:http/TCP: 0 -> 2 ready endpoints",
        f"default/web:http/TCP: listening on {where} (ClusterIP, 2 endpoints)",
        "default/web:http/TCP: 2 -> 1 ready endpoints (1 not ready)",
        "default/web:http/TCP: 1 -> 0 ready endpoints",
        f"default/web:http/TCP: stopped listening on {where}: no endpoints (the kernel "
        "refuses new clients, as kube-proxy's REJECT)",
        "default/web:http/TCP: 0 -> 1 ready endpoints",
        f"default/web:http/TCP: listening on {where} again: endpoints are back",
        "default/web:http/TCP: 1 -> 0 ready endpoints (port removed)",
        f"default/web:http/TCP: stopped listening on {where}: Service port removed",
    ]
    # "2026-12-02 11:16:33,936 INFO    userproxy.control.endpoint_counts: MESSAGE"
    messages = [re.sub(r"^\S+ \S+ INFO +[\w.]+: ", "", line) for line in output.splitlines()]
    found = []
    for text in expected:
        assert messages.count(text) == 1, f"{text!r}:\n{output}"
        found.append(messages.index(text))
    assert found == sorted(found), output
    # Shutdown closes every listener in one line, not one per listener.
    assert "shutting down: no longer accepting connections" in output


@pytest.mark.both_loops
async def test_the_watch_resuming_after_an_outage_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="userproxy.sources.reflector")
    net = next(_nets)
    cluster_ip = f"127.224.{net}.1"
    backend = Backend(f"127.225.{net}.1", name_server("b1"))
    try:
        async with FakeApiServer() as api:
            api.create("services", service("web", cluster_ip, PORT))
            api.create("endpointslices", endpoint_slice("web-1", "web", backend.port, [backend.ip]))
            async with running_proxy(kubeconfig=api.kubeconfig(tmp_path / "kubeconfig")):
                await api.wait_watching()
                assert await asyncio.to_thread(ask, (cluster_ip, PORT)) == "b1"
                await api.stop()
                await asyncio.sleep(1.0)
                await api.start()
                # The line comes with the first thing a resumed watch delivers: a bookmark.
                await api.wait_watching()
                api.bookmark()

                def resumed() -> list[str]:
                    return [
                        r.getMessage()
                        for r in caplog.records
                        if "watch resumed after an outage" in r.getMessage()
                    ]

                await eventually(lambda: len(resumed()) >= 3, 20, "every watch to resume")
                for resource in ("services", "endpointslices", "nodes"):
                    lines = [m for m in resumed() if m.startswith(f"{resource}: ")]
                    assert len(lines) == 1, resumed()
                    outage = re.fullmatch(
                        rf"{resource}: watch resumed after an outage of (\d+\.\d) s "
                        r"\((\d+) failed attempts\)",
                        lines[0],
                    )
                    assert outage is not None, lines[0]
                    assert float(outage.group(1)) >= 0.5  # the server was away for 1 s
                    assert int(outage.group(2)) >= 1
                assert await asyncio.to_thread(ask, (cluster_ip, PORT)) == "b1"
    finally:
        backend.stop()
