"""How the Services' names reach this machine's resolver: a managed hosts-file block
(``--hosts-file``) or a DNS responder (``--dns``), started and ended with the command.

Both read the names of ``LocalServices``: the hosts block is rewritten (off the loop)
after changes, the responder answers from the live mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from userproxy.config import ConfigError
from userproxy.connect.dns import DnsTcp, DnsUdp
from userproxy.connect.hosts_file import HostsFileError, remove_block, write_block

log = logging.getLogger(__name__)

__all__ = ["DnsServer", "HostsBlock", "parse_dns_address", "resolver_hint"]


class HostsBlock:
    """The managed block of ``path``: emptied at :meth:`start` (a block a crashed run left
    is replaced), rewritten by :meth:`update`, removed by :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, list[str]] | None = None
        self._writing: asyncio.Task[None] | None = None
        self._next: dict[str, list[str]] | None = None

    async def start(self) -> None:
        """ConfigError (exit 2) when the file cannot be written or its block is broken."""
        try:
            stale = await asyncio.to_thread(write_block, self.path, {})
        except HostsFileError as exc:
            raise ConfigError(f"--hosts-file: {exc}", setting="hosts_file") from None
        if stale:
            log.warning("%s: removed the block an earlier run left behind", self.path)
        self._entries = {}

    def update(self, entries: Mapping[str, Sequence[str]]) -> None:
        wanted = {address: list(names) for address, names in entries.items()}
        if wanted in (self._entries, self._next):
            return
        self._next = wanted
        if self._writing is None or self._writing.done():
            self._writing = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self._next is not None:
            entries, self._next = self._next, None
            try:
                await asyncio.to_thread(write_block, self.path, entries)
                self._entries = entries
            except HostsFileError as exc:
                log.error("cannot update the names: %s", exc)

    async def close(self) -> None:
        """Remove the block, if :meth:`start` made it (a broken block is the user's)."""
        if self._entries is None:
            return
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
        try:
            await asyncio.to_thread(remove_block, self.path)
        except HostsFileError as exc:
            log.error("cannot remove the names: %s", exc)


def parse_dns_address(text: str, *, allow_remote: bool) -> tuple[str, int]:
    """``ADDR:PORT`` (``[ADDR]:PORT`` for IPv6) of ``--dns``; loopback only unless
    ``allow_remote``: the responder answers anyone who can reach it."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep:
            raise ValueError
        address = ipaddress.ip_address(host)
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"--dns: {text!r} is not ADDR:PORT (e.g. 127.0.0.1:5353)", setting="dns"
        ) from None
    if not address.is_loopback and not allow_remote:
        raise ConfigError(
            f"--dns: {host} is not a loopback address; other machines could ask it "
            "(add --dns-allow-remote if that is meant)",
            setting="dns",
        )
    return str(address), port


class DnsServer:
    """The responder on UDP and TCP at one address and port."""

    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = names
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """ConfigError (exit 2) when either socket cannot be bound."""
        loop = asyncio.get_running_loop()
        try:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: DnsUdp(self.names), local_addr=(host, port)
            )
            self._tcp = await loop.create_server(lambda: DnsTcp(self.names), host, port)
        except OSError as exc:
            self.close()
            raise ConfigError(
                f"--dns: cannot listen on {host}:{port}: {exc.strerror or exc}", setting="dns"
            ) from None

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None


def resolver_hint(host: str, port: int, domains: Sequence[str]) -> str:
    """How to point the system resolver at the responder for the cluster's names only."""
    shown = f"[{host}]" if ":" in host else host
    routed = " ".join(f"'~{domain}'" for domain in domains)
    return (
        f"DNS: the Services' names are answered at {shown}:{port} (UDP and TCP); other "
        "names are refused.\n"
        f"  try it:          dig @{host} -p {port} <service>.<namespace>\n"
        "  systemd-resolved (Linux, as root; undone when lo is reconfigured):\n"
        f"                   resolvectl dns lo {shown}:{port} && resolvectl domain lo {routed}\n"
        "  macOS:            for each domain D above, /etc/resolver/D with the lines\n"
        f"                   'nameserver {host}' and 'port {port}'\n"
    )
