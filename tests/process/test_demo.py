"""Acceptance of ``userproxy demo``: what its instructions promise, done from outside.

The demo binds fixed addresses (127.0.50.1:8080 and 127.0.60.1-3:9376), so these tests
must not run in parallel with each other (the suite runs serially).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.process.test_cli import wait_refused
from tests.support.proxyrun import proxy_process, wait_listening, wait_logged

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "demo"
PACKAGED = ROOT / "userproxy" / "demo_manifests"
SLICE_FILE = "web-endpoints.yaml"
HOST, PORT = "127.0.50.1", 8080


def get(conn: http.client.HTTPConnection) -> str:
    """GET / on ``conn``; returns the backend's name (``web-N``) from the body."""
    conn.request("GET", "/")
    response = conn.getresponse()
    body = response.read().decode()
    assert response.status == 200, (response.status, body)
    assert body.startswith("hello from web-"), body
    return body.split()[2]


def get_new() -> str:
    """One GET on a new connection."""
    conn = http.client.HTTPConnection(HOST, PORT, timeout=5)
    try:
        return get(conn)
    finally:
        conn.close()


def replace_slice(directory: Path, endpoints: list[Any]) -> float:
    """Rewrite the slice with ``endpoints``, atomically; returns the monotonic write time."""
    path = directory / SLICE_FILE
    document = yaml.safe_load(path.read_text())
    document["endpoints"] = endpoints
    tmp = directory / (SLICE_FILE + ".tmp")  # a suffix the proxy does not read
    tmp.write_text(yaml.safe_dump(document))
    os.replace(tmp, path)
    return time.monotonic()


def wait_answering(deadline: float) -> str:
    while True:
        try:
            return get_new()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def demo_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "demo"
    directory.mkdir()
    for source in EXAMPLES.glob("*.yaml"):
        shutil.copy(source, directory / source.name)
    return directory


@pytest.fixture
def demo_log(tmp_path: Path) -> Path:
    """Where the demo's output goes (a file, read while it runs)."""
    return tmp_path / "demo.log"


@pytest.fixture
def demo(demo_dir: Path, demo_log: Path) -> Iterator[subprocess.Popen[str]]:
    args = ["demo", "--manifests", str(demo_dir)]
    with proxy_process(args, cwd=demo_dir, log=demo_log) as proc:
        wait_listening((HOST, PORT), timeout=15)
        yield proc


def test_demo_follows_manifest_edits_survives_sighup_and_stops_on_sigint(
    demo_dir: Path, demo_log: Path, demo: subprocess.Popen[str]
) -> None:
    original = yaml.safe_load((demo_dir / SLICE_FILE).read_text())["endpoints"]

    # Balancing: new connections reach all three backends.
    seen = Counter(get_new() for _ in range(30))
    assert set(seen) == {"web-1", "web-2", "web-3"}, seen
    assert min(seen.values()) >= 5, seen

    # A keep-alive connection answered by web-1 stays open while web-1 turns not ready.
    kept: http.client.HTTPConnection | None = None
    others: list[http.client.HTTPConnection] = []
    try:
        for _ in range(20):
            conn = http.client.HTTPConnection(HOST, PORT, timeout=5)
            if get(conn) == "web-1":
                kept = conn
                break
            others.append(conn)
        assert kept is not None, "no connection reached web-1"

        not_ready = [
            dict(e, conditions={"ready": e["targetRef"]["name"] != "web-1"}) for e in original
        ]
        written = replace_slice(demo_dir, not_ready)
        time.sleep(max(0.0, written + 1.0 - time.monotonic()))
        seen = Counter(get_new() for _ in range(20))
        assert "web-1" not in seen, seen
        assert set(seen) == {"web-2", "web-3"}, seen
        assert get(kept) == "web-1"
        assert get(kept) == "web-1"
    finally:
        if kept is not None:
            kept.close()
        for conn in others:
            conn.close()

    # No endpoints: connections are refused.
    written = replace_slice(demo_dir, [])
    wait_refused((HOST, PORT), timeout=5)
    refused_after = time.monotonic() - written
    assert refused_after <= 1.0, refused_after
    with pytest.raises(ConnectionRefusedError):
        get_new()

    # Endpoints back: answers again.
    written = replace_slice(demo_dir, original)
    wait_answering(deadline=written + 5)
    assert time.monotonic() - written <= 2.0
    seen = Counter(get_new() for _ in range(9))
    assert set(seen) == {"web-1", "web-2", "web-3"}, seen

    # SIGHUP re-reads the manifests and ends nothing: still answering, the process alive.
    demo.send_signal(signal.SIGHUP)
    wait_logged(demo_log, "reloaded the settings")
    assert demo.poll() is None
    assert get_new() in {"web-1", "web-2", "web-3"}

    # Ctrl-C: a clean exit, after the instructions were printed.
    demo.send_signal(signal.SIGINT)
    assert demo.wait(timeout=15) == 0
    output = demo_log.read_text()
    assert f"{HOST}:{PORT}" in output, output
    assert "Press Ctrl-C to stop." in output, output
    assert str(demo_dir / SLICE_FILE) in output, output


def test_packaged_demo_manifests_match_the_examples() -> None:
    examples = {path.name: path.read_bytes() for path in EXAMPLES.glob("*.yaml")}
    packaged = {path.name: path.read_bytes() for path in PACKAGED.glob("*.yaml")}
    assert examples, EXAMPLES
    assert sorted(packaged) == sorted(examples)
    for name, content in examples.items():
        assert packaged[name] == content, f"userproxy/demo_manifests/{name} differs from examples"
