"""End to end: a Proxy fed by the Kubernetes API source (a fake API server) carries traffic.

The proxy runs on the test's loop (both loops); backends and clients are blocking sockets in
threads.  Besides following creates, updates and deletes, an OPEN connection through the
proxy must keep working through a dropped watch, a 410 re-list, a 10 s API outage and a
malformed object, and the final state must be right.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sources.test_kubernetes import endpoint_slice, service, wait_until
from tests.support.backends import Backend, ask, name_server
from tests.support.fake_apiserver import FakeApiServer
from tests.support.manifests import fresh_net
from tests.support.proxyrun import running_proxy
from userproxy.proxy import Proxy
from userproxy.sources.kubernetes import KubernetesSource

pytestmark = pytest.mark.both_loops

PORT = 8080
REFUSED = "refused"


class Scene:
    """A Service at a fresh 127.a.b.1:8080 and three name backends b1..b3 at 127.a.c.x."""

    def __init__(self) -> None:
        net = fresh_net()
        self.cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
        self.address = (self.cluster_ip, PORT)
        self.backends = [
            Backend(f"127.{net // 200 + 150}.{net % 200}.{i + 1}", name_server(f"b{i + 1}"))
            for i in range(3)
        ]

    def service(self) -> dict[str, object]:
        return service("web", port=PORT, cluster_ip=self.cluster_ip)

    def slice(self, name: str, *indexes: int) -> dict[str, object]:
        """An EndpointSlice of "web" with the backends ``indexes`` (0-based)."""
        ips = tuple(self.backends[i].ip for i in indexes)
        port = self.backends[indexes[0]].port if indexes else 1
        # Every backend listens on its own port; slices hold one backend each or share b1's.
        assert all(self.backends[i].port == port for i in indexes)
        return endpoint_slice(name, "web", port=port, addresses=ips)

    def close(self) -> None:
        for backend in self.backends:
            backend.stop()


@pytest.fixture
def scene() -> Iterator[Scene]:
    s = Scene()
    yield s
    s.close()


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as fake:
        yield fake


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Proxy builds its source with the default backoff (0.5 s up to 30 s); a test
    cannot wait 30 s after an outage, so cap it at 1 s here."""
    defaults = KubernetesSource.__init__.__kwdefaults__
    assert defaults is not None
    monkeypatch.setitem(defaults, "backoff_initial", 0.1)
    monkeypatch.setitem(defaults, "backoff_max", 1.0)


def k8s_proxy(
    kubeconfig: Path, *, wait_synced: bool = True, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[Proxy]:
    """A Proxy watching the API server of ``kubeconfig`` on the running loop."""
    return running_proxy(kubeconfig=kubeconfig, wait_synced=wait_synced, **overrides)


def answer(address: tuple[str, int]) -> str:
    try:
        return ask(address, timeout=2)
    except ConnectionRefusedError:
        return REFUSED
    except ConnectionResetError:
        # Seen (rarely) for a connection accepted just as the last endpoints went away;
        # a transitional outcome that ``settle`` waits out, never the expected state.
        return "reset"


async def settle(address: tuple[str, int], expected: set[str], within: float = 5.0) -> None:
    """Wait until new connections see exactly ``expected`` (a sample of 8 answers)."""

    def sample() -> set[str]:
        return {answer(address) for _ in range(8)}

    seen: set[str] = set()
    try:
        async with asyncio.timeout(within):
            # Polling on purpose: only new connections can tell what the data path does.
            while (seen := await asyncio.to_thread(sample)) != expected:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"expected {expected}, new connections still see {seen}") from None


