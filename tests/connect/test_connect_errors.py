"""``userproxy connect`` given bad input: one clear line and exit 2 at start, never a
traceback; at run time a per-Service (per-pod) warning while the other Services keep
working.  Through the real CLI, against the fake API server (tests/connect/cluster.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.connect.cluster import (
    POD_NET,
    REPO,
    FakeCluster,
    _env,
    connect_process,
    fake_cluster,
    pod_endpoint,
)
from tests.support.manifests import endpoint_slice, service
from tests.support.proxyrun import assert_clean_log, free_port, wait_logged

pytestmark = pytest.mark.timeout(120)


def _connect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "userproxy", "connect", *args],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _kubeconfig_with(path: Path, server: str, **context: str) -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u", **context}}],
        "current-context": "dev",
    }  # fmt: skip
    path.write_text(json.dumps(config))
    return path


#: (id, extra arguments given the kubeconfig of a running fake API server and tmp_path,
#: what the one line says)
CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("no-such-context", lambda k, _t: ["--kubeconfig", str(k), "--context", "prod"],
     "context 'prod' is not among its contexts ['dev']"),
    ("no-such-namespace", lambda k, _t: ["--kubeconfig", str(k), "-n", "nope"],
     "namespace 'nope' does not exist (kubectl get namespaces lists them)"),
    ("invalid-namespace", lambda k, _t: ["--kubeconfig", str(k), "-n", "Bad_Name"],
     "--namespace: 'Bad_Name' is not a namespace name"),
    ("bad-selector", lambda k, _t: ["--kubeconfig", str(k), "-l", "app in (x"],
     "--selector: the API server rejected 'app in (x'"),
    ("dns-not-an-address", lambda k, _t: ["--kubeconfig", str(k), "--dns", "localhost"],
     "--dns: 'localhost' is not ADDR:PORT"),
    ("dns-not-loopback", lambda k, _t: ["--kubeconfig", str(k), "--dns", "192.0.2.1:53"],
     "--dns: 192.0.2.1 is not a loopback address"),
    ("broken-hosts-block", lambda k, t: ["--kubeconfig", str(k), "--hosts-file", str(t / "h")],
     "the userproxy block is not terminated"),
    ("missing-kubeconfig", lambda _k, t: ["--kubeconfig", str(t / "none")],
     "--kubeconfig"),
]  # fmt: skip


async def test_bad_input_at_start_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Every case of ``CASES`` through the real CLI (side by side: each is a process that
    starts and ends): exit 2, the cause in one line on stderr, no traceback."""
    (tmp_path / "h").write_text(
        "# BEGIN userproxy connect (managed by userproxy: edits here are lost)\n"
    )
    async with fake_cluster() as cluster:
        kubeconfig = _kubeconfig_with(tmp_path / "kubeconfig", cluster.api.url)
        results = await asyncio.gather(
            *(asyncio.to_thread(_connect, *args(kubeconfig, tmp_path)) for _, args, _ in CASES)
        )
    for (case, _, says), result in zip(CASES, results, strict=True):
        output = result.stdout + result.stderr
        assert result.returncode == 2, (case, output)
        assert "Traceback" not in output, case
        assert says in result.stderr, (case, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (case, result.stderr)


def test_an_unreachable_api_server_is_one_line_and_exit_2(tmp_path: Path) -> None:
    kubeconfig = _kubeconfig_with(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}")
    result = _connect("--kubeconfig", str(kubeconfig))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "cannot reach the API server at http://127.0.0.1:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _add_broken_services(cluster: FakeCluster) -> None:
    """``ghost``: its pod is unknown to the API server (the port-forward is refused with
    404); ``closed``: its pod is known, its port listens nowhere (the kubelet's error
    channel speaks); ``web`` gets an endpoint without a pod besides its pods."""
    api = cluster.api
    api.create("services", service("ghost", "10.96.0.20", {"tcp": 81}))
    api.create(
        "endpointslices",
        endpoint_slice(
            "ghost-x", "ghost", {"tcp": 8080}, endpoints=[pod_endpoint(f"{POD_NET}.20", "ghost-0")]
        ),
    )
    cluster.add_pod("closed-0", 21)
    api.create("services", service("closed", "10.96.0.21", {"tcp": 82}))
    api.create(
        "endpointslices",
        endpoint_slice(
            "closed-x",
            "closed",
            {"tcp": 8999},
            endpoints=[pod_endpoint(f"{POD_NET}.21", "closed-0")],
        ),
    )
    cluster.set_web(1, 2, podless=[7])  # fmt: skip


def _outcome(address: tuple[str, int]) -> str:
    """How a request on a new connection ends: the answer, "reset" or "eof"."""
    try:
        with socket.create_connection(address, timeout=15) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while data := sock.recv(4096):
                reply += data
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    return reply.partition(b"\r\n\r\n")[2].decode() or "eof"


async def test_a_refused_port_forward_resets_that_service_only(tmp_path: Path) -> None:
    async with fake_cluster() as cluster:
        _add_broken_services(cluster)
        kubeconfig = cluster.api.kubeconfig(tmp_path / "kubeconfig")
        with connect_process(tmp_path, kubeconfig, loop="uvloop", net=138) as child:
            await asyncio.to_thread(child.summary)
            ghost = (child.address("ghost.default"), 81)
            closed = (child.address("closed.default"), 82)
            web = (child.address("web.default"), 80)
            for _ in range(3):
                assert await asyncio.to_thread(_outcome, ghost) == "reset"
                assert await asyncio.to_thread(_outcome, closed) == "reset"
                assert await asyncio.to_thread(_outcome, web) in {"web-1", "web-2"}
            text = await asyncio.to_thread(wait_logged, child.log, "dial 127.0.131.20:8080 failed")
            assert "ghost-0:8080: the API server answered 404: no such pod" in text
            assert "error forwarding port 8999 to pod closed-0" in text
            assert "endpoint 127.0.131.7 left out: it names no pod" in text
            child.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(child.proc.wait, 15) == 0
        assert_clean_log(child.log)
