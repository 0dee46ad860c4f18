"""``userproxy status`` (a child process) against a running proxy: every Service port with
its endpoint counts by state, its listeners and endpoints; a proxy that is not there is
exit 1 naming the URL; the default address comes from the config file.

Addresses: Services on 127.214.2.x, backends on 127.214.2.1x (no other test uses 127.214).
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.process.test_cli import run_cli
from tests.support.backends import Backend, echo
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import free_port, running_proxy
from userproxy.status_cli import default_server

pytestmark = pytest.mark.both_loops


def slice_of(name: str, port: int, entries: list[tuple[str, dict[str, bool]]]) -> dict[str, Any]:
    return endpoint_slice(f"{name}-1", name, {"http": port}, endpoints=[
        {"addresses": [ip], "nodeName": "test-node", "conditions": conditions}
        for ip, conditions in entries
    ])  # fmt: skip


async def status_of(server: str, *args: str) -> tuple[int, str, str]:
    """Run ``userproxy status`` as a child process (the loop goes on serving meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "userproxy", "status", "--server", server, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_status_prints_every_service_port_with_counts(tmp_path: Path) -> None:
    b1 = Backend("127.214.2.11", echo)
    b2 = Backend("127.214.2.12", echo, port=b1.port)
    write(
        tmp_path / "s.json",
        service("web", "127.214.2.1", {"http": 8080}),
        slice_of("web", b1.port, [
            ("127.214.2.11", {"ready": True}),
            ("127.214.2.12", {"ready": True}),
            ("127.214.2.13", {"ready": False, "serving": True, "terminating": True}),
        ]),
        service("api", "127.214.2.2", {"http": 8081}),
        slice_of("api", b1.port, [("127.214.2.14", {"ready": False, "serving": False})]),
    )  # fmt: skip
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    try:
        async with running_proxy(tmp_path, metrics_bind_address=f"127.0.0.1:{port}"):
            code, out, err = await status_of(server)
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].startswith("userproxy ")
            assert "on node test-node: 2 Services" in lines[0]
            web = next(line for line in lines if "default/web:http" in line)
            assert web.startswith("TCP ")
            assert "round-robin" in web
            assert "3 endpoints: 2 ready, 3 serving, 1 terminating, 1 not ready, 0 ejected" in web
            api = next(line for line in lines if "default/api:http" in line)
            assert "1 endpoints: 0 ready, 0 serving, 0 terminating, 1 not ready" in api
            assert any("listen 127.214.2.1:8080" in line and "open" in line for line in lines)
            assert any(
                "listen 127.214.2.2:8081" in line and "closed (no endpoints)" in line
                for line in lines
            )
            (b1_line,) = [line for line in lines if f"-> 127.214.2.11:{b1.port}" in line]
            assert "ready,serving,local" in b1_line
            assert "active 0 total 0 bytes 0/0 dial-fail 0 node test-node" in b1_line
            # The timeline's last events, after the Services.
            at = lines.index(next(line for line in lines if line.startswith("Last ")))
            assert lines[at:] == [
                "Last 2 of 2 events:",
                lines[at + 1],
                f"  {lines[at + 1][2:10]} endpoints default/web:http 0 -> 2 ready endpoints",
            ]
            assert re.fullmatch(r"  \d\d:\d\d:\d\d sync      sync 1: 2 Service .*", lines[at + 1])
            # Counts only, no events, and a search.
            code, out, _ = await status_of(server, "--no-endpoints", "--events", "0", "-q", "api")
            assert code == 0
            assert "default/api:http" in out
            assert "default/web" not in out
            assert "->" not in out
            assert "events" not in out
            code, _, err = await status_of(server, "--events", "-1")
            assert code == 2
            assert "--events must be 0 or more, not -1" in err
    finally:
        b1.stop()
        b2.stop()


def test_status_without_a_proxy_is_exit_1_naming_the_url() -> None:
    port = free_port()  # nothing listens there
    result = run_cli("status", "--server", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"cannot read http://127.0.0.1:{port}/status" in result.stderr


def test_default_server_from_the_config_file(tmp_path: Path) -> None:
    assert default_server(None) == "http://127.0.0.1:10249"
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "metricsBindAddress: 0.0.0.0:10999\n"
    )
    assert default_server(config) == "http://127.0.0.1:10999"