class Kept:
    """One connection held open through the proxy; ``check()`` does a round trip on it."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.reader = self.sock.makefile("rb")

    def round_trip(self) -> str:
        self.sock.sendall(b"still there?\n")
        return self.reader.readline().decode().strip()

    async def check(self, expected: str) -> None:
        assert await asyncio.to_thread(self.round_trip) == expected

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


async def test_nothing_is_served_before_both_lists_are_in(
    api: FakeApiServer, scene: Scene, tmp_path: Path
) -> None:
    api.create("services", scene.service())
    api.create("endpointslices", scene.slice("web-1", 0))
    api.hold_lists("endpointslices")
    async with k8s_proxy(api.kubeconfig(tmp_path / "kubeconfig"), wait_synced=False) as proxy:
        await wait_until(
            lambda: bool(api.list_requests["services"] and api.list_requests["endpointslices"]),
            "both lists to be requested",
        )
        await asyncio.sleep(0.3)  # the Service list is in; the EndpointSlice list hangs
        assert await asyncio.to_thread(answer, scene.address) == REFUSED
        assert not proxy.synced.is_set()
        api.release_lists("endpointslices")
        async with asyncio.timeout(5):
            await proxy.synced.wait()
        await settle(scene.address, {"b1"})


async def test_creates_updates_and_deletes_reach_the_data_path(
    api: FakeApiServer, scene: Scene, tmp_path: Path
) -> None:
    async with k8s_proxy(api.kubeconfig(tmp_path / "kubeconfig")):
        assert await asyncio.to_thread(answer, scene.address) == REFUSED
        api.create("services", scene.service())
        api.create("endpointslices", scene.slice("web-1", 0))
        await settle(scene.address, {"b1"})
        api.update("endpointslices", scene.slice("web-1", 1))
        await settle(scene.address, {"b2"})
        api.create("endpointslices", scene.slice("web-2", 2))
        await settle(scene.address, {"b2", "b3"})
        api.delete("endpointslices", "web-1")
        api.delete("endpointslices", "web-2")
        await settle(scene.address, {REFUSED})
        api.create("endpointslices", scene.slice("web-1", 0))
        await settle(scene.address, {"b1"})
        api.delete("services", "web")
        await settle(scene.address, {REFUSED})


async def test_open_connection_survives_watch_trouble(
    api: FakeApiServer, scene: Scene, tmp_path: Path
) -> None:
    api.create("services", scene.service())
    api.create("endpointslices", scene.slice("web-1", 0))
    async with k8s_proxy(api.kubeconfig(tmp_path / "kubeconfig")) as proxy:
        counted = proxy.metrics.registry.get_sample_value
        await settle(scene.address, {"b1"})
        kept = await asyncio.to_thread(Kept, scene.address)
        try:
            await kept.check("b1")

            # 1. A dropped watch: resumed, and later changes still arrive.
            await api.wait_watching()
            api.drop_watches()
            await kept.check("b1")
            api.create("endpointslices", scene.slice("web-2", 1))
            await settle(scene.address, {"b1", "b2"})
            await kept.check("b1")
            assert counted("userproxy_watch_restarts_total", {"resource": "endpointslices"})

            # 2. 410 Gone with a deletion missed during the gap: the re-list removes b2.
            await api.wait_watching()
            api.hold_watches()
            api.drop_watches()
            api.delete("endpointslices", "web-2")
            api.create("endpointslices", scene.slice("web-3", 2))
            api.compact()
            await kept.check("b1")
            api.release_watches()
            await settle(scene.address, {"b1", "b3"})
            await kept.check("b1")
            assert counted("userproxy_relists_total", {"resource": "endpointslices"})

            # 3. The API server is down for 10 s; the proxy keeps serving its last state.
            await api.wait_watching()
            await api.stop()
            started = time.monotonic()
            api.delete("endpointslices", "web-3")  # made during the outage
            while time.monotonic() - started < 10:
                await kept.check("b1")
                assert await asyncio.to_thread(answer, scene.address) in {"b1", "b3"}
                await asyncio.sleep(1)
            await api.start()
            await settle(scene.address, {"b1"})
            await kept.check("b1")

            # 4. A malformed object is skipped; the watch goes on.
            await api.wait_watching()
            bad = scene.slice("web-bad", 1)
            bad["ports"] = [{"name": "http", "protocol": "TCP", "port": "abc"}]
            api.inject("endpointslices", bad)
            api.create("endpointslices", scene.slice("web-2", 1))
            await settle(scene.address, {"b1", "b2"})
            await kept.check("b1")
            assert counted("userproxy_invalid_objects_total", {"resource": "endpointslices"})
            assert counted("userproxy_api_errors_total", {"resource": "endpointslices"})
        finally:
            kept.close()
