"""A broken edit of the manifests is logged and ignored: the proxy keeps the last good state.

In-process, on both loops: the Proxy runs on the test's loop, peers are blocking sockets
in threads.

Addresses: Services on 127.0.90.N, backends on 127.0.91.N, N fresh per test.  A range of
its own rather than ``fresh_net()``, whose numbering restarts in every pytest process and
so collides with a suite run concurrently by someone else on the same machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.backends import Backend, ask, name_server
from tests.support.manifest_cases import documents, service_yaml, slice_yaml
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import eventually, running_proxy, wait_for_sync

pytestmark = pytest.mark.both_loops

SERVICE_PORT = 8080
_hosts = itertools.count(1)


class Scene:
    """A Service at a fresh 127.0.90.N with backends b1 and b2 at 127.0.91.N."""

    def __init__(self, tmp_path: Path) -> None:
        host = next(_hosts)
        self.cluster_ip = f"127.0.90.{host}"
        self.address = (self.cluster_ip, SERVICE_PORT)
        self.manifest = tmp_path / "manifests" / "web.yaml"
        self.manifest.parent.mkdir()
        self.backends = [Backend(f"127.0.91.{host}", name_server(f"b{i + 1}")) for i in range(2)]

    def publish(self, backend: int) -> None:
        """A valid Service and slice, the slice listing only ``backends[backend]``."""
        chosen = self.backends[backend]
        write(
            self.manifest,
            service("web", self.cluster_ip, SERVICE_PORT),
            endpoint_slice("web-a", "web", chosen.port, [chosen.ip]),
        )

    def publish_text(self, text: str) -> None:
        tmp = self.manifest.with_name("web.yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.manifest)

    def close(self) -> None:
        for backend in self.backends:
            backend.stop()


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    with contextlib.closing(Scene(tmp_path)) as s:
        yield s


def broken_yaml(scene: Scene) -> str:
    return f"""\
apiVersion: v1
kind: Service
metadata:
  name: web: oops
spec:
  clusterIP: {scene.cluster_ip}
"""


def _service(scene: Scene, port: str) -> str:
    """The Service ``web`` (in the default namespace) with one port, written out."""
    return service_yaml("web", scene.cluster_ip, port, namespace=None)


def missing_name(scene: Scene) -> str:
    port = f"{{name: tcp, protocol: TCP, port: {SERVICE_PORT}}}"
    return service_yaml(None, scene.cluster_ip, port, namespace="default")


def port_out_of_range(scene: Scene) -> str:
    return _service(scene, "{name: tcp, protocol: TCP, port: 70000}")


def unknown_protocol(scene: Scene) -> str:
    return _service(scene, f"{{name: tcp, protocol: HTTP, port: {SERVICE_PORT}}}")


def slice_without_label(scene: Scene) -> str:
    backend = scene.backends[1]
    return documents(
        _service(scene, f"{{name: tcp, protocol: TCP, port: {SERVICE_PORT}, targetPort: tcp}}"),
        slice_yaml(
            "web-a",
            None,
            port_name="tcp",
            port=backend.port,
            endpoints=f"{{addresses: [{backend.ip}], conditions: {{ready: true}}}}",
            namespace=None,
        ),
    )


#: id -> (the broken file, what the logged message must contain)
VARIANTS = {
    "bad-yaml": (broken_yaml, ["line 4", "YAML syntax error"]),
    "missing-name": (missing_name, ["document 1", "metadata.name", "required"]),
    "port-out-of-range": (port_out_of_range, ["document 1", "spec.ports[0].port", "70000"]),
    "unknown-protocol": (unknown_protocol, ["document 1", "spec.ports[0].protocol", "HTTP"]),
    "slice-without-service-label": (
        slice_without_label,
        ["document 2", "EndpointSlice default/web-a", "kubernetes.io/service-name"],
    ),
}


async def wait_for_error(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    """The first ERROR record (waits up to 5 s for it)."""
    async with asyncio.timeout(5):
        while True:
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            if errors:
                return errors[0]
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_broken_edit_keeps_the_last_good_state_until_fixed(
    scene: Scene, caplog: pytest.LogCaptureFixture, variant: str
) -> None:
    caplog.set_level(logging.INFO)
    make, expected = VARIANTS[variant]
    scene.publish(backend=0)
    async with running_proxy(scene.manifest) as proxy:
        assert await asyncio.to_thread(ask, scene.address) == "b1"
        caplog.clear()
        syncs = proxy.proxier.status.syncs

        scene.publish_text(make(scene))
        record = await wait_for_error(caplog)
        message = record.getMessage()
        assert record.name == "userproxy.sources.manifests"
        assert str(scene.manifest) in message, message
        for part in expected:
            assert part in message, (part, message)
        # Still serving the last good state, after several more polls of the broken file.
        source = proxy.manifests
        assert source is not None
        polls = source.polls + 3
        await eventually(lambda: source.polls >= polls, what="3 more polls")
        assert await asyncio.to_thread(ask, scene.address) == "b1"
        assert proxy.proxier.status.syncs == syncs
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # logged once, not per poll

        # The fix applies: now the slice lists b2.
        scene.publish(backend=1)
        await wait_for_sync(proxy, syncs)
        assert await asyncio.to_thread(ask, scene.address) == "b2"
        assert any("valid again" in r.getMessage() for r in caplog.records)


async def test_one_broken_edit_after_another_logs_each_and_serves_on(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    scene.publish(backend=0)
    async with running_proxy(scene.manifest) as proxy:
        syncs = proxy.proxier.status.syncs
        for variant, (make, expected) in VARIANTS.items():
            caplog.clear()
            scene.publish_text(make(scene))
            message = (await wait_for_error(caplog)).getMessage()
            for part in expected:
                assert part in message, (variant, part, message)
            assert await asyncio.to_thread(ask, scene.address) == "b1", variant
        assert proxy.proxier.status.syncs == syncs
        scene.publish(backend=1)
        await wait_for_sync(proxy, syncs)
        assert await asyncio.to_thread(ask, scene.address) == "b2"
