"""``userproxy connect``'s local addresses (stable per Service) and the hosts file's
managed block (kept apart from the user's lines, replaced atomically, removable after a
crash)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.manifests import endpoint_slice, service
from userproxy.connect.addresses import AddressBook, AddressesExhausted
from userproxy.connect.hosts_file import (
    BEGIN,
    END,
    HostsFileError,
    names_for,
    remove_block,
    write_block,
)
from userproxy.control.endpoints import build_endpoints
from userproxy.sources.decode import decode_endpoint_slice, decode_service


def test_a_service_has_the_same_address_in_every_run() -> None:
    services = [("default", f"svc-{i}") for i in range(200)]
    first = AddressBook()
    addresses = {s: first.assign(s) for s in services}
    assert len(set(addresses.values())) == len(services)
    network = ipaddress.ip_network("127.77.0.0/16")
    assert all(ipaddress.ip_address(a) in network for a in addresses.values())
    # Another process (another hash seed: Python's str hash is randomised per process).
    code = (
        "from userproxy.connect.addresses import AddressBook; b = AddressBook(); "
        "print(b.assign(('default', 'svc-7')))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert other.stdout.strip() == addresses[("default", "svc-7")]
    # In another order, Services that do not collide keep their addresses.
    again = AddressBook()
    assert {s: again.assign(s) for s in reversed(services)} == addresses


def test_collisions_take_the_next_free_address_and_releases_free_it() -> None:
    book = AddressBook("127.77.0.0/30")  # two usable addresses: .1 and .2
    a, b = book.assign(("ns", "a")), book.assign(("ns", "b"))
    assert {a, b} == {"127.77.0.1", "127.77.0.2"}
    with pytest.raises(AddressesExhausted, match=r"all 2 addresses of 127\.77\.0\.0/30"):
        book.assign(("ns", "c"))
    book.release(("ns", "a"))
    assert book.assign(("ns", "c")) == a
    assert book.assign(("ns", "b")) == b  # asking again gives the same


def test_the_names_are_those_a_pod_would_use() -> None:
    assert names_for("shop", "web") == [
        "web",
        "web.shop",
        "web.shop.svc",
        "web.shop.svc.cluster.local",
    ]


def test_the_block_is_written_replaced_and_removed_leaving_the_rest(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    user = "127.0.0.1\tlocalhost\n# a comment of the user's\n::1 localhost ip6-localhost"
    hosts.write_text(user)  # no final newline: kept, and the block starts on its own line
    hosts.chmod(0o644)
    write_block(hosts, {"127.77.0.9": names_for("default", "web")})
    text = hosts.read_text()
    assert text.startswith(user + "\n" + BEGIN + "\n")
    assert "127.77.0.9\tweb web.default web.default.svc web.default.svc.cluster.local\n" in text
    assert text.endswith(END + "\n")
    write_block(hosts, {"127.77.0.10": ["db"], "127.77.0.9": ["web"]})
    text = hosts.read_text()
    assert text.count(BEGIN) == 1
    assert "127.77.0.10\tdb\n127.77.0.9\tweb\n" in text
    assert oct(hosts.stat().st_mode & 0o777) == "0o644"
    assert remove_block(hosts) is True
    assert hosts.read_text() == user + "\n"
    assert remove_block(hosts) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]  # no temporary left


def test_a_block_left_by_a_crash_is_replaced_and_a_broken_one_is_an_error(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{BEGIN}\n127.77.0.1\told\n{END}\n10.0.0.1 nas\n")
    write_block(hosts, {"127.77.0.2": ["new"]})
    text = hosts.read_text()
    assert "old" not in text
    assert text.startswith("127.0.0.1 localhost\n10.0.0.1 nas\n" + BEGIN)
    hosts.write_text(f"127.0.0.1 localhost\n{BEGIN}\n127.77.0.1\told\n")
    with pytest.raises(HostsFileError, match=r"hosts:2: the userproxy block is not terminated"):
        write_block(hosts, {})
    assert hosts.read_text().endswith("127.77.0.1\told\n")  # untouched


def test_the_pod_behind_an_endpoint_is_kept_from_the_slice() -> None:
    """``userproxy connect`` reaches a pod by name: the slice's targetRef is kept through
    decoding (both decoders) and into the Service's endpoints; anything but a named Pod
    reference is no pod, and never an error (kube-proxy ignores the field)."""

    raw = endpoint_slice("web-a", "web", 8080, ["10.1.0.1", "10.1.0.2", "10.1.0.3"])
    entries = raw["endpoints"]
    entries[0]["targetRef"] = {"kind": "Pod", "namespace": "default", "name": "web-1"}
    entries[1]["targetRef"] = {"kind": "Node", "name": "n1"}
    entries[2]["targetRef"] = "garbage"
    entries[2]["hints"] = {"forZones": [{"name": "a"}]}  # the general decoder's path
    decoded = decode_endpoint_slice(raw)
    assert decoded is not None
    assert [e.pod for e in decoded.endpoints] == ["web-1", None, None]
    svc = decode_service(service("web", "10.96.0.10", 80))
    assert svc is not None
    (endpoints,) = build_endpoints(svc, [decoded], "node-a").values()
    assert {e.ip: e.pod for e in endpoints} == {
        "10.1.0.1": "web-1",
        "10.1.0.2": None,
        "10.1.0.3": None,
    }
