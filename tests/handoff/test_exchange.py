"""The handoff exchange in one process: messages and descriptors on the wire, the giver's
refusals, the settings.  The whole handoff between processes is tests/process/test_handoff*.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable
from pathlib import Path

import pytest

from userproxy.config import ConfigError, Settings
from userproxy.configfile import load_config_file
from userproxy.handoff import path as handoff_path
from userproxy.handoff import wire
from userproxy.handoff.giver import Giver, Offered
from userproxy.hostnet.listen import SocketKey, socket_key


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def test_a_message_carries_its_sockets_and_their_addresses() -> None:
    a, b = pair()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with a, b, listener:
        await wire.send(a, {"sockets": [{"kind": "tcp"}], "more": False}, [listener.fileno()])
        message, received = await wire.receive(b)
        assert message == {"sockets": [{"kind": "tcp"}], "more": False}
        (copy,) = received
        with copy:
            # The same listening socket, not a new one: a connection to it is accepted here.
            assert copy.getsockname() == listener.getsockname()
            with socket.create_connection(listener.getsockname(), timeout=5):
                copy.settimeout(5)
                copy.accept()[0].close()


async def test_unreadable_messages_are_exchange_errors_and_leak_no_descriptor() -> None:
    a, b = pair()
    listener = socket.socket()
    with a, b, listener:
        before = len(os.listdir("/proc/self/fd"))
        a.sendmsg(
            [b"[1, 2]"],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, listener.fileno().to_bytes(4, "little"))],
        )
        with pytest.raises(wire.ExchangeError, match="not a JSON object"):
            await wire.receive(b)
        a.send(b"{not json")
        with pytest.raises(wire.ExchangeError, match="not JSON"):
            await wire.receive(b)
        assert len(os.listdir("/proc/self/fd")) == before
        a.close()
        with pytest.raises(wire.ExchangeError, match="closed"):
            await wire.receive(b)
    with pytest.raises(ValueError, match="too large"):
        await wire.send(b, {"x": "y" * wire.MAX_MESSAGE})


class FakeHost:
    def __init__(self, draining: bool = False) -> None:
        self.draining = draining
        self.handed: list[set[SocketKey]] = []

    def offer(self) -> Iterable[Offered]:
        return []

    def expect_successor(self, addresses_device: str | None) -> None:
        pass

    def hand_off(self, taken: set[SocketKey], addresses_device: str | None) -> None:
        self.handed.append(taken)


async def ask(host: FakeHost, tmp_path: Path, hello: wire.Message) -> wire.Message:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    bound = handoff_path.bind(run / "handoff.sock")
    refused: list[str] = []
    giver = Giver(bound, host, on_refused=refused.append)
    serving = asyncio.create_task(giver.serve())
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.setblocking(False)
    try:
        conn.connect(str(run / "handoff.sock"))
        await wire.send(conn, hello)
        answer, _ = await wire.receive(conn)
    finally:
        conn.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        giver.close()
    assert refused == [answer.get("reason")], (refused, answer)
    assert not (run / "handoff.sock").exists()
    return answer


async def test_a_draining_process_refuses_with_draining(tmp_path: Path) -> None:
    host = FakeHost(draining=True)
    hello = {"exchange": wire.EXCHANGE, "versions": [wire.VERSION]}
    answer = await ask(host, tmp_path, hello)
    assert answer["reason"] == "draining"
    assert host.handed == []


async def test_another_version_is_refused_naming_both(tmp_path: Path) -> None:
    answer = await ask(FakeHost(), tmp_path, {"exchange": wire.EXCHANGE, "versions": [2, 3]})
    assert answer["reason"] == "version"
    assert "versions [2, 3]" in str(answer["error"])
    assert f"speaks version {wire.VERSION}" in str(answer["error"])


def test_the_socket_file_is_owner_only_and_replaced_by_rename(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    first = handoff_path.bind(run / "h.sock")
    second = handoff_path.bind(run / "h.sock")  # a successor's, over the first
    assert oct((run / "h.sock").stat().st_mode & 0o777) == "0o600"
    first.remove()  # not its file any more: left alone
    assert (run / "h.sock").exists()
    second.remove()
    assert not (run / "h.sock").exists()
    assert sorted(p.name for p in run.iterdir()) == []


def test_socket_keys_name_one_address_one_way() -> None:
    assert socket_key(socket.SOCK_STREAM, "::0", 80) == ("tcp", "::", 80)
    assert socket_key(socket.SOCK_DGRAM, "fe80::1%lo", 53) == ("udp", "fe80::1", 53)


def test_the_setting_from_the_flag_or_the_file(tmp_path: Path) -> None:
    manifests = tmp_path / "m.yaml"
    manifests.write_text("")
    settings = Settings(manifests=(manifests,), handoff_socket="/run/userproxy/h.sock")  # type: ignore[arg-type]
    assert settings.handoff_socket == Path("/run/userproxy/h.sock")
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: userproxy.io/v1alpha1\nkind: UserProxyConfiguration\n"
        "handoffSocket: /run/userproxy/h.sock\n"
    )
    assert load_config_file(config).values["handoff_socket"] == Path("/run/userproxy/h.sock")
    with pytest.raises(ConfigError, match="--handoff-socket: cannot be combined with --workers"):
        Settings(manifests=(manifests,), handoff_socket=Path("/x/h.sock"), workers=2)
