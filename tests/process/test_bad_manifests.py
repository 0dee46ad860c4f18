"""Bad, odd and big manifests against the real command and a running proxy.

- At start, ``python -m userproxy run --manifests F`` with a bad F exits 2 with a message
  naming F and no traceback.
- A manifest replaced by a FIFO while the proxy runs is reported and skipped; other edits
  still apply and SIGTERM still ends the process (a reload used to block in ``open()``).
- A 40 000-Service manifest dropped into the watched directory never stalls the event
  loop: a loop-lag probe and a canary Service proxied by the same process are measured
  while it is read (in a child process) and applied.

Addresses: Services on 127.0.94.N, backends on 127.0.95.N (no other test uses them).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.process.test_cli import output_of, run_cli
from tests.support.backends import Backend, ask, name_server
from tests.support.manifest_cases import BAD, write_bad
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import (
    eventually,
    proxy_process,
    running_proxy,
    wait_listening,
    wait_logged,
    wait_until,
)
from userproxy.sources.manifest_files import FileContents
from userproxy.sources.manifest_read import ManifestError, parse_documents

PORT = 8080

# --------------------------------------------------------------------------- at start

#: The acceptance cases (see tests/sources/test_manifest_limits.py for all of them).
AT_START = [
    "yaml-flow-nested-5000",
    "yaml-block-nested-5000",
    "json-nested-100000",
    "yaml-int-5000-digits",
    "json-int-5000-digits",
    "yaml-empty-binary-int",
    "yaml-alias-bomb",
]


def start(path: Path) -> tuple[int, str]:
    """Run ``userproxy run --manifests PATH`` to its end: (exit status, all output)."""
    result = run_cli(
        "run", "--manifests", str(path), "--healthz-bind-address=", "--metrics-bind-address="
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("case", AT_START)
def test_bad_manifest_at_start_exits_2_with_a_message(tmp_path: Path, case: str) -> None:
    name, content, expected = BAD[case]
    path = write_bad(tmp_path / name, content)
    status, output = start(path)
    assert status == 2, output
    assert "Traceback" not in output, output
    assert output.startswith(f"userproxy: invalid manifests:\n{path}: "), output
    assert expected in output


def _mutation(seed: int) -> bytes:
    """A valid manifest with one to three random bytes replaced or inserted."""
    rng = random.Random(seed)
    data = bytearray(
        yaml.safe_dump_all(
            [service("web", "127.0.94.9", PORT), endpoint_slice("web-a", "web", 9, ["127.0.95.9"])]
        ).encode()
    )
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data))
        data[at : at + rng.randint(0, 2)] = bytes([rng.choice(b"[]{}:-&*!'\"\n 09_.xb")])
    return bytes(data)


def _rejected(data: bytes) -> bool:
    path = Path("web.yaml")
    try:
        documents = parse_documents(path, data)
    except ManifestError:
        return True
    contents = FileContents(proxy_name=None)
    contents.add_documents(path, documents)
    return bool(contents.problems)


#: The first seeds whose mutation the reader rejects (a valid one would start a proxy).
MUTATION_SEEDS = [seed for seed in range(100) if _rejected(_mutation(seed))][:4]


@pytest.mark.parametrize("seed", MUTATION_SEEDS)
def test_randomly_mutated_manifest_at_start_exits_2(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "web.yaml"
    path.write_bytes(_mutation(seed))
    status, output = start(path)
    assert status == 2, (seed, output)
    assert "Traceback" not in output, output
    assert f"{path}: " in output


def test_fifo_named_at_start_exits_2(tmp_path: Path) -> None:
    fifo = tmp_path / "web.yaml"
    os.mkfifo(fifo)
    status, output = start(fifo)
    assert status == 2, output
    assert output == f"userproxy: invalid manifests:\n{fifo}: not a regular file (a FIFO)\n"


def test_bounded_messages_at_start(tmp_path: Path) -> None:
    huge = service("web", "1" * 10_000_000, PORT)
    many = [service(f"s{i}", "127.0.94.9", 0) for i in range(50_000)]
    write(tmp_path / "huge.json", huge)
    status, output = start(tmp_path / "huge.json")
    print(f"10 MB value: exit {status}, {len(output)} characters of output")
    assert status == 2
    assert len(output) < 1000
    write(tmp_path / "many.json", *many)
    status, output = start(tmp_path / "many.json")
    print(f"50 000 invalid items: exit {status}, {len(output)} characters, "
          f"{output.count(chr(10))} lines")  # fmt: skip
    assert status == 2
    assert output.count("\n") == 1 + 1 + 20 + 1  # "invalid manifests", count, 20, "... more"
    assert "... and 49980 more" in output
    assert len(output) < 12_000


# --------------------------------------------------------------------------- FIFOs, running


def test_fifo_in_the_watched_directory_is_skipped_and_sigterm_works(tmp_path: Path) -> None:
    b1 = Backend("127.0.95.1", name_server("b1"))
    b2 = Backend("127.0.95.1", name_server("b2"))
    web, api = ("127.0.94.1", PORT), ("127.0.94.2", PORT)
    manifests = tmp_path / "manifests"
    manifests.mkdir()

    def publish(name: str, address: tuple[str, int], backend: Backend) -> None:
        write(
            manifests / f"{name}.json",
            service(name, address[0], PORT),
            endpoint_slice(f"{name}-a", name, backend.port, [backend.ip]),
        )

    publish("web", web, b1)
    publish("api", api, b1)
    try:
        with proxy_process(["run", "--manifests", str(manifests)]) as proc:
            wait_listening(web)
            wait_listening(api)
            assert ask(api) == "b1"

            (manifests / "web.json").unlink()
            os.mkfifo(manifests / "web.json")
            publish("api", api, b2)  # an edit of another file applies
            wait_until(lambda: ask(api, timeout=1) == "b2", what="the api edit")
            publish("web", web, b2)  # the FIFO replaced by a regular file applies
            wait_until(lambda: ask(web, timeout=1) == "b2", what="web back from the FIFO")

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            output = output_of(proc)
    finally:
        b1.stop()
        b2.stop()
    assert f"manifest skipped: {manifests / 'web.json'}: not a regular file (a FIFO)" in output
    assert "Traceback" not in output


def test_named_manifest_replaced_by_a_fifo_keeps_the_state_and_sigterm_works(
    tmp_path: Path,
) -> None:
    backend = Backend("127.0.95.2", name_server("b1"))
    web = ("127.0.94.3", PORT)
    path = tmp_path / "web.json"
    write(
        path,
        service("web", web[0], PORT),
        endpoint_slice("web-a", "web", backend.port, [backend.ip]),
    )
    log = tmp_path / "proxy.log"
    try:
        with proxy_process(["run", "--manifests", str(path)], log=log) as proc:
            wait_listening(web)
            path.unlink()
            os.mkfifo(path)
            # The poll that met the FIFO reported it and returned: it did not block.
            wait_logged(log, "not a regular file (a FIFO)")
            assert ask(web) == "b1"  # the last good state
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        output = log.read_text()
    finally:
        backend.stop()
    assert f"{path}: not a regular file (a FIFO)" in output
    assert output.count("not a regular file") == 1  # logged once
    assert "Traceback" not in output


# --------------------------------------------------------------------------- a big manifest


def bulk_yaml(count: int, *, selected: bool) -> str:
    """``count`` Services as multi-document YAML (about 215 bytes each).

    Not selected: labelled for another service proxy, so the proxy reads and validates
    them all but delivers none (the read alone is measured).
    """
    label = "" if selected else "\n  labels: {service.kubernetes.io/service-proxy-name: other}"
    return "".join(
        f"---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bulk-{i}\n  namespace: bulk"
        f"{label}\nspec:\n  clusterIP: 10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}\n"
        "  ports:\n  - {name: http, protocol: TCP, port: 80, targetPort: 8080}\n"
        for i in range(count)
    )


class Probe:
    """Loop lag (a 5 ms sleep's overshoot) and a canary Service asked every 10 ms."""

    def __init__(self, canary: tuple[str, int]) -> None:
        self.canary = canary
        self.lags: list[tuple[float, float]] = []  # (when it ended, lag)
        #: Per sample, the loop thread's CPU time during it beyond the sleep's own: how
        #: long code on the loop kept it busy (the rest of a lag is waiting for a CPU).
        self.busy: list[float] = []
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ask, daemon=True)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._measure_lag())
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        await asyncio.to_thread(self._thread.join, 5)

    async def _measure_lag(self) -> None:
        while not self._stop.is_set():
            started, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.lags.append((now, now - started - 0.005))
            self.busy.append(time.thread_time() - cpu)

    def _ask(self) -> None:
        # A blocking client in a thread, as a peer; a short timeout makes a stall a failure.
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                answer = ask(self.canary, timeout=1.0)
                if answer != "canary":
                    self.failures.append(f"answer {answer!r}")
            except OSError as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.01)


