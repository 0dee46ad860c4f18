"""The soak engine: a proxy subprocess, tagged backend subprocesses, verifying clients, a
churn driver, and a classifier that tells legitimate breakage from the proxy's faults.

Everything runs on 127.0.0.0/8; every loop is bounded by the run's deadline and every
blocking call by a timeout.  ``run_soak(config)`` returns a :class:`SoakReport`;
``report.failures`` is empty when the proxy did everything right.  See docs/soak.md.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tests.soak.wire import (
    GREETING_RE,
    describe_mismatch,
    foreign_bytes,
    foreign_origin,
    pattern,
    sha,
)
from tests.support.proxyrun import proxy_process

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "soak"
SERVICE_PORTS = (8080, 8081)
TARGET_PORTS = (9000, 9001)
#: (name, protocol, backends); canary is never churned: it measures the loop's stalls.
SERVICES = (
    ("alpha", "TCP", 5),
    ("beta", "TCP", 6),
    ("gamma", "TCP", 3),
    ("canary", "TCP", 1),
    ("dns", "UDP", 4),
    ("syslog", "UDP", 3),
)
TCP_SERVICES = tuple(name for name, proto, _ in SERVICES if proto == "TCP" and name != "canary")
UDP_SERVICES = tuple(name for name, proto, _ in SERVICES if proto == "UDP")
CONDITIONS = ("ready", "notready", "terminating", "absent")
#: How long a client waits for any one read or write.
IO_TIMEOUT = 20.0
#: How long after a manifest write the proxy may still act on the previous state (plus
#: any loop stall measured in between).
LAG = 3.0
#: Clock slack between an event being recorded and its effect being observed.
SLACK = 0.3
MiB = 1 << 20


@dataclass
class SoakConfig:
    loop: str = "uvloop"
    #: "compiled" (the fast path where it is built, as in production) or "python".
    relay: str = "compiled"
    seconds: float = 60.0
    seed: int = 1
    workdir: Path = Path("/tmp/userproxy-soak")
    tcp_workers: int = 10
    idle_workers: int = 4
    udp_workers: int = 2
    #: --shutdown-grace: how long connections of a removed listener may go on.
    grace: float = 3.0
    min_sync_period: float = 0.1
    #: Churn: a manifest rewrite every 100-300 ms; a backend SIGKILL every 2-5 s.
    churn_interval: tuple[float, float] = (0.1, 0.3)
    kill_interval: tuple[float, float] = (2.0, 5.0)
    #: A big manifest of unrelated Services every ``stall_every`` s, 2-5 MB, kept 4-8 s and
    #: rewritten (every Service changed) 2-3.5 s after it appeared.
    stall_every: float = 12.0
    filler_mb: tuple[float, float] = (2.0, 5.0)
    #: A CPU burner from/to these fractions of the run (None: no burner).
    burn: tuple[float, float] | None = (0.4, 0.7)
    max_stream: int = 4 * MiB
    #: Run the proxy from this source tree (e.g. ``git archive HEAD`` unpacked) instead of
    #: the working tree's ``userproxy/``.
    proxy_src: Path | None = None
    log: Callable[[str], None] = print


# -- the world: addresses, manifest state, the timeline of churn events ---------------------
@dataclass(frozen=True, slots=True)
class SvcState:
    exists: bool
    port: int
    target: int
    conds: tuple[tuple[str, str], ...]

    def usable(self) -> frozenset[str]:
        """The endpoints the proxy should use: ready ones, else serving terminating ones."""
        if not self.exists:
            return frozenset()
        ready = frozenset(name for name, cond in self.conds if cond == "ready")
        return ready or frozenset(name for name, cond in self.conds if cond == "terminating")

    def cond(self, name: str) -> str:
        return dict(self.conds)[name]


@dataclass
class Instance:
    pid: int
    started: float
    ready: float | None = None
    killed: float | None = None


class Plan:
    """Addresses: a block 127.A.B.0/24 of our own; service j at .200+j, its backends at
    .10*j+i+1; filler Services (never listening: no endpoints) in 127.A.B+1.0/24."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed ^ os.getpid())
        self.a = 160 + os.getpid() % 60
        self.b = rng.randrange(0, 250)
        self.service_ip: dict[str, str] = {}
        self.protocol: dict[str, str] = {}
        self.backends: dict[str, list[str]] = {}
        self.backend_ip: dict[str, str] = {}
        for j, (name, proto, count) in enumerate(SERVICES):
            self.service_ip[name] = f"127.{self.a}.{self.b}.{200 + j}"
            self.protocol[name] = proto
            self.backends[name] = [f"{name}-{i + 1}" for i in range(count)]
            for i, backend in enumerate(self.backends[name]):
                self.backend_ip[backend] = f"127.{self.a}.{self.b}.{10 * j + i + 1}"

    def service_of(self, backend: str) -> str:
        return backend.rsplit("-", 1)[0]


#: A reload delivering at least this many changes is a big manifest coming or going.
BIG_RELOAD_CHANGES = 1000
_BIG_RELOAD = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*manifests reloaded: (\d+) changes", re.M
)


def _overlap(windows: list[tuple[float, float]], t1: float, t2: float) -> float:
    return sum(max(0.0, min(e, t2) - max(s, t1)) for s, e in windows)


