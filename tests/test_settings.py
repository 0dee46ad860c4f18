"""One rule per setting: the same value, or the same error, from a flag and from the file.

Each case gives a setting once as ``userproxy run`` flags and once as a config file
(through the real parser, ``settings_from`` and ``load_config_file``), and states the
expected outcome: the Settings field's value, or a phrase of the error both must give.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shlex
import socket
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from userproxy.balancers.ipvs import IPVS_SCHEDULERS, default_balancer
from userproxy.balancers.registry import DEFAULT_BALANCER, BalancerRegistry
from userproxy.balancers.roundrobin import RoundRobin
from userproxy.cli import settings_from
from userproxy.config import ConfigError, Settings, SettingsValues
from userproxy.config_rules import format_duration
from userproxy.demo import DEMO_DEFAULTS
from userproxy.flags import build_parser

KPC = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
UPC = "apiVersion: userproxy.io/v1alpha1\nkind: UserProxyConfiguration\n"


@dataclass(frozen=True)
class Case:
    field: str
    flags: str  # as typed in a shell
    file: str  # a document: KPC or UPC followed by the field
    expect: object = None  # the field's value ...
    error: str | None = None  # ... or a phrase both errors contain
    source: bool = True  # give --manifests (False: the case is about the source itself)


def kpc(field: str) -> str:
    return f"{KPC}{field}\n"


def upc(field: str) -> str:
    return f"{UPC}{field}\n"


CASES: dict[str, Case] = {
    # Hostname: trimmed and lowercased (kube-proxy's GetHostname), blank is an error.
    "hostname-normalised": Case(
        "hostname",
        "--hostname-override '  Node-A.Example '",
        kpc("hostnameOverride: '  Node-A.Example '"),
        "node-a.example",
    ),
    "hostname-blank": Case(
        "hostname", "--hostname-override '   '", kpc("hostnameOverride: '   '"), error="blank"
    ),
    "hostname-empty-is-the-host-name": Case(
        "hostname",
        "--hostname-override=",
        kpc("hostnameOverride: ''"),
        socket.gethostname().strip().lower(),
    ),
    # nodePortAddresses: keywords expanded, host bits cleared, a bare IP refused.
    "nodeport-addresses": Case(
        "nodeport_addresses",
        "--nodeport-addresses 10.1.2.3/8,primary,localhost",
        kpc("nodePortAddresses: [10.1.2.3/8, primary, localhost]"),
        ("10.0.0.0/8", "primary", "127.0.0.0/8", "::1/128"),
    ),
    "nodeport-address-bare-ip": Case(
        "nodeport_addresses",
        "--nodeport-addresses 10.0.0.1",
        kpc("nodePortAddresses: [10.0.0.1]"),
        error='"10.0.0.1" is not a CIDR or one of primary, localhost, all',
    ),
    "nodeport-address-empty-item": Case(
        "nodeport_addresses",
        "--nodeport-addresses 10.0.0.0/8,",
        kpc("nodePortAddresses: [10.0.0.0/8, '']"),
        error='"" is not a CIDR',
    ),
    "nodeport-addresses-empty": Case(
        "nodeport_addresses", "--nodeport-addresses=", kpc("nodePortAddresses: []"), ()
    ),
    # Bind addresses: without a port, the default port.
    "healthz-without-port": Case(
        "healthz_bind_address",
        "--healthz-bind-address 0.0.0.0",
        kpc("healthzBindAddress: 0.0.0.0"),
        "0.0.0.0:10256",
    ),
    "metrics-ipv6-without-port": Case(
        "metrics_bind_address",
        "--metrics-bind-address ::1",
        kpc("metricsBindAddress: '::1'"),
        "[::1]:10249",
    ),
    "healthz-port-0-off": Case(
        "healthz_bind_address",
        "--healthz-bind-address 127.0.0.1:0",
        kpc("healthzBindAddress: 127.0.0.1:0"),
        "127.0.0.1:0",
    ),
    "metrics-not-an-ip": Case(
        "metrics_bind_address",
        "--metrics-bind-address localhost:9000",
        kpc("metricsBindAddress: localhost:9000"),
        error="'localhost' in 'localhost:9000' is not an IP address",
    ),
    # Empty strings mean the default.
    "kubeconfig-empty": Case(
        "kubeconfig",
        "--kubeconfig=",
        kpc("clientConnection: {kubeconfig: ''}"),
        error="give exactly one source",
        source=False,
    ),
    "service-proxy-name-empty": Case(
        "service_proxy_name", "--service-proxy-name ''", upc("serviceProxyName: ''"), None
    ),
    "service-proxy-name-not-a-label": Case(
        "service_proxy_name",
        "--service-proxy-name 'my proxy'",
        upc("serviceProxyName: my proxy"),
        error="is not a label value",
    ),
    "cluster-cidr-empty": Case("cluster_cidr", "--cluster-cidr ''", kpc("clusterCIDR: ''"), None),
    "loop-empty": Case("loop", "--loop=", upc("loop: ''"), "auto"),
    "address-device-empty": Case(
        "address_device", "--address-device=", upc("addressDevice: ''"), "userproxy0"
    ),
    # CIDRs: host bits cleared; a pair must be one of each family.
    "cluster-cidr-host-bits": Case(
        "cluster_cidr",
        "--cluster-cidr '10.244.1.2/16, fd00:10:244::1/56'",
        kpc("clusterCIDR: '10.244.1.2/16, fd00:10:244::1/56'"),
        "10.244.0.0/16,fd00:10:244::/56",
    ),
    "cluster-cidr-two-ipv4": Case(
        "cluster_cidr",
        "--cluster-cidr 10.0.0.0/8,10.1.0.0/16",
        kpc("clusterCIDR: 10.0.0.0/8,10.1.0.0/16"),
        error="has two IPv4 CIDRs",
    ),
    "cluster-cidr-three": Case(
        "cluster_cidr",
        "--cluster-cidr 10.0.0.0/8,fd00::/64,11.0.0.0/8",
        kpc("clusterCIDR: 10.0.0.0/8,fd00::/64,11.0.0.0/8"),
        error="more than two",
    ),
    # Durations: the same range rule.
    "sync-period": Case("sync_period", "--sync-period 1m30s", kpc("syncPeriod: 1m30s"), 90.0),
    "negative-duration": Case(
        "sync_period", "--sync-period=-5s", kpc("syncPeriod: -5s"), error="-5s is negative"
    ),
    "min-sync-over-sync": Case(
        "min_sync_period",
        "--sync-period 10s --min-sync-period 20s",
        kpc("iptables: {syncPeriod: 10s, minSyncPeriod: 20s}"),
        error="20s is greater than the sync period (10s)",
    ),
    "idle-timeout-zero": Case(
        "tcp_idle_timeout",
        "--tcp-idle-timeout 0s",
        upc("tcpIdleTimeout: 0s"),
        error="must be greater than 0",
    ),
    "endpoint-drain": Case(
        "endpoint_drain", "--endpoint-drain 90s", upc("endpointDrain: 90s"), 90.0
    ),
    "endpoint-drain-zero": Case(
        "endpoint_drain",
        "--endpoint-drain 0s",
        upc("endpointDrain: 0s"),
        error="must be greater than 0",
    ),
    "handoff-socket": Case(
        "handoff_socket",
        "--handoff-socket /run/userproxy/handoff.sock",
        upc("handoffSocket: /run/userproxy/handoff.sock"),
        Path("/run/userproxy/handoff.sock"),
    ),
    "udp-idle-timeout": Case(
        "udp_idle_timeout", "--udp-idle-timeout 250ms", kpc("udpIdleTimeout: 250ms"), 0.25
    ),
    "shutdown-grace-zero-is-real": Case(
        "shutdown_grace", "--shutdown-grace 0s", upc("shutdownGrace: 0s"), 0.0
    ),
    "config-sync-period": Case(
        "config_sync_period", "--config-sync-period 1h", kpc("configSyncPeriod: 1h"), 3600.0
    ),
    # Counts and choices.
    "max-connections": Case(
        "max_connections", "--max-connections 500", upc("maxConnections: 500"), 500
    ),
    "max-connections-zero": Case(
        "max_connections",
        "--max-connections 0",
        upc("maxConnections: 0"),
        error="0 must be at least 1",
    ),
    "udp-session-rate-integer": Case(
        "udp_session_rate",
        "--udp-session-rate 1.5",
        upc("udpSessionRate: 1.5"),
        error="is not an integer",
    ),
    "udp-session-rate-off": Case(
        "udp_session_rate", "--udp-session-rate 0", upc("udpSessionRate: 0"), 0
    ),
    "service-connection-share": Case(
        "service_connection_share",
        "--service-connection-share 40",
        upc("serviceConnectionShare: 40"),
        40,
    ),
    "client-connection-share-over-100": Case(
        "client_connection_share",
        "--client-connection-share 150",
        upc("clientConnectionShare: 150"),
        error="150 is not a percentage from 1 to 100",
    ),
    "client-connection-share-zero": Case(
        "client_connection_share",
        "--client-connection-share 0",
        upc("clientConnectionShare: 0"),
        error="0 is not a percentage from 1 to 100",
    ),
    "udp-max-sessions": Case(
        "udp_max_sessions", "--udp-max-sessions 64", upc("udpMaxSessions: 64"), 64
    ),
    "loop-unknown": Case("loop", "--loop trio", upc("loop: trio"), error='"trio" is not one of'),
    "log-level": Case("log_level", "--log-level debug", upc("logLevel: debug"), "debug"),
    "log-format": Case("log_format", "--log-format json", upc("logFormat: json"), "json"),
    "access-log": Case(
        "access_log",
        "--access-log /var/log/a.log",
        upc("accessLog: /var/log/a.log"),
        "/var/log/a.log",
    ),
    "access-log-stderr": Case("access_log", "--access-log -", upc("accessLog: '-'"), "-"),
    "access-log-empty": Case("access_log", "--access-log ''", upc("accessLog: ''"), None),
    "access-log-format": Case(
        "access_log_format", "--access-log-format json", upc("accessLogFormat: json"), "json"
    ),
    "access-log-format-unknown": Case(
        "access_log_format",
        "--access-log-format clf",
        upc("accessLogFormat: clf"),
        error='"clf" is not one of',
    ),
    "tcp-fin-timeout": Case(
        "tcp_fin_timeout", "--tcp-fin-timeout 45s", upc("tcpFinTimeout: 45s"), 45.0
    ),
    "manage-addresses": Case(
        "manage_addresses", "--manage-addresses", upc("manageAddresses: true"), True
    ),
    "address-device-too-long": Case(
        "address_device",
        "--address-device a-very-long-device",
        upc("addressDevice: a-very-long-device"),
        error="18 characters long; a Linux device name has at most 15 (IFNAMSIZ)",
    ),
    # The default balancer: a name (checked against the registry at start-up, not here).
    "balancer": Case("balancer", "--balancer maglev", upc("balancer: maglev"), "maglev"),
    "balancer-blank": Case(
        "balancer", "--balancer ' '", upc("balancer: ' '"), error="is not a balancer name"
    ),
    # kube-proxy's IPVS scheduler: the file's field is read with mode: ipvs only.
    "ipvs-scheduler": Case(
        "ipvs_scheduler",
        "--ipvs-scheduler lc",
        kpc("mode: ipvs\nipvs: {scheduler: lc}"),
        "lc",
    ),
    "ipvs-scheduler-empty-is-unset": Case(
        "ipvs_scheduler", "--ipvs-scheduler=", kpc("mode: ipvs\nipvs: {scheduler: ''}"), None
    ),
    "ipvs-scheduler-unknown": Case(
        "ipvs_scheduler",
        "--ipvs-scheduler fastest",
        kpc("mode: ipvs\nipvs: {scheduler: fastest}"),
        error="'fastest' is not an IPVS scheduler (one of rr, lc, wlc",
    ),
    "ipvs-scheduler-refused": Case(
        "ipvs_scheduler",
        "--ipvs-scheduler ovf",
        kpc("mode: ipvs\nipvs: {scheduler: ovf}"),
        error="'ovf' has no close userproxy balancer: weighted overflow",
    ),
    # Outlier ejection: 0 failures turns it off; durations > 0; base <= max.
    "outlier-consecutive-failures": Case(
        "outlier_consecutive_failures",
        "--outlier-consecutive-failures 3",
        upc("outlierConsecutiveFailures: 3"),
        3,
    ),
    "outlier-off": Case(
        "outlier_consecutive_failures",
        "--outlier-consecutive-failures 0",
        upc("outlierConsecutiveFailures: 0"),
        0,
    ),
    "outlier-negative-failures": Case(
        "outlier_consecutive_failures",
        "--outlier-consecutive-failures=-1",
        upc("outlierConsecutiveFailures: -1"),
        error="-1 must be at least 0",
    ),
    "outlier-base-ejection": Case(
        "outlier_base_ejection",
        "--outlier-base-ejection 250ms",
        upc("outlierBaseEjection: 250ms"),
        0.25,
    ),
    "outlier-base-ejection-zero": Case(
        "outlier_base_ejection",
        "--outlier-base-ejection 0s",
        upc("outlierBaseEjection: 0s"),
        error="must be greater than 0",
    ),
    "outlier-max-ejection": Case(
        "outlier_max_ejection",
        "--outlier-max-ejection 10m",
        upc("outlierMaxEjection: 10m"),
        600.0,
    ),
    "outlier-base-over-max": Case(
        "outlier_base_ejection",
        "--outlier-base-ejection 1m --outlier-max-ejection 30s",
        upc("outlierBaseEjection: 1m\noutlierMaxEjection: 30s"),
        error="1m0s is greater than the maximum ejection time (30s)",
    ),
    "outlier-max-ejected-percent": Case(
        "outlier_max_ejected_percent",
        "--outlier-max-ejected-percent 100",
        upc("outlierMaxEjectedPercent: 100"),
        100,
    ),
    "outlier-max-ejected-percent-zero": Case(
        "outlier_max_ejected_percent",
        "--outlier-max-ejected-percent 0",
        upc("outlierMaxEjectedPercent: 0"),
        error="0 is not a percentage from 1 to 100",
    ),
    "manifests-empty-path": Case(
        "manifests", "--manifests ''", upc("manifests: ['']"), error="an empty path", source=False
    ),
}


def outcome(argv: list[str]) -> tuple[str, object]:
    """("value", Settings) or ("error", message) of ``userproxy ARGV`` up to Settings."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(argv)
        settings, _, _ = settings_from(args)
    except SystemExit:
        return "error", stderr.getvalue()
    except ConfigError as exc:
        return "error", str(exc)
    return "value", settings


