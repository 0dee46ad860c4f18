"""A third-party balancer: examples/balancer-plugin installed as a package, found through the
``userproxy.balancers`` entry point group by a ``userproxy run`` child process, selected per
Service by the annotation ``userproxy.io/balancer`` (or for all by ``--balancer``), serving
real connections.

The package is installed with this venv's pip (``--no-deps --target DIR``) into a temporary
directory the child gets on ``PYTHONPATH``; userproxy itself is not touched.

Addresses: Services on 127.236.0.x, backends on 127.237.0.x (no other test uses them).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import (
    assert_clean_log,
    free_port,
    proxy_process,
    wait_listening,
    wait_logged,
)
from userproxy.balancers.registry import BalancerContext
from userproxy.model import Endpoint

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "balancer-plugin"
PORT = 8080
DB = ("127.236.0.1", PORT)  # annotated: userproxy.io/balancer: failover
WEB = ("127.236.0.2", PORT)  # no annotation: the default balancer
BACKEND_IPS = ("127.237.0.3", "127.237.0.1", "127.237.0.2")  # not in address order


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/balancer-plugin installed into a directory of its own (once per module),
    built from a copy: setuptools writes build/ and *.egg-info beside the sources."""
    source = tmp_path_factory.mktemp("plugin-source") / "balancer-plugin"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path_factory.mktemp("plugin-site")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run(
        [*pip, "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert list(target.glob("userproxy_failover_balancer-*.dist-info"))
    return target


def child_env(plugin_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_path), *filter(None, [env.get("PYTHONPATH")])])
    return env


@dataclass
class Backends:
    by_name: dict[str, Backend]

    def stop(self, name: str) -> None:
        self.by_name[name].stop()


@pytest.fixture
def backends() -> Iterator[Backends]:
    """Three backends answering their name: b1 on 127.237.0.1 (the lowest address), b2, b3."""
    started = {f"b{ip[-1]}": Backend(ip, name_server(f"b{ip[-1]}")) for ip in BACKEND_IPS}
    try:
        yield Backends(started)
    finally:
        for backend in started.values():
            backend.stop()


def write_manifests(directory: Path, backends: Backends) -> Path:
    """Services ``db`` (annotated ``failover``) and ``web`` (not annotated) over the same
    three backends: one slice per backend, as each listens on a port of its own."""
    directory.mkdir()
    objects = [
        service("db", DB[0], PORT, annotations={"userproxy.io/balancer": "failover"}),
        service("web", WEB[0], PORT),
    ]
    for name, backend in sorted(backends.by_name.items()):
        for svc in ("db", "web"):
            objects.append(endpoint_slice(f"{svc}-{name}", svc, backend.port, [backend.ip]))
    write(directory / "services.json", *objects)
    return directory


def dial_failures(metrics_port: int) -> float:
    """The proxy's ``userproxy_upstream_dial_failures_total``, summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "userproxy_upstream_dial_failures_total"
    )


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_plugin_selected_by_annotation_serves_traffic(
    tmp_path: Path, plugin_path: Path, backends: Backends, loop: str
) -> None:
    """``db`` picks what the plug-in chooses (the lowest address, b1, every time); ``web``
    keeps round-robin; when b1 refuses, one failed dial (``failed()``) moves ``db`` to b2
    and the next connections do not dial b1 again."""
    manifests = write_manifests(tmp_path / "manifests", backends)
    log = tmp_path / "proxy.log"
    metrics_port = free_port()
    args = ["run", "--manifests", str(manifests), "--loop", loop, "--min-sync-period", "0"]
    args += ["--metrics-bind-address", f"127.0.0.1:{metrics_port}", "--log-level", "debug"]
    with proxy_process(args, env=child_env(plugin_path), log=log):
        wait_listening(DB)
        wait_listening(WEB)
        assert [ask(DB) for _ in range(20)] == ["b1"] * 20
        assert {ask(WEB) for _ in range(12)} == {"b1", "b2", "b3"}  # the default: round-robin

        backends.stop("b1")  # refuses now, while still listed ready
        before = dial_failures(metrics_port)
        assert [ask(DB) for _ in range(10)] == ["b2"] * 10
        assert dial_failures(metrics_port) - before == 1  # passed over after one failure
    output = log.read_text()
    assert "unknown balancer" not in output, output[-2000:]
    assert_clean_log(log)


def test_plugin_as_the_default_balancer(
    tmp_path: Path, plugin_path: Path, backends: Backends
) -> None:
    """``balancer: failover`` in the UserProxyConfiguration: the un-annotated ``web`` uses
    the plug-in too; it wins over the file's IPVS scheduler, and the log says so once."""
    manifests = write_manifests(tmp_path / "manifests", backends)
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "mode: ipvs\nipvs: {scheduler: dh}\n---\n"
        "apiVersion: userproxy.io/v1alpha1\nkind: UserProxyConfiguration\nbalancer: failover\n"
    )
    log = tmp_path / "proxy.log"
    args = ["run", "--manifests", str(manifests), "--config", str(config)]
    with proxy_process(args, env=child_env(plugin_path), log=log):
        wait_listening(WEB)
        assert [ask(WEB) for _ in range(10)] == ["b1"] * 10
        output = wait_logged(log, "applied: balancer, ipvs.scheduler")
    assert output.count("wins over the IPVS scheduler") == 1, output
    assert (
        "the default balancer 'failover' (--balancer or balancer:) wins over the IPVS "
        "scheduler 'dh' (which would select 'maglev')"
    ) in output
    assert "approximated" not in output  # dh is not used, so not reported
    assert_clean_log(log)


