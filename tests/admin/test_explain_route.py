"""``/explain`` on a running proxy's metrics server, and ``userproxy explain --server``.

Real backends, real connections: the candidates the live explanation names are where the
connections go; a ClientIP pin made by a real connection is named with its expiry, is
then the only candidate, and the next connections do go there; an endpoint ejected after
refused dials is shown ejected and is not a candidate; round-robin's and maglev's next
picks are where the next connection goes.  The CLI runs as a child process (in a thread,
while the proxy serves on the test's loop).  The rules that narrow the candidates with
live state (ejections, pins) are also checked table-driven, case by case.

Addresses: 127.216.N.1 the ClusterIP, .2 the metrics server, .11+ the backends (and the
refusing ones), .50+ the clients (no other test uses 127.216).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.process.test_cli import run_cli
from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import endpoint_slice, service, write
from tests.support.model import svc
from tests.support.proxyrun import running_proxy
from userproxy.explain_rules import LiveFacts, Pin, live_steps
from userproxy.model import Protocol, ServicePortName
from userproxy.proxy import Proxy

pytestmark = pytest.mark.both_loops

PORT = 8080
SPN = ServicePortName("default", "web", "tcp", Protocol.TCP)


@dataclass
class Scene:
    """A Service default/web over name backends (and refusing endpoints) and a proxy
    serving it with its metrics server on 127.216.N.2."""

    net: int
    proxy: Proxy
    server: str
    #: "ip:port" -> the backend's name ("dead-N" for a refusing endpoint).
    names: dict[str, str]

    @property
    def address(self) -> tuple[str, int]:
        return (f"127.216.{self.net}.1", PORT)

    def client(self, n: int = 0) -> str:
        return f"127.216.{self.net}.{50 + n}"


@contextlib.asynccontextmanager
async def scene(
    tmp_path: Path,
    net: int,
    ready: Sequence[bool],
    *,
    dead: int = 0,
    affinity: int | None = None,
    balancer: str | None = None,
    **settings: Any,
) -> AsyncIterator[Scene]:
    backends = [
        Backend(f"127.216.{net}.{11 + i}", name_server(chr(97 + i))) for i in range(len(ready))
    ]
    refusing = []  # bound, never listening: every connect is refused
    for i in range(dead):
        sock = socket.socket()
        sock.bind((f"127.216.{net}.{11 + len(ready) + i}", 0))
        refusing.append(sock)
    try:
        names = {f"{b.ip}:{b.port}": chr(97 + i) for i, b in enumerate(backends)}
        names |= {"{}:{}".format(*s.getsockname()): f"dead-{i}" for i, s in enumerate(refusing)}
        addresses = [(b.ip, b.port, r) for b, r in zip(backends, ready, strict=True)]
        addresses += [(*s.getsockname(), True) for s in refusing]
        slices = [
            endpoint_slice(f"web-{i}", "web", port, [ip], ready=[is_ready])
            for i, (ip, port, is_ready) in enumerate(addresses)
        ]
        annotations = {"userproxy.io/balancer": balancer} if balancer else None
        svc = service(
            "web", f"127.216.{net}.1", PORT, affinity_timeout=affinity, annotations=annotations
        )
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        write(manifests / "web.json", svc, *slices)
        with socket.socket() as probe:  # a port free on the metrics address a moment ago
            probe.bind((f"127.216.{net}.2", 0))
            metrics_port = probe.getsockname()[1]
        metrics = f"127.216.{net}.2:{metrics_port}"
        async with running_proxy(manifests, metrics_bind_address=metrics, **settings) as proxy:
            yield Scene(net, proxy, f"http://{metrics}", names)
    finally:
        for backend in backends:
            backend.stop()
        for sock in refusing:
            sock.close()


async def cli(s: Scene, *args: str) -> tuple[int, str, str]:
    result = await asyncio.to_thread(run_cli, "explain", *args, "--server", s.server)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


async def explained(s: Scene, client: str) -> dict[str, Any]:
    status, out, err = await cli(s, "default/web:tcp", "--from", client, "-o", "json")
    assert status == 0, err
    data: dict[str, Any] = json.loads(out)
    assert data["source"] == "server"
    return data


async def get(s: Scene, query: str) -> tuple[int, dict[str, Any]]:
    """GET /explain?query straight from the metrics server: (status, JSON body)."""

    def run() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"{s.server}/explain?{query}", timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(run)


async def reach(s: Scene, client: str, count: int) -> list[str]:
    """The names ``count`` connections from ``client`` reach, in order."""

    def run() -> list[str]:
        return [ask(s.address, source=client, timeout=5) for _ in range(count)]

    return await asyncio.to_thread(run)


async def test_candidates_are_where_connections_go(tmp_path: Path) -> None:
    async with scene(tmp_path, 1, [True, True, False]) as s:
        client = s.client()
        data = await explained(s, client)
        assert data["balancer"] == "round-robin"
        assert sorted(s.names[c] for c in data["candidates"]) == ["a", "b"]
        assert [e["in_pool"] for e in data["endpoints"]] == [True, True, False]
        assert not any(e["ejected"] for e in data["endpoints"])
        assert data["affinity"] is None
        # Round-robin's next pick is read without advancing it: the next connection goes there.
        assert data["pick"] in data["candidates"]
        assert await reach(s, client, 1) == [s.names[data["pick"]]]
        seen = set(await reach(s, client, 12))
        assert seen == {s.names[c] for c in data["candidates"]}
        status, text, err = await cli(s, "default/web", "--from", client)
        assert status == 0, err
        assert text.splitlines()[0].endswith("(live, from the proxy)")
        assert "[outlier ejection: none]" in text
        assert "round-robin: its next pick at this address" in text


async def test_affinity_pin_is_named_and_is_where_connections_go(tmp_path: Path) -> None:
    async with scene(tmp_path, 2, [True, True, True], affinity=60) as s:
        client, other = s.client(0), s.client(1)
        before = await explained(s, client)
        assert before["affinity"] is None
        assert len(before["candidates"]) == 3
        (first,) = await reach(s, client, 1)
        pinned = next(address for address, name in s.names.items() if name == first)
        data = await explained(s, client)
        pin = data["affinity"]
        assert pin["endpoint"] == pinned
        assert 0 < pin["expires_in"] <= 60
        assert abs(pin["expires_at"] - (time.time() + pin["expires_in"])) < 5
        assert data["candidates"] == [pinned]
        assert data["pick"] == pinned
        assert await reach(s, client, 6) == [first] * 6
        status, text, err = await cli(s, "default/web", "--from", client)
        assert status == 0, err
        assert f"is pinned to {pinned} until " in text
        assert f"  candidates: {pinned}" in text
        # Another client has no pin: every endpoint is a candidate for it.
        unpinned = await explained(s, other)
        assert unpinned["affinity"] is None
        assert len(unpinned["candidates"]) == 3


async def test_ejected_endpoint_is_marked_and_not_a_candidate(tmp_path: Path) -> None:
    async with scene(tmp_path, 3, [True, True], dead=1, outlier_consecutive_failures=2) as s:
        client = s.client()
        (dead,) = (a for a, name in s.names.items() if name.startswith("dead"))
        for _ in range(40):  # bounded: a refused dial is retried on a good endpoint
            detector = s.proxy.listeners.outliers(SPN)
            if detector is not None and detector.ejected:
                break
            assert set(await reach(s, client, 3)) <= {"a", "b"}
        else:
            raise AssertionError("the refusing endpoint was never ejected")
        data = await explained(s, client)
        (verdict,) = (e for e in data["endpoints"] if e["address"] == dead)
        assert verdict["ejected"] is True
        assert verdict["in_pool"] is True  # planned (ready), but avoided
        assert 0 < verdict["ejected_for"] <= 30
        assert dead not in data["candidates"]
        assert sorted(s.names[c] for c in data["candidates"]) == ["a", "b"]
        failures = sum(t.dial_failures for t in s.proxy.listeners.totals().values())
        assert set(await reach(s, client, 10)) == {"a", "b"}
        # Not even tried: the listener avoids it exactly as explain said.
        assert sum(t.dial_failures for t in s.proxy.listeners.totals().values()) == failures
        status, text, err = await cli(s, "default/web", "--from", client)
        assert status == 0, err
        assert f"    x {dead}: ready; ejected (dials failed) for " in text
        assert "[outlier ejection]" in text


async def test_maglev_next_pick_is_where_each_client_goes(tmp_path: Path) -> None:
    async with scene(tmp_path, 4, [True, True, True], balancer="maglev") as s:
        for n in range(12):
            client = s.client(n)
            status, data = await get(s, f"service=default/web&from={client}")
            assert status == 200, data
            assert data["pick"] in data["candidates"]
            assert set(await reach(s, client, 2)) == {s.names[data["pick"]]}


async def test_unknown_service_and_bad_queries(tmp_path: Path) -> None:
    async with scene(tmp_path, 5, [True]) as s:
        status, out, err = await cli(s, "default/nope")
        assert status == 2
        assert out == ""
        assert err.count("\n") == 1, err
        assert (
            "no Service default/nope in the running proxy's applied state; "
            "there are: default/web:tcp" in err
        )
        status, _, err = await cli(s, "default/web", "--node", "other")
        assert status == 2
        assert "leave out --node" in err
        status, out, err = await cli(s, "default/web:9999")
        assert status == 2
        assert "has no port '9999'; its ports: tcp" in err
        code, body = await get(s, "service=default/nope")
        assert code == 404
        assert "there are: default/web:tcp" in body["error"]
        code, body = await get(s, "from=127.0.0.1")
        assert (code, body) == (400, {"error": "service is required (NAMESPACE/NAME[:PORT])"})
        code, body = await get(s, "service=default/web&from=nonsense")
        assert code == 400
        assert "not an IP address" in body["error"]
        code, body = await get(s, "service=default/web&to=127.216.5.9")
        assert code == 404
        assert "its addresses: 127.216.5.1:8080" in body["error"]


# -- the live narrowing rules, table-driven (no proxy) ------------------------------------

A, B, C = "127.216.200.1:80", "127.216.200.2:80", "127.216.200.3:80"
PIN_A = Pin(A, 30.0, time.time() + 30)


@pytest.mark.parametrize(
    ("affinity", "facts", "candidates", "pinned", "rule_text"),
    [
        # Nothing live: the planned pool.
        (None, LiveFacts(), (A, B, C), None, "no endpoint of the pool is ejected"),
        # One out of three: avoided.
        (None, LiveFacts({B: 12.0}), (A, C), None, "avoided while others remain"),
        # All out: the balancer falls back to all of them (Envoy's panic mode, ours).
        (None, LiveFacts({A: 1.0, B: 1.0, C: 1.0}), (A, B, C), None, "falls back to all"),
        # A usable pin: only its endpoint.
        (60, LiveFacts(pin=PIN_A), (A,), A, f"is pinned to {A} until"),
        # A pin to an ejected endpoint is passed over (ClientIPAffinity.pick's exclude).
        (60, LiveFacts({A: 5.0}, PIN_A), (B, C), None, "which is ejected"),
        # ... even when everything is out.
        (60, LiveFacts({A: 5.0, B: 5.0, C: 5.0}, PIN_A), (A, B, C), None, "which is ejected"),
        # A pin to an endpoint of another pool of the port (e.g. a Local one) is not used.
        (60, LiveFacts(pin=Pin("127.216.200.9:80", 3.0, 0.0)), (A, B, C), None, "not in this"),
        # A pin left over from before affinity was turned off means nothing.
        (None, LiveFacts(pin=PIN_A), (A, B, C), None, "sessionAffinity None"),
    ],
)
def test_live_narrowing(
    affinity: int | None,
    facts: LiveFacts,
    candidates: tuple[str, ...],
    pinned: str | None,
    rule_text: str,
) -> None:
    candidates_got, pin, steps = live_steps(
        svc(affinity_timeout=affinity), "127.216.200.50", (A, B, C), facts
    )
    assert candidates_got == candidates
    assert (pin.endpoint if pin else None) == pinned
    assert rule_text in "\n".join(f"[{s.rule}] {s.detail}" for s in steps)