async def big_reload(tmp_path: Path, *, selected: bool, host: int) -> dict[str, float]:
    """Drop 40 000 Services into a running proxy's directory; measure the loop meanwhile."""
    backend = Backend(f"127.0.95.{host}", name_server("canary"))
    canary = (f"127.0.94.{host}", PORT)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write(
        manifests / "canary.json",
        service("canary", canary[0], PORT),
        endpoint_slice("canary-a", "canary", backend.port, [backend.ip]),
    )
    bulk = tmp_path / "bulk.yaml"
    bulk.write_text(bulk_yaml(40_000, selected=selected))
    then = time.time() - 5
    os.utime(bulk, (then, then))  # not "racy": read once, not again on the next polls
    syncs: list[tuple[float, float]] = []
    collections: list[tuple[float, float]] = []  # the cyclic GC's full (generation 2) runs
    gc_started = 0.0

    def gc_timer(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_started
        if info["generation"] != 2:
            return
        if phase == "start":
            gc_started = time.perf_counter()
        else:
            collections.append((gc_started, time.perf_counter()))

    try:
        async with running_proxy(manifests) as proxy:
            source = proxy.manifests
            assert source is not None
            assert await asyncio.to_thread(ask, canary) == "canary"
            sync = proxy.proxier.sync_in_slices

            async def timed_sync() -> bool:  # instrumentation: how long did syncs take?
                started = time.perf_counter()
                try:
                    return await sync()
                finally:
                    syncs.append((started, time.perf_counter()))

            proxy.proxier.sync_in_slices = timed_sync  # type: ignore[method-assign]
            # What the test process itself piled up (pytest, imports: about 70 000 objects)
            # is collected now: its full collection is due at a moment that depends on the
            # test modules imported, and it is not the reload's to answer for.
            gc.collect()
            probe = Probe(canary)
            probe.start()
            gc.callbacks.append(gc_timer)
            await asyncio.sleep(0.2)
            before = source.state
            started = time.perf_counter()
            os.replace(bulk, manifests / "bulk.yaml")
            await eventually(lambda: source.state is not before, within=90, what="the reload")
            applied = time.perf_counter()
            if selected:
                await eventually(lambda: proxy.recorder.queued_at is None, within=120, what="syncs")
            await asyncio.sleep(0.2)
            await probe.stop()
            assert source.worker_reads == 1
    finally:
        if gc_timer in gc.callbacks:
            gc.callbacks.remove(gc_timer)
        backend.stop()

    def overlaps(windows: list[tuple[float, float]], end: float, lag: float) -> bool:
        begin = end - lag - 0.005
        return any(s < end and begin < e for s, e in windows)

    outside = [lag for end, lag in probe.lags if not overlaps(syncs + collections, end, lag)]
    during = [lag for end, lag in probe.lags if overlaps(syncs, end, lag)]
    during_gc = [lag for end, lag in probe.lags if overlaps(collections, end, lag)]
    return {
        "services": 40_000,
        "manifest MB": (manifests / "bulk.yaml").stat().st_size / 1e6,
        "read+apply s": applied - started,
        "lag samples": len(probe.lags),
        "max lag ms": 1000 * max(lag for _, lag in probe.lags),
        "max loop-thread CPU in one sample ms": 1000 * max(probe.busy),
        "max lag outside syncs and full GCs ms": 1000 * max(outside, default=0.0),
        "p99 lag outside syncs and full GCs ms": 1000 * statistics.quantiles(outside, n=100)[98],
        "max lag during syncs ms": 1000 * max(during, default=0.0),
        "syncs": len(syncs),
        "longest sync ms": 1000 * max((e - s for s, e in syncs), default=0.0),
        "max lag during full GCs ms": 1000 * max(during_gc, default=0.0),
        "full GCs": len(collections),
        "longest full GC ms": 1000 * max((e - s for s, e in collections), default=0.0),
        "longest full GC outside syncs ms": 1000
        * max(
            (e - s for s, e in collections if not any(a < e and s < b for a, b in syncs)),
            default=0.0,
        ),
        "canary requests": len(probe.latencies),
        "canary failures": len(probe.failures),
        "canary max latency ms": 1000 * max(probe.latencies, default=0.0),
    }


def report(title: str, figures: dict[str, float]) -> None:
    print(f"\n{title}:")
    for name, value in figures.items():
        print(f"  {name}: {value:.1f}" if isinstance(value, float) else f"  {name}: {value}")


@pytest.mark.timeout(120)
async def test_big_manifest_read_never_stalls_the_loop(tmp_path: Path) -> None:
    figures = await big_reload(tmp_path, selected=False, host=10)
    report("40 000 Services read (not selected: nothing to sync)", figures)
    assert figures["manifest MB"] > 8
    assert figures["syncs"] == 0
    # What the proxy's own code can be held to: the loop thread never ran 50 ms between two
    # probe wake-ups.  The wall-clock lag adds waiting for a CPU on a shared machine; it was
    # below 10 ms here on a quiet machine and is only bounded loosely.
    assert figures["max loop-thread CPU in one sample ms"] < 50
    assert figures["max lag ms"] < 200
    assert figures["canary failures"] == 0
    assert figures["canary requests"] > 50


@pytest.mark.timeout(240)
async def test_big_manifest_apply_measured(tmp_path: Path) -> None:
    figures = await big_reload(tmp_path, selected=True, host=11)
    report("40 000 Services read and applied (selected)", figures)
    # The proxier's syncs run in slices and freeze the grown heap (userproxy/slices.py),
    # so no full collection of 40 000 Services' objects pauses the loop and the canary
    # keeps answering.  The one unsliced step, sorting the re-planned Services, takes
    # 15-50 ms here (reported as "max lag during syncs").  Lags are wall clock, which a
    # loaded machine stretches (the design notes: tests assert no wall-clock speed), so
    # what is asserted is what the code decides: no full collection, no failed request.
    assert figures["full GCs"] == 0
    assert figures["canary failures"] == 0