@pytest.mark.parametrize("name", list(CASES))
def test_flag_and_file_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    case = CASES[name]
    (tmp_path / "m.yaml").write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(case.file))
    source = ["--manifests", str(tmp_path / "m.yaml")] if case.source else []
    by_flag = outcome(["run", *source, *shlex.split(case.flags)])
    by_file = outcome(["run", *source, "--config", str(config)])
    for how, (kind, result) in (("flag", by_flag), ("file", by_file)):
        if case.error is None:
            assert kind == "value", (how, result)
            assert isinstance(result, Settings)
            assert getattr(result, case.field) == case.expect, how
        else:
            assert kind == "error", (how, result)
            assert case.error in str(result), (how, result)
            assert str(result).count("\n") <= 2, result  # the cause, and a usage hint


def test_file_errors_name_the_field_not_the_flag(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(KPC + "iptables: {syncPeriod: 10s, minSyncPeriod: 20s}\n")
    kind, message = outcome(
        ["run", "--manifests", str(tmp_path / "m.yaml"), "--config", str(config)]
    )
    assert kind == "error"
    assert message == (
        f"{config}: KubeProxyConfiguration.iptables.minSyncPeriod: 20s is greater than the "
        "sync period (10s)"
    )


@pytest.mark.parametrize(
    "command",
    [
        "run --manifests {m} --hostname-override ' Node-B '",
        "run --manifests {m} --config {c}",
        "check --manifests {m} --hostname-override ' Node-B '",
        "check --manifests {m} --config {c}",
        "demo --hostname-override ' Node-B '",
        "demo --config {c}",
    ],
)
def test_hostname_is_trimmed_and_lowercased_on_every_path(tmp_path: Path, command: str) -> None:
    """``run``, ``check`` and ``demo``, by flag and by file (SIGHUP's reload is ``run``'s
    path again): one rule, kube-proxy's GetHostname."""
    (tmp_path / "m.yaml").write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(kpc("hostnameOverride: ' Node-B '"))
    argv = shlex.split(command.format(m=tmp_path / "m.yaml", c=config))
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        fixed: SettingsValues = {"manifests": (tmp_path,)}
        settings, _, _ = settings_from(args, defaults=DEMO_DEFAULTS, fixed=fixed)
    else:
        settings, _, _ = settings_from(args)
    assert settings.hostname == "node-b"


def test_every_setting_has_a_flag_and_a_rule() -> None:
    from userproxy.config import RULES

    internal = {"in_cluster"}  # derived from the environment, not a setting one gives
    assert set(Settings.__dataclass_fields__) - internal == set(RULES)
    assert set(SettingsValues.__annotations__) == set(Settings.__dataclass_fields__)


def test_settings_built_directly_hold_the_rules() -> None:
    settings = Settings(
        manifests=(Path("."),),
        hostname=" Host-X ",
        nodeport_addresses=("10.1.2.3/8",),
        healthz_bind_address="127.0.0.1",
    )
    assert settings.hostname == "host-x"
    assert settings.nodeport_addresses == ("10.0.0.0/8",)
    assert settings.healthz_bind_address == "127.0.0.1:10256"
    assert Settings(manifests=(Path("."),)).hostname == socket.gethostname().strip().lower()


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0s"),
        (0.25, "250ms"),
        (1.0, "1s"),
        (90.0, "1m30s"),
        (900.0, "15m0s"),
        (3600.0, "1h0m0s"),
    ],
)
def test_durations_shown_as_go_durations(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_help_shows_real_defaults() -> None:
    def help_of(command: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        return " ".join(out.getvalue().split())

    run = help_of("run")
    assert "MISSING" not in run
    assert "(default: 15m0s)" in run  # --config-sync-period, not 900.0
    assert "(default: 50)" in run  # --service-connection-share, an integer, not 50.0
    assert "ejected at once (at least one, never the last) (default: 50)" in run
    assert "at most this long (default: 5m0s)" in run  # --outlier-max-ejection
    assert "(default: this host's name" in run
    demo = help_of("demo")
    assert "this node's name (default: demo-node)" in demo
    assert "(default: 127.0.0.1:10256)" in demo
    for flag in (
        "--nodeport-addresses",
        "--manage-addresses",
        "--address-device",
        "--cluster-cidr",
    ):
        assert flag in demo, flag  # docs/configuration.md: the demo takes them too


# --- the default balancer: --balancer, or kube-proxy's IPVS scheduler --------------------------

#: Every IPVS scheduler of the kernel: (the balancer it selects or None, how).  Written out
#: here, not read from the module, so a change to the mapping shows up as a failing row.
IPVS_MAPPING: dict[str, tuple[str | None, str]] = {
    "": ("round-robin", "same"),
    "rr": ("round-robin", "same"),
    "lc": ("least-connections", "same"),
    "wlc": ("least-connections", "same"),
    "sh": ("maglev", "same"),
    "mh": ("maglev", "same"),
    "sed": ("power-of-two", "same"),
    "nq": ("power-of-two", "same"),
    "twos": ("power-of-two", "same"),
    "wrr": ("round-robin", "approximated"),
    "lblc": ("maglev", "approximated"),
    "lblcr": ("maglev", "approximated"),
    "dh": ("maglev", "approximated"),
    "fo": (None, "refused"),
    "ovf": (None, "refused"),
}


def registry_for(settings: Settings) -> BalancerRegistry:
    """The registry ``Proxy`` builds for ``settings`` (``proxy._balancer_registry``), with
    a stand-in for a built-in balancer this branch does not have yet, so the test checks
    the default's plumbing, not the balancer's implementation."""
    from userproxy.proxy import _balancer_registry

    name, _ = default_balancer(settings.balancer, settings.ipvs_scheduler, DEFAULT_BALANCER)
    if name in BalancerRegistry().names:
        return _balancer_registry(settings)
    return BalancerRegistry({name: lambda endpoints, _context: RoundRobin(endpoints)}, default=name)


def test_every_ipvs_scheduler_is_mapped() -> None:
    assert set(IPVS_MAPPING) == set(IPVS_SCHEDULERS)


@pytest.mark.parametrize("scheduler", list(IPVS_MAPPING))
def test_ipvs_scheduler_selects_the_default_balancer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheduler: str
) -> None:
    """By flag and by a KubeProxyConfiguration with ``mode: ipvs``: the same balancer, a
    warning naming it for an approximation, a clear error for a refused name."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    balancer, how = IPVS_MAPPING[scheduler]
    (tmp_path / "m.yaml").write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(kpc(f"mode: ipvs\nipvs: {{scheduler: '{scheduler}'}}"))
    source = ["--manifests", str(tmp_path / "m.yaml")]
    for argv in (
        ["run", *source, f"--ipvs-scheduler={scheduler}"],
        ["run", *source, "--config", str(config)],
    ):
        kind, result = outcome(argv)
        if how == "refused":
            assert kind == "error", result
            assert f"'{scheduler}' has no close userproxy balancer" in str(result)
            assert "--balancer" in str(result)  # what to do instead
            continue
        assert isinstance(result, Settings), result
        assert result.ipvs_scheduler == (scheduler or None)
        name, note = default_balancer(None, result.ipvs_scheduler, DEFAULT_BALANCER)
        assert name == balancer
        if how == "same":
            assert note is None
        else:
            assert note is not None
            assert f"IPVS scheduler '{scheduler}' is approximated by the balancer" in note
            assert repr(balancer) in note


def test_ipvs_mode_with_scheduler_lc_makes_least_connections_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acceptance 3: the settings, and the registry resolving a Service without the
    ``userproxy.io/balancer`` annotation (``resolve(None, ...)``, as the proxier does)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "m.yaml").write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(kpc("mode: ipvs\nipvs:\n  scheduler: lc\n  syncPeriod: 30s"))
    kind, settings = outcome(
        ["run", "--manifests", str(tmp_path / "m.yaml"), "--config", str(config)]
    )
    assert kind == "value", settings
    assert isinstance(settings, Settings)
    assert (settings.ipvs_scheduler, settings.balancer) == ("lc", None)
    registry = registry_for(settings)
    assert registry.default == "least-connections"
    assert registry.resolve(None, "default/web:http") == "least-connections"
    assert registry.resolve("random", "default/web:http") == "random"  # the annotation wins
    assert registry.resolve("nope", "default/web:http") == "least-connections"  # warned


def test_ipvs_scheduler_is_ignored_outside_ipvs_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "m.yaml").write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(kpc("mode: iptables\nipvs: {scheduler: lc}"))
    _, settings = outcome(["run", "--manifests", str(tmp_path / "m.yaml"), "--config", str(config)])
    assert isinstance(settings, Settings), settings
    assert settings.ipvs_scheduler is None
    assert registry_for(settings).default == "round-robin"


def test_explicit_balancer_wins_over_the_ipvs_scheduler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the file (UserProxyConfiguration.balancer) or the flag, over the file's or the
    flag's scheduler; the proxy says so once at start-up."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "m.yaml").write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(kpc("mode: ipvs\nipvs: {scheduler: sh}") + "---\n" + upc("balancer: random"))
    source = ["run", "--manifests", str(tmp_path / "m.yaml")]
    for argv in (
        [*source, "--config", str(config)],
        [*source, "--ipvs-scheduler", "sh", "--balancer", "random"],
    ):
        _, settings = outcome(argv)
        assert isinstance(settings, Settings), settings
        name, note = default_balancer(settings.balancer, settings.ipvs_scheduler, DEFAULT_BALANCER)
        assert name == "random"
        assert note == (
            "the default balancer 'random' (--balancer or balancer:) wins over the IPVS "
            "scheduler 'sh' (which would select 'maglev')"
        )
        assert registry_for(settings).resolve(None, "default/web:http") == "random"


def test_approximated_scheduler_is_reported_once_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The warning comes from building the proxy's registry, once per process (a Service
    never repeats it)."""
    from userproxy.proxy import _balancer_registry

    settings = Settings(manifests=(Path("."),), ipvs_scheduler="wrr")
    with caplog.at_level(logging.WARNING, logger="userproxy.proxy"):
        registry = _balancer_registry(settings)
        for _ in range(3):
            registry.resolve(None, "default/web:http")
    assert registry.default == "round-robin"
    warnings = [r.getMessage() for r in caplog.records if r.name == "userproxy.proxy"]
    assert warnings == [
        "IPVS scheduler 'wrr' is approximated by the balancer 'round-robin': EndpointSlices "
        "carry no weights, so weighted round-robin is round-robin"
    ]


@pytest.mark.parametrize("scheduler", [None, "rr", "lc"])
def test_unknown_default_balancer_is_a_config_error_at_start(scheduler: str | None) -> None:
    """Not a silent fallback: the message names the flag and lists the known balancers
    (built-ins and plug-ins; a plug-in in a child process: tests/process/
    test_balancer_plugin.py).  --balancer wins, so the scheduler does not matter."""
    from userproxy.proxy import _balancer_registry

    settings = Settings(manifests=(Path("."),), balancer="fastest", ipvs_scheduler=scheduler)
    with pytest.raises(ConfigError) as info:
        _balancer_registry(settings)
    assert str(info.value).startswith("--balancer: unknown balancer 'fastest' (known: ")
    assert "random, round-robin" in str(info.value)
    assert info.value.setting == "balancer"


def test_configz_shows_the_default_balancer() -> None:
    from userproxy.config import configz

    shown = configz(Settings(manifests=(Path("."),), ipvs_scheduler="sh"))
    own, kube_proxy = shown["userproxy.io"], shown["kubeproxy.config.k8s.io"]
    assert isinstance(own, dict)
    assert isinstance(kube_proxy, dict)
    assert (own["default_balancer"], own["ipvs_scheduler"]) == ("maglev", "sh")
    assert kube_proxy["ipvs"] == {"scheduler": "sh"}
    explicit = Settings(manifests=(Path("."),), ipvs_scheduler="sh", balancer="random")
    assert explicit.default_balancer == "random"


def test_default_balancer_is_round_robin() -> None:
    assert DEFAULT_BALANCER == "round-robin"
    assert default_balancer(None, None, DEFAULT_BALANCER) == ("round-robin", None)
    assert BalancerRegistry().default == "round-robin"
    assert Settings(manifests=(Path("."),)).balancer is None
    assert Settings(manifests=(Path("."),)).default_balancer == "round-robin"
