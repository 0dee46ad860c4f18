"""A handoff that cannot happen changes nothing: the running proxy serves on untouched.

Each case against a real ``userproxy run --handoff-socket`` (the old process): a new
process with an invalid configuration, a stale socket file, an old process that is
draining, a peer speaking another version of the exchange (both ways), a peer of another
user, an unsafe directory.  While each runs, a prober opens a connection every 10 ms:
none may be refused.

Addresses: Services on 127.0.120.40-49, backends on 127.0.121.40-49.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.process.test_cli import exchange, wait_refused
from tests.process.test_handoff import Prober, handoff_dir, old_proxy, run_args, tcp_objects
from tests.support.backends import Backend, echo
from tests.support.manifests import write
from tests.support.proxyrun import proxy_process, stop_process, wait_listening, wait_logged
from userproxy.handoff import wire

NOBODY = 65534


def run_once(args: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "userproxy",
            *args,
            "--healthz-bind-address=",
            "--metrics-bind-address=",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_new_process_with_an_invalid_configuration_exits_2_and_touches_nothing(
    tmp_path: Path,
) -> None:
    with old_proxy(tmp_path, 40) as old, Prober(old.address) as prober:
        sock, log = old.sock, old.log
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "broken.yaml").write_text("kind: Service\nmetadata: [not, a, mapping]\n")
        result = run_once(run_args(bad, sock))
        assert result.returncode == 2, result.stderr
        assert "invalid manifests" in result.stderr
        time.sleep(0.2)
        prober.stop()
        assert "offering" not in log.read_text()  # it never connected
    assert prober.failures == [], prober.failures[:5]
    assert prober.ok > 5


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    """A socket file nobody listens on (a killed process's): the proxy starts as usual,
    takes the path over, and a successor can take over from it."""
    sock = handoff_dir(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(sock))
    stale.close()  # the file stays: nobody listens on it
    backend = Backend("127.0.121.41", echo)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write(manifests / "svc.json", *tcp_objects("echo", "127.0.120.41", backend.ip, backend.port))
    log, second = tmp_path / "old.log", tmp_path / "second.log"
    try:
        with proxy_process(run_args(manifests, sock), log=log):
            wait_logged(log, "a stale file, nobody listens")
            wait_logged(log, "handoff: listening on")
            assert oct(sock.stat().st_mode & 0o777) == "0o600"
            with proxy_process(run_args(manifests, sock), log=second):
                wait_logged(second, "handoff: took over 1 of 1")
    finally:
        backend.stop()


def test_a_draining_old_process_is_not_taken_over(tmp_path: Path) -> None:
    """The old process is shutting down (SIGTERM, a connection keeps it in its grace): the
    new one starts on its own and serves, the old one finishes its connection, exits 0."""
    with old_proxy(tmp_path, 42, "--shutdown-grace", "20s") as old:
        address, sock = old.address, old.sock
        with socket.create_connection(address, timeout=5) as held:
            assert exchange(held, b"held") == b"held"
            old.proc.terminate()
            wait_refused(address, timeout=5)
            new_log = tmp_path / "new.log"
            manifests = tmp_path / "manifests"
            with proxy_process(run_args(manifests, sock), log=new_log) as new:
                wait_listening(address)
                text = wait_logged(new_log, "handoff: listening on")
                assert "took over" not in text
                assert "nobody to take over" in text or "is draining" in text, text
                assert exchange(held, b"still") == b"still"  # through the old process
                held.shutdown(socket.SHUT_WR)
                assert old.proc.wait(10) == 0
                assert stop_process(new) == 0


async def speak(sock_path: Path, hello: dict[str, object]) -> dict[str, object]:
    """Connect to a handoff socket, send ``hello``, return the answer."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.setblocking(False)
    conn.connect(str(sock_path))
    with conn:
        await wire.send(conn, hello)
        answer, fds = await wire.receive(conn)
        for sock in fds:
            sock.close()
        return answer


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        ({"exchange": wire.EXCHANGE, "versions": [99], "userproxy": "9.9"}, "version"),
        ({"hello": "world"}, "exchange"),
    ],
    ids=["version", "not-the-exchange"],
)
async def test_a_peer_speaking_another_version_is_refused(
    tmp_path: Path, hello: dict[str, object], reason: str
) -> None:
    with old_proxy(tmp_path, 43) as old, Prober(old.address) as prober:
        log = old.log
        answer = await speak(old.sock, hello)
        assert answer["reason"] == reason, answer
        assert answer["versions"] == [wire.VERSION]
        if reason == "version":
            assert "reads handoff exchange versions [99]" in str(answer["error"])
        wait_logged(log, "handoff: refused")
        prober.stop()
    assert prober.failures == [], prober.failures[:5]