@pytest.mark.parametrize(
    ("how", "where"),
    [
        pytest.param(["--balancer", "fastest"], "--balancer", id="flag"),
        pytest.param(["--config", "{config}"], "UserProxyConfiguration.balancer", id="file"),
    ],
)
def test_unknown_default_balancer_exits_2_listing_plugins_too(
    tmp_path: Path, plugin_path: Path, how: list[str], where: str
) -> None:
    """Start-up refuses an unknown default balancer with a message naming the flag or the
    file's field and listing every known balancer, the plug-in's included."""
    manifests = tmp_path / "m.yaml"
    manifests.write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: userproxy.io/v1alpha1\nkind: UserProxyConfiguration\nbalancer: fastest\n"
    )
    argv = [arg.format(config=config) for arg in how]
    admin_off = ["--healthz-bind-address=", "--metrics-bind-address="]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "userproxy",
            "run",
            "--manifests",
            str(manifests),
            *argv,
            *admin_off,
        ],
        env=child_env(plugin_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("userproxy: "), message
    assert f"{where}: unknown balancer 'fastest' (known: " in message
    known = message.rpartition("(known: ")[2].rstrip(")").split(", ")
    assert {"failover", "random", "round-robin"} <= set(known)


# --- the plug-in's own rules, in process (loaded from its file, not installed) ---------------


def load_plugin_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "userproxy_failover_under_test", PLUGIN / "userproxy_failover" / "__init__.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failover_keeps_the_balancer_contract() -> None:
    """Address order (not list order, IPv4 by value not text), ``exclude`` preferred but
    not absolute, ``failed`` passes over an endpoint for RETRY_AFTER, ``renew`` keeps the
    marks of endpoints that stay and drops the others, an empty pool gives None."""
    plugin = load_plugin_module()
    now = [100.0]
    a, b, c = (Endpoint("10.0.0.10", 80), Endpoint("10.0.0.9", 80), Endpoint("10.0.0.9", 81))
    balancer = plugin.Failover([a, c, b], clock=lambda: now[0])
    assert list(balancer.endpoints) == [b, c, a]
    assert [balancer.pick("1.1.1.1") for _ in range(3)] == [b, b, b]
    assert balancer.pick("1.1.1.1", [b]) == c
    assert balancer.pick("1.1.1.1", [a, b, c]) == b  # all excluded: round again
    balancer.failed("1.1.1.1", b)
    assert balancer.pick("2.2.2.2") == c
    assert balancer.pick("2.2.2.2", [c]) == a
    assert balancer.pick("2.2.2.2", [c, a]) == b  # down, but the only one not excluded
    renewed = balancer.renew([a, b])
    assert renewed.pick("3.3.3.3") == a  # b is still down after the pool change
    now[0] += plugin.RETRY_AFTER
    assert renewed.pick("3.3.3.3") == b  # tried again when the time is up
    assert balancer.renew([a, c]).renew([a, b, c]).pick("4.4.4.4") == b  # mark dropped
    assert plugin.Failover([]).pick("5.5.5.5") is None
    assert isinstance(plugin.factory([a], BalancerContext()), plugin.Failover)