def _log_time(text: str) -> float:
    """A log line's local time stamp (``2026-12-02 07:47:20,686``) as a Unix time."""
    return time.mktime(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")) + int(text[20:]) / 1000


class Timeline:
    """What the churn driver did and when (time.monotonic(), comparable across processes)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.states: dict[str, list[tuple[float, SvcState]]] = defaultdict(list)
        #: (time, service, port): a listener went away (Service deleted or port changed).
        self.removals: list[tuple[float, str, int]] = []
        self.instances: dict[str, list[Instance]] = defaultdict(list)
        self.by_pid: dict[int, tuple[str, Instance]] = {}
        self.stalls: list[tuple[float, float]] = []
        #: (from, to): the proxy busy taking in a big manifest (written or removed at
        #: ``from``, its reload applied at ``to``, from the proxy's log): edits written
        #: meanwhile are applied after it, so they may take longer to show.
        self.big_reloads: list[tuple[float, float]] = []
        #: When a big manifest was removed (it is re-read as a deletion of every object).
        self.filler_removals: list[float] = []
        self.fillers: list[tuple[float, float, int]] = []
        self.events: Counter[str] = Counter()

    def current(self, svc: str) -> SvcState:
        with self.lock:
            return self.states[svc][-1][1]

    def states_between(self, svc: str, t1: float, t2: float) -> list[SvcState]:
        with self.lock:
            history = list(self.states[svc])
        before = [s for t, s in history if t <= t1]
        return before[-1:] + [s for t, s in history if t1 < t <= t2]

    def lag(self, t: float) -> float:
        """How long a change may take to show at ``t``: LAG, plus the loop stalls measured
        and the time the proxy spent taking in big manifests in the 30 s before ``t``."""
        with self.lock:
            busy = self.stalls + self.big_reloads
        return LAG + _overlap(busy, t - 30, t)

    def stall_time(self, t1: float, t2: float) -> float:
        with self.lock:
            stalls = list(self.stalls)
        return _overlap(stalls, t1, t2)

    def note_big_reloads(self, log_text: str, wall_offset: float) -> None:
        """Find in the proxy's log when each big manifest (written or removed) had been
        applied: its reload delivers thousands of changes at once."""
        applied = sorted(
            _log_time(match.group(1)) - wall_offset
            for match in _BIG_RELOAD.finditer(log_text)
            if int(match.group(2)) >= BIG_RELOAD_CHANGES
        )
        with self.lock:
            starts = sorted([t for t, _, _ in self.fillers] + self.filler_removals)
        for start in starts:
            done = next((t for t in applied if t >= start), None)
            if done is not None:
                with self.lock:
                    self.big_reloads.append((start, done))

    def dead(self, name: str, t1: float, t2: float) -> bool:
        """Whether backend ``name`` was down at some moment in [t1, t2]."""
        with self.lock:
            instances = list(self.instances[name])
        for i, inst in enumerate(instances):
            if inst.killed is None or inst.killed > t2:
                continue
            following = instances[i + 1] if i + 1 < len(instances) else None
            back = following.ready if following is not None else None
            if back is None or back >= t1:
                return True
        return False

    def killed_in(self, svc: str, t1: float, t2: float, names: list[str]) -> bool:
        with self.lock:
            return any(
                inst.killed is not None and t1 <= inst.killed <= t2
                for name in names
                for inst in self.instances[name]
            )

    def instance(self, pid: int) -> tuple[str, Instance] | None:
        with self.lock:
            return self.by_pid.get(pid)


# -- manifests ------------------------------------------------------------------------------
def service_manifest(plan: Plan, svc: str, state: SvcState) -> dict[str, object]:
    proto = plan.protocol[svc]
    endpoints = []
    for name, cond in state.conds:
        if cond == "absent":
            continue
        endpoints.append(
            {
                "addresses": [plan.backend_ip[name]],
                "conditions": {
                    "ready": cond == "ready",
                    "serving": cond in ("ready", "terminating"),
                    "terminating": cond == "terminating",
                },
                "nodeName": "soak-node",
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": svc, "namespace": NAMESPACE},
                "spec": {
                    "clusterIP": plan.service_ip[svc],
                    "ports": [
                        {"name": "p", "protocol": proto, "port": state.port, "targetPort": "p"}
                    ],
                },
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{svc}-x1",
                    "namespace": NAMESPACE,
                    "labels": {"kubernetes.io/service-name": svc},
                },
                "addressType": "IPv4",
                "ports": [{"name": "p", "protocol": proto, "port": state.target}],
                "endpoints": endpoints,
            },
        ],
    }


def filler_items(plan: Plan, count: int) -> list[str]:
    """Serialized unrelated Services (no EndpointSlices, so no sockets), ~420 bytes each."""
    items = []
    a2 = (plan.a + 1) % 256
    for i in range(count):
        obj = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": f"filler-{i}",
                "namespace": "filler",
                "labels": {"app": f"filler-{i}", "tier": "soak-stall", "team": "nobody"},
                "annotations": {"note": "x" * 120},
            },
            "spec": {
                "clusterIP": f"127.{a2}.{i // 250 % 250}.{i % 250 + 1}",
                "ports": [
                    {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                    {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353},
                ],
            },
        }
        items.append(json.dumps(obj))
    return items


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- processes ------------------------------------------------------------------------------
class Backends:
    """One subprocess per backend; SIGKILL and restart keep the Timeline up to date."""

    def __init__(self, plan: Plan, timeline: Timeline, reports: Path) -> None:
        self.plan = plan
        self.timeline = timeline
        self.reports = reports
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self, name: str) -> None:
        ip = self.plan.backend_ip[name]
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.soak.backend", name, ip,
             ",".join(map(str, TARGET_PORTS)), str(self.reports / f"{name}.log")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        inst = Instance(proc.pid, started)
        with self.timeline.lock:
            self.timeline.instances[name].append(inst)
            self.timeline.by_pid[proc.pid] = (name, inst)
        with self.lock:
            self.procs[name] = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the process prints READY or dies
        if line.strip() != "READY":
            raise RuntimeError(f"backend {name} did not start: {line!r}")
        inst.ready = time.monotonic()

    def start_all(self) -> None:
        for names in self.plan.backends.values():
            for name in names:
                self.start(name)

    def kill(self, name: str) -> None:
        with self.lock:
            proc = self.procs[name]
        with self.timeline.lock:
            self.timeline.by_pid[proc.pid][1].killed = time.monotonic()
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def restart_later(self, name: str, delay: float) -> None:
        def run() -> None:
            time.sleep(delay)
            self.start(name)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def alive(self, name: str) -> bool:
        with self.lock:
            proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop_all(self) -> None:
        for thread in self.threads:
            thread.join(timeout=15)
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def proxy_sockets(pid: int) -> Counter[str]:
    """The proxy's sockets by kind: tcp-<STATE> and udp, from /proc."""
    inodes = set()
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    states = {"01": "ESTABLISHED", "02": "SYN_SENT", "06": "TIME_WAIT", "07": "CLOSE",
              "08": "CLOSE_WAIT", "0A": "LISTEN", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "09": "LAST_ACK", "0B": "CLOSING", "03": "SYN_RECV"}  # fmt: skip
    counts: Counter[str] = Counter()
    for table in ("tcp", "udp"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    kind = f"tcp-{states.get(cols[3], cols[3])}" if table == "tcp" else "udp"
                    counts[kind] += 1
    return counts


def open_fds(pid: int) -> int:
    """The proxy's open descriptors, not counting /dev/null: uvloop opens one at its first
    child process (the manifest reader's, when big manifests change) and keeps it, so
    whether the baseline holds it is a matter of timing, not of a leak."""
    count = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return -1
    for name in names:
        try:
            count += os.readlink(f"/proc/{pid}/fd/{name}") != os.devnull
        except OSError:  # closed meanwhile
            continue
    return count


#: The proxy's peak RSS a soak allows.  Taking in the big manifests peaks at about
#: 180 MiB, for 40 s or 10 minutes alike; a leak of what each big manifest removes (as
#: when a listener's reference cycle outlived a bulk sync's gc.freeze()) grew a 10-minute
#: run to 1 GiB.
RSS_LIMIT_MIB = 400


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


# -- clients --------------------------------------------------------------------------------
class Broken(Exception):
    """The connection ended (RST, EOF, TIMEOUT, ERR:x) before the client was done."""

    def __init__(self, how: str, got: bytes = b"") -> None:
        super().__init__(how)
        self.how = how
        self.got = got


class Wrong(Exception):
    """Bytes that are not what the backend that greeted us should have sent."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # "cross-delivery" or "corrupt"
        self.detail = detail


class Peer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _recv(self, size: int = 65536) -> bytes:
        try:
            data = self.sock.recv(size)
        except ConnectionResetError:
            raise Broken("RST") from None
        except TimeoutError:
            raise Broken("TIMEOUT") from None
        except OSError as exc:
            raise Broken(f"ERR:{errno.errorcode.get(exc.errno or 0, exc.errno)}") from None
        if not data:
            raise Broken("EOF")
        return data

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > 300:
                return bytes(self.buf)
            try:
                self.buf += self._recv()
            except Broken as broken:
                broken.got = bytes(self.buf)
                raise
        index = self.buf.index(b"\n")
        raw = bytes(self.buf[:index])
        del self.buf[: index + 1]
        return raw

    def exact(self, size: int, piece: int = 65536, delay: float = 0.0) -> bytes:
        out = bytearray(self.buf[:size])
        del self.buf[:size]
        while len(out) < size:
            if delay:
                time.sleep(delay)
            try:
                out += self._recv(min(piece, size - len(out)))
            except Broken as broken:
                broken.got = bytes(out)
                raise
        return bytes(out[:size])

    def send(self, data: bytes, piece: int = 0, delay: float = 0.0) -> None:
        try:
            if not piece:
                self.sock.sendall(data)
                return
            for i in range(0, len(data), piece):
                self.sock.sendall(data[i : i + piece])
                time.sleep(delay)
        except ConnectionResetError:
            raise Broken("RST") from None
        except BrokenPipeError:
            raise Broken("EPIPE") from None
        except TimeoutError:
            raise Broken("TIMEOUT") from None
        except OSError as exc:
            raise Broken(f"ERR:{errno.errorcode.get(exc.errno or 0, exc.errno)}") from None

    def shutdown_write(self) -> None:
        """Send our FIN.  ENOTCONN means the connection was already reset (the socket is
        closed by a RST that arrived meanwhile)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise Broken("RST") from None
            raise Broken(f"ERR:{errno.errorcode.get(exc.errno or 0, exc.errno)}") from None

    def until_end(self) -> tuple[bytes, str]:
        """Read until the connection ends: (bytes, RST|EOF|TIMEOUT|ERR:x)."""
        out = bytearray(self.buf)
        self.buf.clear()
        while True:
            try:
                out += self._recv()
            except Broken as broken:
                return bytes(out), broken.how


@dataclass
class ConnRecord:
    scenario: str
    service: str
    port: int
    token: str
    t0: float
    t_end: float = 0.0
    backend: str | None = None
    cid: str | None = None
    pid: int | None = None
    #: ok | refused | connect-timeout | broken | wrong | rst-as-eof
    outcome: str = "ok"
    how: str = ""  # for broken: RST, EOF, TIMEOUT...
    phase: str = ""  # greeting, or the op under way
    detail: str = ""
    wrong_kind: str = ""
    expect_report: str | None = None
    up: int = 0
    down: int = 0
    latency: float = 0.0


def _sizes(rng: random.Random, biggest: int) -> int:
    size = rng.choices([65536, 262144, MiB, 2 * MiB, 4 * MiB], weights=[4, 4, 3, 2, 1])[0]
    return min(size, biggest)


SCENARIOS = {
    "short": 26,
    "stream": 12,
    "upload": 10,
    "halfclose": 10,
    "client-rst-upload": 7,
    "client-rst-idle": 4,
    "backend-rst": 8,
    "bye": 6,
    "slow-reader": 5,
    "slow-writer": 5,
    "backend-slow": 4,
    "backend-slowread": 3,
}


class Clients:
    def __init__(self, config: SoakConfig, plan: Plan, timeline: Timeline) -> None:
        self.config = config
        self.plan = plan
        self.timeline = timeline
        self.records: list[ConnRecord] = []
        self.udp: list[UdpRecord] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.tokens = iter(range(1, 1 << 62))
        self.token_lock = threading.Lock()

    def token(self, prefix: str) -> str:
        with self.token_lock:
            return f"{prefix}{next(self.tokens)}"

    def add(self, record: ConnRecord) -> None:
        with self.lock:
            self.records.append(record)

    # -- one TCP connection ------------------------------------------------------------------
    def connection(self, rng: random.Random, scenario: str, svc: str) -> ConnRecord:
        state = self.timeline.current(svc)
        rec = ConnRecord(scenario, svc, state.port, self.token("c"), time.monotonic())
        try:
            self._connection(rng, rec)
        finally:
            rec.t_end = time.monotonic()
        return rec

    def _connection(self, rng: random.Random, rec: ConnRecord) -> None:
        address = (self.plan.service_ip[rec.service], rec.port)
        try:
            sock = socket.create_connection(address, timeout=5)
        except ConnectionRefusedError:
            rec.outcome = "refused"
            return
        except ConnectionResetError:  # the listening socket closed with us in its queue
            rec.outcome, rec.how, rec.phase = "broken", "RST", "connect"
            return
        except TimeoutError:
            rec.outcome = "connect-timeout"
            return
        except OSError as exc:
            rec.outcome, rec.how = "broken", f"ERR:{exc.errno}"
            rec.phase = "connect"
            return
        sock.settimeout(IO_TIMEOUT)
        peer = Peer(sock)
        rec.phase = "greeting"
        try:
            peer.send(f"T {rec.token}\n".encode())
            greeting = peer.line()
            rec.latency = time.monotonic() - rec.t0
            match = GREETING_RE.match(greeting.decode(errors="replace"))
            if match is None:
                kind = "cross-delivery" if foreign_origin(greeting, "") else "corrupt"
                raise Wrong(kind, f"greeting {greeting[:100]!r}")
            rec.backend = f"{match.group(1)}-{match.group(2)}"
            rec.cid = f"{match.group(3)}x{match.group(4)}"
            rec.pid = int(match.group(3))
            if match.group(1) != rec.service:
                raise Wrong("cross-delivery", f"greeting {greeting!r} on Service {rec.service}")
            self._scenario(rng, rec, peer)
        except Broken as broken:
            rec.outcome, rec.how = "broken", broken.how
            if broken.got:
                rec.detail += f"after {len(broken.got)} bytes {broken.got[-80:]!r}"
                if foreign_bytes(broken.got, rec.token, rec.cid):
                    rec.outcome, rec.wrong_kind = "wrong", "cross-delivery"
                    rec.detail = f"{rec.phase}: another connection's bytes, then {broken.how} "
                    rec.detail += f"{describe_mismatch(broken.got, b'')[1]}"
        except Wrong as wrong:
            rec.outcome, rec.wrong_kind, rec.detail = "wrong", wrong.kind, wrong.detail
        finally:
            sock.close()

    def _trailer(self, peer: Peer, rec: ConnRecord, letter: str, *expected: str) -> None:
        line = peer.line()
        want = " ".join((letter, rec.cid or "?", *expected)).encode()
        if line == want:
            return
        words = line.split()
        if len(words) >= 2 and words[0] == letter.encode() and words[1] != (rec.cid or "").encode():
            raise Wrong("cross-delivery", f"{rec.phase}: trailer {line[:120]!r}, wanted {want!r}")
        kind = "cross-delivery" if foreign_origin(line, "") else "corrupt"
        raise Wrong(kind, f"{rec.phase}: trailer {line[:120]!r}, wanted {want!r}")

    def _check(self, rec: ConnRecord, got: bytes, expected: bytes, tag: str) -> None:
        if got != expected:
            _, what = describe_mismatch(got, expected)
            kind = "cross-delivery" if foreign_origin(got, tag) else "corrupt"
            raise Wrong(kind, f"{rec.phase}: {what}")

    def _scenario(self, rng: random.Random, rec: ConnRecord, peer: Peer) -> None:
        scenario, cid = rec.scenario, rec.cid
        k = 0

        def op(name: str) -> str:
            nonlocal k
            k += 1
            rec.phase = name
            return str(k)

        def echo(size: int) -> None:
            n = op("echo")
            payload = pattern(f"{rec.token}.{n}", size)
            peer.send(f"ECHO {size} {n}\n".encode() + payload)
            rec.up += size
            got = peer.exact(size)
            self._check(rec, got, payload, f"{rec.token}.{n}")
            rec.down += size
            self._trailer(peer, rec, "E", sha(payload))

        def stream(size: int, cmd: str = "STREAM", piece: int = 65536, delay: float = 0.0) -> None:
            seed = op(cmd.lower())
            peer.send(f"{cmd} {size} {seed}\n".encode())
            tag = f"{cid}/{seed}"
            expected = pattern(tag, size)
            got = peer.exact(size, piece, delay)
            self._check(rec, got, expected, tag)
            rec.down += size
            self._trailer(peer, rec, "S", sha(expected))

        def upload(size: int, cmd: str = "UPLOAD", piece: int = 0, delay: float = 0.0) -> None:
            n = op(cmd.lower())
            payload = pattern(f"{rec.token}.{n}", size)
            peer.send(f"{cmd} {size} {n}\n".encode())
            peer.send(payload, piece, delay)
            rec.up += size
            self._trailer(peer, rec, "U", sha(payload))

        def ping() -> None:
            op("ping")
            peer.send(b"PING\n")
            self._trailer(peer, rec, "P")

        def reset() -> None:
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.sock.close()

        def expect_eof() -> None:
            rec.phase += "+eof"
            rest, how = peer.until_end()
            if rest:
                kind = "cross-delivery" if foreign_origin(rest, "") else "corrupt"
                raise Wrong(kind, f"{rec.phase}: unexpected bytes {rest[:100]!r}")
            if how != "EOF":
                raise Broken(how)

        biggest = self.config.max_stream
        rec.expect_report = "EOF"
        if scenario == "short":
            for _ in range(rng.randint(1, 3)):
                echo(rng.choice([16, 100, 1000, 4096, 16384]))
        elif scenario == "stream":
            stream(_sizes(rng, biggest))
        elif scenario == "upload":
            upload(_sizes(rng, biggest))
        elif scenario == "halfclose":
            if rng.random() < 0.5:
                echo(rng.choice([100, 4096]))
            size = rng.choice([0, 100, 65536, 300000])
            n = op("halfclose")
            payload = pattern(f"{rec.token}.{n}", size)
            peer.send(f"HALFCLOSE {size} {n}\n".encode() + payload)
            rec.up += size
            peer.shutdown_write()
            self._trailer(peer, rec, "F", str(size), sha(payload))
            expect_eof()
            rec.expect_report = "HALF"
        elif scenario == "client-rst-upload":
            size = _sizes(rng, biggest)
            n = op("upload-then-client-rst")
            payload = pattern(f"{rec.token}.{n}", size)
            peer.send(f"UPLOAD {size} {n}\n".encode())
            peer.send(payload[: rng.randrange(1, size // 2)])
            time.sleep(rng.uniform(0, 0.05))
            rec.expect_report = "RST"
            reset()
        elif scenario == "client-rst-idle":
            ping()
            time.sleep(rng.uniform(0, 0.3))
            rec.expect_report = "RST"
            reset()
        elif scenario == "backend-rst":
            size = rng.choice([0, 1000, 65536, 1 << 20])
            seed = op("rst-after")
            peer.send(f"RST_AFTER {size} {seed}\n".encode())
            rec.expect_report = "RSTSENT"
            got, how = peer.until_end()
            tag = f"{cid}/{seed}"
            self._check(rec, got, pattern(tag, size)[: len(got)], tag)
            if len(got) > size:
                raise Wrong("corrupt", f"rst-after: {len(got)} bytes of {size}")
            rec.down += len(got)
            if how == "EOF":
                rec.outcome = "rst-as-eof"
                rec.detail = f"backend reset after {size} bytes; client read {len(got)} and EOF"
            elif how != "RST":
                raise Broken(how, got)
        elif scenario == "bye":
            if rng.random() < 0.5:
                echo(rng.choice([100, 4096]))
            op("bye")
            peer.send(b"BYE\n")
            self._trailer(peer, rec, "B")
            expect_eof()
            rec.expect_report = "BYE"
        elif scenario == "slow-reader":
            stream(rng.choice([262144, MiB]), piece=8192, delay=0.002)
        elif scenario == "slow-writer":
            upload(rng.choice([65536, 262144]), piece=4096, delay=0.004)
        elif scenario == "backend-slow":
            stream(rng.choice([8192, 32768]), cmd="SLOW")
        elif scenario == "backend-slowread":
            upload(rng.choice([262144, MiB]), cmd="SLOWREAD")
        elif scenario == "idle":
            ping()
            remaining = self.deadline - time.monotonic()
            time.sleep(max(0.0, min(rng.uniform(2, 12), remaining)))
            ping()
            echo(rng.choice([100, 4096, 65536]))
            if rng.random() < 0.3:
                rec.expect_report = "RST"
                reset()
        elif scenario == "canary":
            ping()
        else:
            raise AssertionError(scenario)

    # -- workers -----------------------------------------------------------------------------
    deadline = 0.0

    def tcp_worker(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        names, weights = list(SCENARIOS), list(SCENARIOS.values())
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            scenario = rng.choices(names, weights)[0]
            rec = self.connection(rng, scenario, rng.choice(TCP_SERVICES))
            self.add(rec)
            if rec.outcome == "refused":
                self.stop.wait(0.05)

    def idle_worker(self, index: int) -> None:
        rng = random.Random(self.config.seed * 2000 + index)
        while not self.stop.is_set() and time.monotonic() < self.deadline - 1:
            rec = self.connection(rng, "idle", rng.choice(TCP_SERVICES))
            self.add(rec)
            if rec.outcome != "ok":
                self.stop.wait(0.1)

    def canary(self) -> None:
        """Every 0.2 s a connection to the unchurned canary Service; its latency above
        0.25 s is taken as a loop stall (the Timeline's stalls)."""
        rng = random.Random(self.config.seed)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            rec = self.connection(rng, "canary", "canary")
            self.add(rec)
            elapsed = rec.t_end - rec.t0
            if elapsed > 0.25:
                with self.timeline.lock:
                    self.timeline.stalls.append((rec.t0, rec.t_end))
            self.stop.wait(max(0.0, 0.2 - elapsed))

    def udp_worker(self, index: int) -> None:
        rng = random.Random(self.config.seed * 3000 + index)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            svc = rng.choice(UDP_SERVICES)
            state = self.timeline.current(svc)
            address = (self.plan.service_ip[svc], state.port)
            sent: dict[str, UdpRecord] = {}
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for _ in range(rng.randint(1, 12)):
                    if time.monotonic() >= self.deadline:
                        break
                    rec = UdpRecord(svc, state.port, self.token("u"), time.monotonic())
                    payload = pattern(rec.token, rng.choice([20, 200, 1200, 8000]))
                    rec.digest = sha(payload)
                    sent[rec.token] = rec
                    with self.lock:
                        self.udp.append(rec)
                    try:
                        sock.sendto(rec.token.encode() + b" " + payload, address)
                    except OSError as exc:
                        rec.outcome, rec.detail = "send-error", str(exc)
                        continue
                    self._udp_replies(sock, sent, rec, 2.0)
                    time.sleep(rng.uniform(0.01, 0.05))
                # Late replies to what timed out.
                if any(r.outcome == "pending" for r in sent.values()):
                    self._udp_replies(sock, sent, None, 0.5)
            for rec in sent.values():
                if rec.outcome == "pending":
                    rec.outcome = "lost"

    def _udp_replies(
        self, sock: socket.socket, sent: dict[str, UdpRecord], want: UdpRecord | None, wait: float
    ) -> None:
        end = time.monotonic() + wait
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65535)
            except TimeoutError:
                return
            except OSError:
                # ICMP port unreachable from an earlier datagram (a connected session).
                continue
            words = data.split()
            token = words[1].decode(errors="replace") if len(words) == 3 else ""
            rec = sent.get(token)
            if rec is None:
                bad = UdpRecord(want.service if want else "?", 0, token, time.monotonic())
                bad.outcome, bad.detail = "cross-delivery", f"reply {data[:100]!r}"
                with self.lock:
                    self.udp.append(bad)
                continue
            backend = words[0].decode(errors="replace")
            rec.backend = backend
            if self.plan.service_of(backend) != rec.service:
                rec.outcome, rec.detail = "cross-delivery", f"reply {data[:100]!r}"
            elif words[2].decode() != rec.digest:
                rec.outcome, rec.detail = "corrupt", f"reply {data[:100]!r}"
            elif rec.outcome == "pending":
                rec.outcome = "ok" if rec is want else "late"
            rec.t_end = time.monotonic()
            if rec is want:
                return


@dataclass
class UdpRecord:
    service: str
    port: int
    token: str
    t0: float
    t_end: float = 0.0
    digest: str = ""
    backend: str = ""
    outcome: str = "pending"
    detail: str = ""


# -- churn ----------------------------------------------------------------------------------
class Churn:
    def __init__(
        self,
        config: SoakConfig,
        plan: Plan,
        timeline: Timeline,
        backends: Backends,
        manifests: Path,
    ) -> None:
        self.config = config
        self.plan = plan
        self.timeline = timeline
        self.backends = backends
        self.manifests = manifests
        self.rng = random.Random(config.seed)
        self.filler: list[str] = []
        self.stop = threading.Event()
        self.burner: subprocess.Popen[bytes] | None = None

    def initial(self, svc: str) -> SvcState:
        conds = tuple((name, "ready") for name in self.plan.backends[svc])
        return SvcState(True, SERVICE_PORTS[0], TARGET_PORTS[0], conds)

    def write(self, svc: str, state: SvcState) -> None:
        path = self.manifests / f"svc-{svc}.json"
        with self.timeline.lock:
            previous = self.timeline.states[svc][-1][1] if self.timeline.states[svc] else None
        if state.exists:
            atomic_write(path, json.dumps(service_manifest(self.plan, svc, state)))
        else:
            path.unlink(missing_ok=True)
        now = time.monotonic()
        with self.timeline.lock:
            self.timeline.states[svc].append((now, state))
            if (
                previous is not None
                and previous.exists
                and (not state.exists or state.port != previous.port)
            ):
                self.timeline.removals.append((now, svc, previous.port))
        self.timeline.events["manifest writes"] += 1

    def write_initial(self) -> None:
        for svc, _, _ in SERVICES:
            self.write(svc, self.initial(svc))

    def restore(self) -> None:
        """Every Service back to its first state (all ready), the filler removed."""
        (self.manifests / "filler.json").unlink(missing_ok=True)
        for svc, _, _ in SERVICES:
            if self.timeline.current(svc) != self.initial(svc):
                self.write(svc, self.initial(svc))

    def prepare_filler(self) -> None:
        biggest = int(self.config.filler_mb[1] * MiB)
        count = biggest // 430 + 1
        self.filler = filler_items(self.plan, count)

    def run(self, deadline: float) -> None:
        rng, config = self.rng, self.config
        start = time.monotonic()
        next_kill = start + rng.uniform(*config.kill_interval)
        next_stall = start + min(config.stall_every * 0.4, 8.0)
        filler_until: float | None = None
        filler_rewrite: float | None = None
        filler_count = 0
        recreate: dict[str, float] = {}
        burn = config.burn
        burn_from = start + (burn[0] * config.seconds if burn else 1e18)
        burn_to = start + (burn[1] * config.seconds if burn else 0)
        churned = [svc for svc, _, _ in SERVICES if svc != "canary"]
        while not self.stop.wait(rng.uniform(*config.churn_interval)):
            now = time.monotonic()
            if now >= deadline:
                break
            for svc, when in list(recreate.items()):
                if now >= when:
                    del recreate[svc]
                    self.write(svc, replace(self.timeline.current(svc), exists=True))
                    self.timeline.events["services recreated"] += 1
            if filler_until is not None and now >= filler_until:
                (self.manifests / "filler.json").unlink(missing_ok=True)
                with self.timeline.lock:
                    self.timeline.filler_removals.append(time.monotonic())
                filler_until = None
            elif filler_rewrite is not None and now >= filler_rewrite:
                # Every filler Service changed: another long diff and sync on the loop.
                self.write_filler(filler_count, "rewritten")
                filler_rewrite = None
            if self.burner is None and burn_from <= now < burn_to:
                self.start_burner(burn_to - now)
            svc = rng.choice([s for s in churned if s not in recreate])
            self.churn_one(svc, recreate)
            if now >= next_kill:
                next_kill = now + rng.uniform(*config.kill_interval)
                victims = [
                    name
                    for svc in churned
                    for name in self.plan.backends[svc]
                    if self.backends.alive(name)
                ]
                if victims:
                    victim = rng.choice(victims)
                    self.backends.kill(victim)
                    self.backends.restart_later(victim, rng.uniform(0.2, 1.5))
                    self.timeline.events["backends SIGKILLed"] += 1
            if now >= next_stall and filler_until is None and self.filler:
                next_stall = now + config.stall_every
                size = rng.uniform(*config.filler_mb) * MiB
                filler_count = min(len(self.filler), int(size / 430))
                t = time.monotonic()
                self.write_filler(filler_count, "written")
                filler_until = t + rng.uniform(4, 8)
                filler_rewrite = t + rng.uniform(2, 3.5)
        (self.manifests / "filler.json").unlink(missing_ok=True)

    def write_filler(self, count: int, what: str) -> None:
        items = self.filler[:count]
        if what == "rewritten":
            items = [item.replace('"nobody"', '"somebody"') for item in items]
        text = '{"apiVersion":"v1","kind":"List","items":[' + ",".join(items) + "]}"
        t = time.monotonic()
        atomic_write(self.manifests / "filler.json", text)
        with self.timeline.lock:
            self.timeline.fillers.append((t, time.monotonic(), len(text)))
        self.timeline.events[f"big manifests {what} (loop stalls)"] += 1
        self.timeline.events["big manifest MiB"] += round(len(text) / MiB)

    def churn_one(self, svc: str, recreate: dict[str, float]) -> None:
        rng = self.rng
        state = self.timeline.current(svc)
        action = rng.choices(
            ["flip", "heal", "target", "port", "delete"], weights=[55, 12, 8, 3, 3]
        )[0]
        if action == "flip":
            name = rng.choice(self.plan.backends[svc])
            cond = rng.choice(("ready", "ready", "ready", "notready", "terminating", "absent"))
            conds = tuple((n, cond if n == name else c) for n, c in state.conds)
            self.write(svc, replace(state, conds=conds))
            self.timeline.events[f"endpoints set {cond}"] += 1
        elif action == "heal":
            self.write(svc, replace(state, conds=tuple((n, "ready") for n, _ in state.conds)))
            self.timeline.events["services healed (all ready)"] += 1
        elif action == "target":
            target = TARGET_PORTS[1 - TARGET_PORTS.index(state.target)]
            self.write(svc, replace(state, target=target))
            self.timeline.events["target ports changed"] += 1
        elif action == "port":
            port = SERVICE_PORTS[1 - SERVICE_PORTS.index(state.port)]
            self.write(svc, replace(state, port=port))
            self.timeline.events["service ports changed"] += 1
        else:
            self.write(svc, replace(state, exists=False))
            recreate[svc] = time.monotonic() + rng.uniform(0.5, 3.0)
            self.timeline.events["services deleted"] += 1

    def start_burner(self, seconds: float) -> None:
        code = (
            f"import time\nend = time.monotonic() + {seconds:.1f}\n"
            "while time.monotonic() < end: pass"
        )
        self.burner = subprocess.Popen([sys.executable, "-c", code])
        self.timeline.events["CPU burner seconds"] += round(seconds)

    def stop_burner(self) -> None:
        if self.burner is not None and self.burner.poll() is None:
            self.burner.kill()
        if self.burner is not None:
            self.burner.wait()


# -- classification -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BackendReport:
    token: str
    name: str
    cid: str
    how: str
    state: str


def read_reports(directory: Path) -> list[BackendReport]:
    reports = []
    for path in sorted(directory.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            words = line.split(" ", 5)
            if len(words) >= 5 and words[0] == "R":
                state = words[5] if len(words) > 5 else ""
                reports.append(BackendReport(words[1], words[2], words[3], words[4], state))
    return reports


class Classifier:
    """Turns raw outcomes into categories, using the Timeline to attribute causes."""

    def __init__(self, plan: Plan, timeline: Timeline, grace: float) -> None:
        self.plan = plan
        self.tl = timeline
        self.grace = grace

    def _listener_gone(self, svc: str, port: int, t1: float, t2: float) -> bool:
        return any(
            not s.exists or s.port != port or not s.usable()
            for s in self.tl.states_between(svc, t1, t2)
        )

    def _drained(self, svc: str, port: int, t0: float, t_err: float) -> bool:
        """The connection's listener was removed and the reset came after the grace."""
        lag = self.tl.lag(t0)
        with self.tl.lock:
            removals = list(self.tl.removals)
        return any(
            s == svc and p == port and t0 - lag <= t <= t_err - self.grace + SLACK
            for t, s, p in removals
        )

    def _endpoint_drained(self, svc: str, backend: str, t0: float, t_err: float) -> bool:
        """The backend left the usable set and stayed out for the whole grace before the
        reset (what a proxy that drains removed endpoints would do)."""
        with self.tl.lock:
            history = list(self.tl.states[svc])
        for i, (t, state) in enumerate(history):
            if not (t0 - self.tl.lag(t0) <= t <= t_err - self.grace + SLACK):
                continue
            if backend in state.usable():
                continue
            later = [s for tt, s in history[i + 1 :] if tt <= t_err - self.grace + SLACK]
            if all(backend not in s.usable() for s in later):
                return True
        return False

    def _dial_exhaustible(self, svc: str, t0: float, t_err: float) -> bool:
        """Could every endpoint the dialer tried have been down (or at least 4 of them)?"""
        for state in self.tl.states_between(svc, t0 - self.tl.lag(t0), t_err):
            usable = state.usable()
            dead = {n for n in usable if self.tl.dead(n, t0 - SLACK, t_err)}
            if usable and (dead == usable or len(dead) >= 4):
                return True
        return False

    def _pid_killed(self, pid: int | None, t_err: float) -> bool:
        found = self.tl.instance(pid) if pid is not None else None
        killed = found[1].killed if found is not None else None
        return killed is not None and killed <= t_err + SLACK

    def connection(self, rec: ConnRecord) -> tuple[str, bool]:
        """(category, failure) from the client's view alone."""
        svc, t0, t_end = rec.service, rec.t0, rec.t_end
        lag = self.tl.lag(t0)
        if rec.outcome == "ok":
            return "ok", False
        if rec.outcome == "refused":
            if self._listener_gone(svc, rec.port, t0 - lag, t_end + SLACK):
                return "refused: no listener (deleted/moved/no usable endpoint)", False
            return "refused-unexplained", True
        if rec.outcome == "connect-timeout":
            return "connect-timeout", True
        if rec.outcome == "wrong":
            return rec.wrong_kind, True
        if rec.outcome == "rst-as-eof":
            if self._pid_killed(rec.pid, t_end):
                return "EOF: backend SIGKILLed", False
            return "backend-rst-as-eof", True
        # broken
        how = {"RST": "reset", "EOF": "eof", "TIMEOUT": "timeout", "EPIPE": "reset"}.get(
            rec.how, rec.how.lower()
        )
        if rec.backend is None:  # before the greeting
            names = self.plan.backends[svc]
            if how == "reset":
                if self._listener_gone(svc, rec.port, t0 - lag, t_end + SLACK):
                    return "reset before greeting: listener closed/removed", False
                if self._dial_exhaustible(svc, t0, t_end):
                    return "reset before greeting: every endpoint tried was down", False
                if self._drained(svc, rec.port, t0, t_end):
                    return "reset before greeting: drained after Service removal", False
            if how in ("reset", "eof") and self.tl.killed_in(svc, t0 - SLACK, t_end + SLACK, names):
                return f"{how} before greeting: a backend was SIGKILLed", False
            return f"{how}-unexplained before greeting", True
        if self._pid_killed(rec.pid, t_end):
            return f"{how}: backend SIGKILLed", False
        if how == "reset":
            if self._drained(svc, rec.port, t0, t_end):
                return "reset: drained after Service removal", False
            if self._endpoint_drained(svc, rec.backend, t0, t_end):
                return "reset: drained after endpoint removal", False
        return f"{how}-unexplained during {rec.phase}", True

    def with_report(
        self, rec: ConnRecord, category: str, failure: bool, reports: list[BackendReport]
    ) -> tuple[str, bool, str]:
        """Refine with what the backend saw: (category, failure, note)."""
        note = "; ".join(f"backend {r.name} {r.cid}: {r.how} {r.state}" for r in reports)
        bad = [r for r in reports if r.how == "BAD"]
        if bad:
            return "cross-delivery (seen by the backend)", True, note
        if rec.cid is not None and any(r.cid != rec.cid for r in reports):
            return "cross-delivery (token reached another connection)", True, note
        if failure or rec.outcome != "ok":
            return category, failure, note
        want = rec.expect_report
        killed_later = self._pid_killed(rec.pid, time.monotonic())
        if not reports:
            if killed_later:
                return "ok (backend SIGKILLed before it saw the end)", False, note
            if want == "RST":
                return "client-rst-unreported (backend connection left open)", True, note
            return "backend connection left open after the client finished", True, note
        how = reports[0].how
        if want == "RST":
            if how in ("RST", "EPIPE"):
                return "ok (client RST reached the backend as RST)", False, note
            if how == "EOF":
                return "client-rst-as-eof", True, note
        elif want == "EOF":
            if how == "EOF":
                return category, False, note
            if how == "RST" and self._drained(rec.service, rec.port, rec.t0, rec.t_end + 5):
                return "ok (backend reset by a drain after the client left)", False, note
            if how == "RST":
                return "client-fin-as-rst", True, note
        elif want == how:
            if want == "RSTSENT":
                return "ok (backend RST reached the client as RST)", False, note
            return category, False, note
        return f"backend saw {how}, expected {want}", True, note

    def udp(self, rec: UdpRecord) -> tuple[str, bool]:
        if rec.outcome in ("ok", "late"):
            return rec.outcome, False
        if rec.outcome in ("cross-delivery", "corrupt"):
            return f"udp {rec.outcome}", True
        # lost or send-error
        t1, t2 = rec.t0 - self.tl.lag(rec.t0), rec.t0 + 2.5
        states = self.tl.states_between(rec.service, t1, t2)
        if any(not s.exists or s.port != rec.port for s in states) or any(
            a.target != b.target or a.usable() - b.usable() for a, b in itertools.pairwise(states)
        ):
            return f"{rec.outcome}: endpoint or Service removed meanwhile", False
        names = self.plan.backends[rec.service]
        if any(self.tl.dead(n, rec.t0 - 1, t2) for n in names):
            return f"{rec.outcome}: a backend was down", False
        if self.tl.stall_time(rec.t0, t2) > 0:
            return f"{rec.outcome}: loop stall", False
        return f"udp {rec.outcome} unexplained", True


# -- the run --------------------------------------------------------------------------------
@dataclass
class SoakReport:
    config: SoakConfig
    seconds: float = 0.0
    connections: Counter[str] = field(default_factory=Counter)
    scenarios: Counter[str] = field(default_factory=Counter)
    udp: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    bytes_up: int = 0
    bytes_down: int = 0
    stalls: list[float] = field(default_factory=list)
    big_reloads: list[float] = field(default_factory=list)
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    fds: tuple[int, int, int] = (0, 0, 0)  # baseline, peak, end
    sockets: tuple[Counter[str], Counter[str]] = field(
        default_factory=lambda: (Counter(), Counter())
    )
    settle_seconds: float = 0.0
    rss: tuple[float, float, float] = (0.0, 0.0, 0.0)
    log_errors: list[str] = field(default_factory=list)
    log_warnings: Counter[str] = field(default_factory=Counter)
    unmatched_reports: Counter[str] = field(default_factory=Counter)
    exit_code: int | None = None
    workdir: Path | None = None

    def fail(self, category: str, example: str) -> None:
        self.failures[category].append(example)

    def render(self) -> str:
        out = [
            f"soak: loop={self.config.loop} relay={self.config.relay}"
            f" seconds={self.seconds:.0f} seed={self.config.seed}"
            f" workdir={self.workdir}",
            "",
            f"{'TCP connections by outcome':<66}{'count':>8}",
        ]
        failing = set(self.failures)
        for category, count in sorted(self.connections.items(), key=lambda kv: -kv[1]):
            mark = "  FAIL" if category in failing else ""
            out.append(f"  {category:<64}{count:>8}{mark}")
        out.append(f"  {'total':<64}{sum(self.connections.values()):>8}")
        out.append(
            "  scenarios: " + ", ".join(f"{k} {v}" for k, v in sorted(self.scenarios.items()))
        )
        out.append(
            f"  bytes verified (SHA-256 and tags): up {self.bytes_up / MiB:.1f} MiB,"
            f" down {self.bytes_down / MiB:.1f} MiB;"
            f" greeting latency p50 {self.latency_p50 * 1000:.1f} ms"
            f" p99 {self.latency_p99 * 1000:.0f} ms"
        )
        out.append(f"{'UDP requests by outcome':<66}{'count':>8}")
        for category, count in sorted(self.udp.items(), key=lambda kv: -kv[1]):
            mark = "  FAIL" if category in failing else ""
            out.append(f"  {category:<64}{count:>8}{mark}")
        out.append("churn events")
        for name, count in sorted(self.events.items()):
            out.append(f"  {name:<64}{count:>8}")
        if self.stalls:
            out.append(
                f"  loop stalls seen by the canary (>250 ms): {len(self.stalls)},"
                f" max {max(self.stalls):.2f} s, total {sum(self.stalls):.1f} s"
            )
        if self.big_reloads:
            out.append(
                f"  big manifests taken in (written or removed -> applied): "
                f"{len(self.big_reloads)}, max {max(self.big_reloads):.1f} s,"
                f" mean {sum(self.big_reloads) / len(self.big_reloads):.1f} s"
            )
        base, end = self.sockets
        out += [
            "proxy",
            f"  open fds: baseline {self.fds[0]}, peak {self.fds[1]}, end {self.fds[2]}"
            f" (settled in {self.settle_seconds:.1f} s)",
            f"  sockets: baseline {dict(sorted(base.items()))}, end {dict(sorted(end.items()))}",
            f"  RSS MiB: baseline {self.rss[0]:.0f}, peak {self.rss[1]:.0f}, end {self.rss[2]:.0f}",
            f"  exit code after SIGTERM: {self.exit_code}",
            f"  log: {len(self.log_errors)} error lines;"
            f" warnings: {dict(self.log_warnings.most_common(6))}",
        ]
        if self.unmatched_reports:
            unmatched = dict(self.unmatched_reports)
            out.append(f"  backend connections without a client token: {unmatched}")
        if self.failures:
            out.append("")
            out.append(f"FAILURES ({sum(len(v) for v in self.failures.values())})")
            for category, examples in sorted(self.failures.items()):
                out.append(f"  {category}: {len(examples)}")
                for example in examples[:4]:
                    out.append(f"    - {example}")
        else:
            out.append("")
            out.append("no failures")
        return "\n".join(out)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _proxy(
    config: SoakConfig, manifests: Path, log_path: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    args = ["run", "--manifests", str(manifests), "--loop", config.loop,
            "--hostname-override", "soak-node", "--log-level", "info",
            "--min-sync-period", str(config.min_sync_period),
            "--shutdown-grace", str(config.grace), "--udp-idle-timeout", "2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "USERPROXY_PURE_PYTHON"}
    if config.relay == "python":
        env["USERPROXY_PURE_PYTHON"] = "1"
    return proxy_process(
        args, config.proxy_src or ROOT, env=env, log=log_path, stop_within=config.grace + 15
    )


LOG_ERROR_MARKERS = ("Traceback", " ERROR ", " CRITICAL ", "Exception in callback",
                     "Fatal Python error", "double free", "Error on reading")  # fmt: skip


_STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def scan_log(text: str, report: SoakReport) -> None:
    """Error entries (a stamped line with its continuation lines, shown as first and
    last line) into ``log_errors``; warnings counted by message shape."""
    entry: list[str] = []

    def flush() -> None:
        joined = "\n".join(entry)
        if entry and any(marker in joined for marker in LOG_ERROR_MARKERS):
            shown = entry[0] if len(entry) == 1 else f"{entry[0]} ... {entry[-1]}"
            report.log_errors.append(shown[:400])
        entry.clear()

    for line in text.splitlines():
        if _STAMPED.match(line):
            flush()
            if " WARNING " in line:
                message = line.split(": ", 1)[-1]
                report.log_warnings[re.sub(r"[\d.:]+", "#", message)[:70]] += 1
        entry.append(line)
    flush()


def run_soak(config: SoakConfig) -> SoakReport:
    report = SoakReport(config, workdir=config.workdir)
    say = config.log
    manifests = config.workdir / "manifests"
    reports_dir = config.workdir / "reports"
    manifests.mkdir(parents=True, exist_ok=True)
    reports_dir.mkdir(exist_ok=True)
    log_path = config.workdir / "proxy.log"
    # The proxy's log stamps local wall-clock time; the timeline is monotonic.
    wall_offset = time.time() - time.monotonic()
    plan = Plan(config.seed)
    timeline = Timeline()
    backends = Backends(plan, timeline, reports_dir)
    churn = Churn(config, plan, timeline, backends, manifests)
    clients = Clients(config, plan, timeline)
    classifier = Classifier(plan, timeline, config.grace)
    threads: list[threading.Thread] = []
    samples: list[tuple[float, int]] = []
    try:
        say(f"soak: backends on 127.{plan.a}.{plan.b}.0/24, starting")
        backends.start_all()
        churn.write_initial()
        churn.prepare_filler()
        with _proxy(config, manifests, log_path) as proxy:
            _warm_up(clients, plan)
            time.sleep(3.5)  # warm-up UDP sessions expire (--udp-idle-timeout 2)
            base_fds, base_sockets = open_fds(proxy.pid), proxy_sockets(proxy.pid)
            base_rss = rss_mib(proxy.pid)
            say(
                f"soak: baseline {base_fds} fds, {dict(base_sockets)};"
                f" running {config.seconds:.0f} s"
            )
            started = time.monotonic()
            clients.deadline = started + config.seconds
            monitor_stop = threading.Event()

            def monitor() -> None:
                while not monitor_stop.wait(0.5):
                    if proxy.poll() is not None:
                        clients.stop.set()
                        churn.stop.set()
                        return
                    samples.append((rss_mib(proxy.pid), open_fds(proxy.pid)))

            threads = [
                threading.Thread(target=monitor, daemon=True),
                threading.Thread(target=clients.canary, daemon=True),
            ]
            for count, worker in (
                (config.tcp_workers, clients.tcp_worker),
                (config.idle_workers, clients.idle_worker),
                (config.udp_workers, clients.udp_worker),
            ):
                threads += [
                    threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)
                ]
            churner = threading.Thread(target=churn.run, args=(clients.deadline,), daemon=True)
            for thread in (*threads, churner):
                thread.start()
            churner.join(timeout=config.seconds + 60)
            for thread in threads[1:]:
                thread.join(timeout=max(1.0, clients.deadline + 3 * IO_TIMEOUT - time.monotonic()))
            clients.stop.set()
            report.seconds = time.monotonic() - started
            churn.stop.set()
            churn.stop_burner()
            for thread in backends.threads:
                thread.join(timeout=15)
            churn.restore()
            for names in plan.backends.values():
                for backend in names:
                    if not backends.alive(backend):
                        backends.start(backend)
            # Serving again once the restored manifests are applied (after the big one's
            # removal, which can take seconds)?
            restored = time.monotonic()
            for svc in (*TCP_SERVICES, "canary"):
                while proxy.poll() is None:
                    final = clients.connection(random.Random(0), "short", svc)
                    if final.outcome == "ok":
                        break
                    if time.monotonic() - restored > 30:
                        report.fail(
                            "not serving 30 s after the manifests were restored",
                            f"{svc}: {final.outcome} {final.how} {final.detail}",
                        )
                        break
                    time.sleep(0.2)
            # Back to the baseline?  Connections of removed listeners may wait out the grace.
            settle_from = time.monotonic()
            end_fds, end_sockets = -1, Counter[str]()
            while time.monotonic() - settle_from < 10 + config.grace and proxy.poll() is None:
                end_fds, end_sockets = open_fds(proxy.pid), proxy_sockets(proxy.pid)
                if end_fds <= base_fds and end_sockets == base_sockets:
                    break
                time.sleep(0.2)
            report.settle_seconds = time.monotonic() - settle_from
            monitor_stop.set()
            threads[0].join(timeout=5)
            alive = proxy.poll() is None
            report.fds = (base_fds, max((f for _, f in samples), default=base_fds), end_fds)
            report.sockets = (base_sockets, end_sockets)
            end_rss = rss_mib(proxy.pid) if alive else 0.0
            report.rss = (base_rss, max((r for r, _ in samples), default=base_rss), end_rss)
            if not alive:
                report.fail("proxy died", f"exit code {proxy.returncode}")
            else:
                if end_fds > base_fds or end_sockets != base_sockets:
                    report.fail(
                        "proxy descriptors not back to the baseline",
                        f"fds {base_fds} -> {end_fds}; sockets {dict(base_sockets)} ->"
                        f" {dict(end_sockets)} after {report.settle_seconds:.1f} s",
                    )
                if report.rss[1] > RSS_LIMIT_MIB:
                    report.fail(f"RSS above {RSS_LIMIT_MIB} MiB", f"peak {report.rss[1]:.0f} MiB")
            time.sleep(1.0)  # the backends' last reports
        report.exit_code = proxy.returncode
    finally:
        clients.stop.set()
        churn.stop.set()
        churn.stop_burner()
        backends.stop_all()
    log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
    scan_log(log_text, report)
    timeline.note_big_reloads(log_text, wall_offset)
    if report.log_errors:
        for line in report.log_errors:
            report.fail("error lines in the proxy log", line)
    if report.exit_code not in (0, None):
        report.fail("proxy exit code", str(report.exit_code))
    _classify_all(report, clients, classifier, read_reports(reports_dir), timeline)
    return report


def _warm_up(clients: Clients, plan: Plan) -> None:
    """Wait until every Service answers (the proxy has synced), once each."""
    deadline = time.monotonic() + 30
    rng = random.Random(0)
    for svc, proto, _ in SERVICES:
        while True:
            if proto == "TCP":
                ok = clients.connection(rng, "canary", svc).outcome == "ok"
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(0.5)
                    try:
                        sock.sendto(b"warm x", (plan.service_ip[svc], SERVICE_PORTS[0]))
                        ok = b"warm" in sock.recv(1000)
                    except OSError:
                        ok = False
            if ok:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxy never served {svc}")
            time.sleep(0.1)


def _classify_all(
    report: SoakReport,
    clients: Clients,
    classifier: Classifier,
    reports: list[BackendReport],
    timeline: Timeline,
) -> None:
    by_token: dict[str, list[BackendReport]] = defaultdict(list)
    for r in reports:
        by_token[r.token].append(r)
    tokens = {rec.token for rec in clients.records}
    for token, rs in by_token.items():
        if token not in tokens:
            for r in rs:
                if r.how == "BAD":
                    report.fail(
                        "cross-delivery (seen by the backend)",
                        f"backend {r.name} {r.cid}: {r.how} {r.state}",
                    )
                    report.connections["cross-delivery (seen by the backend)"] += 1
                elif not token.startswith("c") or token == "-":
                    report.unmatched_reports[f"{r.how} {r.state.split(':')[0]}"] += 1
    latencies = []
    for rec in clients.records:
        category, failure = classifier.connection(rec)
        category, failure, note = classifier.with_report(
            rec, category, failure, by_token.get(rec.token, [])
        )
        report.connections[category] += 1
        report.scenarios[rec.scenario] += 1
        if rec.outcome == "ok" and not failure:
            report.bytes_up += rec.up
            report.bytes_down += rec.down
        if rec.latency:
            latencies.append(rec.latency)
        if failure:
            stall = timeline.stall_time(rec.t0 - 1, rec.t_end)
            report.fail(
                category,
                f"{rec.scenario} {rec.token} -> {rec.service}:{rec.port}"
                f" backend {rec.backend} {rec.cid}; {rec.outcome} {rec.how} in {rec.phase}"
                f" at +{rec.t_end - rec.t0:.2f}s (allowed lag {timeline.lag(rec.t0):.1f}s)"
                f"{rec.detail and ': ' + rec.detail}"
                f"{f'; loop stalled {stall:.1f}s meanwhile' if stall else ''}"
                f"{note and '; ' + note}",
            )
    report.latency_p50 = _percentile(latencies, 0.5)
    report.latency_p99 = _percentile(latencies, 0.99)
    for urec in clients.udp:
        category, failure = classifier.udp(urec)
        report.udp[category] += 1
        if failure:
            report.fail(
                category,
                f"{urec.token} -> {urec.service}:{urec.port} {urec.outcome} {urec.detail}",
            )
    with timeline.lock:
        report.events.update(timeline.events)
        report.stalls = [e - s for s, e in timeline.stalls]
        report.big_reloads = [e - s for s, e in timeline.big_reloads]