def test_a_new_process_that_cannot_read_the_old_one_exits_1(tmp_path: Path) -> None:
    """An "old process" that answers with a version error, or with garbage: the new one
    names the problem and exits 1 without serving anything."""
    sock = handoff_dir(tmp_path)
    backend = Backend("127.0.121.44", echo)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    address = ("127.0.120.44", 8080)
    write(manifests / "svc.json", *tcp_objects("echo", address[0], backend.ip, backend.port))
    try:
        for answer, expected in (
            (
                json.dumps({"error": "speaks version 7", "reason": "version", "versions": [7]}),
                "refused the handoff: speaks version 7",
            ),
            ("not json at all", "a message is not JSON"),
        ):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.unlink(missing_ok=True)
            server.bind(str(sock))
            server.listen(1)
            with server:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "userproxy",
                        *run_args(manifests, sock),
                        "--healthz-bind-address=",
                        "--metrics-bind-address=",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                server.settimeout(10)
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)  # the hello
                    conn.send(answer.encode())
                    _, stderr = proc.communicate(timeout=20)
            assert proc.returncode == 1, stderr
            assert "--handoff-socket" in stderr
            assert expected in stderr, stderr
            assert "Traceback" not in stderr
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(address, timeout=2)
    finally:
        backend.stop()


def connect_as_nobody(path: Path) -> str:
    """Connect to the handoff socket as uid 65534 (a forked child: no interpreter to find)
    and say the exchange's hello: EACCES, CLOSED (no answer) or ANSWER."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        outcome = b"ERROR"
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                conn.connect(str(path))
            except PermissionError:
                outcome = b"EACCES"
            else:
                conn.settimeout(5)
                try:
                    conn.send(b'{"exchange": "userproxy-handoff", "versions": [1]}')
                    outcome = b"ANSWER" if conn.recv(65536) else b"CLOSED"
                except (BrokenPipeError, ConnectionResetError):
                    # Closed before the hello was sent, or with it unread: no answer.
                    outcome = b"CLOSED"
        finally:
            os.write(write, outcome)
            os._exit(0)
    os.close(write)
    try:
        return os.read(read, 100).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def test_a_peer_of_another_user_is_refused(tmp_path: Path) -> None:
    """The socket file is 0600, so another user cannot connect; and where the mode lets
    one through (here: made 0666 on purpose), SO_PEERCRED refuses it without an answer."""
    assert os.getuid() == 0, "this test runs as root (.ci/run does) to act as another user"
    # Reachable by others, writable only by its owner (pytest's tmp_path is not reachable).
    run = Path(tempfile.mkdtemp(prefix="userproxy-handoff-"))
    os.chmod(run, 0o755)
    sock = run / "handoff.sock"
    backend = Backend("127.0.121.45", echo)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    address = ("127.0.120.45", 8080)
    write(manifests / "svc.json", *tcp_objects("echo", address[0], backend.ip, backend.port))
    log = tmp_path / "old.log"
    try:
        with proxy_process(run_args(manifests, sock), log=log):
            wait_logged(log, "handoff: listening on")
            with Prober(address) as prober:
                assert connect_as_nobody(sock) == "EACCES"
                os.chmod(sock, 0o666)
                assert connect_as_nobody(sock) == "CLOSED"
                text = wait_logged(log, "handoff: refused a peer")
                assert f"uid {NOBODY}" in text
            assert "offering" not in log.read_text()
        assert prober.failures == [], prober.failures[:5]
    finally:
        backend.stop()
        shutil.rmtree(run, ignore_errors=True)


def test_an_unsafe_directory_is_a_configuration_error(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write(manifests / "svc.json")
    result = run_once(run_args(manifests, shared / "handoff.sock"))
    assert result.returncode == 2, result.stderr
    assert "--handoff-socket:" in result.stderr
    assert "writable by other users" in result.stderr
    not_a_socket = tmp_path / "run"
    not_a_socket.mkdir(mode=0o700)
    (not_a_socket / "handoff.sock").write_text("")
    result = run_once(run_args(manifests, not_a_socket / "handoff.sock"))
    assert result.returncode == 2, result.stderr
    assert "exists and is not a socket" in result.stderr
