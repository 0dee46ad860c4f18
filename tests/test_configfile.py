"""The --config file loader: kube-proxy's KubeProxyConfiguration plus UserProxyConfiguration."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from userproxy.config import RULES, ConfigError, Settings, settings_values
from userproxy.config_rules import parse_go_duration
from userproxy.configfile import (
    KUBE_PROXY_FIELDS,
    USERPROXY_FIELDS,
    FileConfig,
    describe,
    load_config_file,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"
KPC = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
UPC = "apiVersion: userproxy.io/v1alpha1\nkind: UserProxyConfiguration\n"


def load(tmp_path: Path, text: str) -> FileConfig:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config_file(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


# --- the example files ---------------------------------------------------------------------


def test_kubeadm_generated_kube_proxy_config() -> None:
    config = load_config_file(EXAMPLES / "kube-proxy-config.yaml")
    assert dict(config.values) == {
        "kubeconfig": Path("/var/lib/kube-proxy/kubeconfig.conf"),
        "cluster_cidr": "10.244.0.0/16",
    }
    assert config.applied == ("clientConnection.kubeconfig", "clusterCIDR")
    # Every zero value kubeadm writes (0s, null, "", false, 0) is kube-proxy's "unset".
    assert config.ignored == ("bindAddress",)
    assert (
        describe(config)
        == "applied: clientConnection.kubeconfig, clusterCIDR; ignored: bindAddress"
    )


def test_full_example_with_both_documents() -> None:
    config = load_config_file(EXAMPLES / "userproxy-config.yaml")
    assert dict(config.values) == {
        "kubeconfig": Path("/var/lib/kube-proxy/kubeconfig.conf"),
        "hostname": "node-1",
        "healthz_bind_address": "0.0.0.0:10256",
        "metrics_bind_address": "127.0.0.1:10249",
        "config_sync_period": 900.0,
        "nodeport_addresses": ("primary",),
        "cluster_cidr": "10.244.0.0/16,fd00:10:244::/56",
        "sync_period": 30.0,
        "min_sync_period": 1.0,
        "loop": "auto",
        "log_level": "info",
        "log_format": "json",
        "shutdown_grace": 10.0,
        "tcp_fin_timeout": 120.0,
        "tcp_idle_timeout": 3600.0,
        "max_connections": 50000,
    }
    assert config.applied == (
        "clientConnection.kubeconfig",
        "clusterCIDR",
        "configSyncPeriod",
        "healthzBindAddress",
        "hostnameOverride",
        "iptables.minSyncPeriod",
        "iptables.syncPeriod",
        "logFormat",
        "logLevel",
        "loop",
        "maxConnections",
        "metricsBindAddress",
        "nodePortAddresses",
        "shutdownGrace",
        "tcpFinTimeout",
        "tcpIdleTimeout",
    )
    assert config.ignored == (
        "bindAddress",
        "clientConnection.burst",
        "clientConnection.contentType",
        "clientConnection.qps",
        "conntrack.maxPerCore",
        "conntrack.min",
        "conntrack.tcpCloseWaitTimeout",
        "conntrack.tcpEstablishedTimeout",
        "iptables.localhostNodePorts",
        "iptables.masqueradeBit",
        "logging.format",
        "mode",
        "oomScoreAdj",
    )


def test_values_build_settings(tmp_path: Path) -> None:
    config = load_config_file(EXAMPLES / "userproxy-config.yaml")
    fields = {field.name for field in dataclasses.fields(Settings)}
    assert set(config.values) <= fields
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("")
    settings = Settings(**settings_values({**config.values, "kubeconfig": kubeconfig}))
    assert settings.healthz_address == ("0.0.0.0", 10256)
    assert settings.sync_period == 30.0


def test_every_field_that_sets_something_names_a_setting() -> None:
    settings = {setting for _, setting in KUBE_PROXY_FIELDS.values() if setting is not None}
    assert settings | {setting for _, setting in USERPROXY_FIELDS.values()} <= set(RULES)
    assert all(setting is not None for _, setting in USERPROXY_FIELDS.values())


# --- KubeProxyConfiguration mapping --------------------------------------------------------


def test_userproxy_document_alone(tmp_path: Path) -> None:
    config = load(tmp_path, UPC + "manifests: [a.yaml, dir]\nserviceProxyName: mine\n")
    assert dict(config.values) == {
        "manifests": (Path("a.yaml"), Path("dir")),
        "service_proxy_name": "mine",
    }
    assert config.applied == ("manifests", "serviceProxyName")
    assert config.ignored == ()
    assert describe(config) == "applied: manifests, serviceProxyName; ignored: none"


def test_userproxy_outlier_fields(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        UPC + "outlierConsecutiveFailures: 0\noutlierBaseEjection: 10s\n"
        "outlierMaxEjection: 2m\noutlierMaxEjectedPercent: 30\n",
    )
    assert dict(config.values) == {
        "outlier_consecutive_failures": 0,  # a zero is real here: ejection off
        "outlier_base_ejection": 10.0,
        "outlier_max_ejection": 120.0,
        "outlier_max_ejected_percent": 30,
    }
    assert config.applied == (
        "outlierBaseEjection",
        "outlierConsecutiveFailures",
        "outlierMaxEjectedPercent",
        "outlierMaxEjection",
    )


def test_userproxy_zero_durations_are_real_values(tmp_path: Path) -> None:
    config = load(tmp_path, UPC + "shutdownGrace: 0s\ntcpFinTimeout: '0'\n")
    assert dict(config.values) == {"shutdown_grace": 0.0, "tcp_fin_timeout": 0.0}


@pytest.mark.parametrize(
    ("body", "expected", "applied", "ignored"),
    [
        pytest.param(
            "iptables: {syncPeriod: 1m0s, minSyncPeriod: 250ms}\n",
            {"sync_period": 60.0, "min_sync_period": 0.25},
            ("iptables.minSyncPeriod", "iptables.syncPeriod"),
            (),
            id="iptables-by-default",
        ),
        pytest.param(
            "syncPeriod: 10s\nminSyncPeriod: 2s\niptables: {syncPeriod: 1m0s, minSyncPeriod: 1s}\n",
            {"sync_period": 10.0, "min_sync_period": 2.0},
            ("minSyncPeriod", "syncPeriod"),
            ("iptables.minSyncPeriod", "iptables.syncPeriod"),
            id="top-level-wins",
        ),
        pytest.param(
            "mode: ipvs\nipvs: {syncPeriod: 45s}\niptables: {syncPeriod: 1m0s}\n",
            {"sync_period": 45.0},
            ("ipvs.syncPeriod",),
            ("iptables.syncPeriod", "mode"),
            id="ipvs-mode-uses-ipvs",
        ),
        pytest.param(
            "mode: nftables\nnftables: {minSyncPeriod: 3s}\nipvs: {minSyncPeriod: 4s}\n",
            {"min_sync_period": 3.0},
            ("nftables.minSyncPeriod",),
            ("ipvs.minSyncPeriod", "mode"),
            id="nftables-mode-uses-nftables",
        ),
        pytest.param(
            "mode: kernelspace\niptables: {syncPeriod: 20s}\n",
            {"sync_period": 20.0},
            ("iptables.syncPeriod",),
            ("mode",),
            id="other-modes-use-iptables",
        ),
        pytest.param(
            "syncPeriod: 0s\niptables: {syncPeriod: 0s, minSyncPeriod: 0s}\nconfigSyncPeriod: 0s\n",
            {},
            (),
            (),
            id="zero-durations-are-unset",
        ),
        pytest.param(
            "hostnameOverride: '  Node-A.Example '\n",
            {"hostname": "node-a.example"},
            ("hostnameOverride",),
            (),
            id="hostname-trimmed-lowercased",
        ),
        pytest.param(
            "healthzBindAddress: 0.0.0.0\nmetricsBindAddress: '::1'\n",
            {"healthz_bind_address": "0.0.0.0:10256", "metrics_bind_address": "[::1]:10249"},
            ("healthzBindAddress", "metricsBindAddress"),
            (),
            id="address-without-port-gets-default-port",
        ),
        pytest.param(
            "healthzBindAddress: '[::]:9000'\nmetricsBindAddress: 127.0.0.1:0\n",
            {"healthz_bind_address": "[::]:9000", "metrics_bind_address": "127.0.0.1:0"},
            ("healthzBindAddress", "metricsBindAddress"),
            (),
            id="ipv6-and-disabled",
        ),
        pytest.param(
            "nodePortAddresses: [primary, localhost, 10.0.0.0/8, all, 0.0.0.0/0]\n",
            {
                "nodeport_addresses": (
                    "primary",
                    "127.0.0.0/8",
                    "::1/128",
                    "10.0.0.0/8",
                    "0.0.0.0/0",
                    "::/0",
                )
            },
            ("nodePortAddresses",),
            (),
            id="nodeport-keywords-expanded",
        ),
        pytest.param(
            "clientConnection: {kubeconfig: kc.yaml, qps: 50, burst: 100}\nconfigSyncPeriod: 1h\n",
            {"kubeconfig": Path("kc.yaml"), "config_sync_period": 3600.0},
            ("clientConnection.kubeconfig", "configSyncPeriod"),
            ("clientConnection.burst", "clientConnection.qps"),
            id="client-connection",
        ),
        pytest.param(
            "portRange: 30000-32767\nresourceContainer: /kube-proxy\n"
            "featureGates: {Foo: true}\nenableProfiling: true\n"
            "showHiddenMetricsForVersion: '1.30'\n"
            "detectLocalMode: ClusterCIDR\ndetectLocal: {bridgeInterface: cbr0}\n"
            "winkernel: {enableDSR: true}\nconntrack: {maxPerCore: 0, udpTimeout: 30s}\n"
            "ipvs: {scheduler: rr, excludeCIDRs: [10.1.0.0/16], strictARP: true}\n"
            "bindAddressHardFail: true\nwindowsRunAsService: true\n",
            {},
            (),
            (
                "bindAddressHardFail",
                "conntrack.maxPerCore",
                "conntrack.udpTimeout",
                "detectLocal.bridgeInterface",
                "detectLocalMode",
                "enableProfiling",
                "featureGates",
                "ipvs.excludeCIDRs",
                "ipvs.scheduler",
                "ipvs.strictARP",
                "portRange",
                "resourceContainer",
                "showHiddenMetricsForVersion",
                "windowsRunAsService",
                "winkernel.enableDSR",
            ),
            id="not-applicable-fields-ignored",
        ),
        pytest.param(
            "mode: ipvs\nipvs: {scheduler: lc, syncPeriod: 45s}\n",
            {"ipvs_scheduler": "lc", "sync_period": 45.0},
            ("ipvs.scheduler", "ipvs.syncPeriod"),
            ("mode",),
            id="ipvs-mode-reads-the-scheduler",
        ),
        pytest.param(
            "mode: iptables\nipvs: {scheduler: lc}\n",
            {},
            (),
            ("ipvs.scheduler", "mode"),
            id="scheduler-ignored-outside-ipvs-mode",
        ),
        pytest.param(
            "mode: ipvs\nipvs: {scheduler: ''}\n",
            {},
            (),
            ("mode",),
            id="empty-scheduler-is-unset-rr",
        ),
        pytest.param(
            "udpIdleTimeout: 2s\n",
            {"udp_idle_timeout": 2.0},
            ("udpIdleTimeout",),
            (),
            id="userspace-udp-idle-timeout-honoured",
        ),
        pytest.param(
            "hostnameOverride: null\nclientConnection: null\nnodePortAddresses: []\n"
            "clusterCIDR: ''\nfeatureGates: {}\nlogging: {}\n",
            {},
            (),
            (),
            id="empty-and-null-are-unset",
        ),
    ],
)
def test_kube_proxy_fields(
    tmp_path: Path,
    body: str,
    expected: dict[str, object],
    applied: tuple[str, ...],
    ignored: tuple[str, ...],
) -> None:
    config = load(tmp_path, KPC + body)
    assert dict(config.values) == expected
    assert config.applied == applied
    assert config.ignored == ignored


def test_documents_in_either_order_and_trailing_separator(tmp_path: Path) -> None:
    config = load(tmp_path, f"---\n{UPC}logLevel: debug\n---\n{KPC}clusterCIDR: 10.0.0.0/8\n---\n")
    assert dict(config.values) == {"log_level": "debug", "cluster_cidr": "10.0.0.0/8"}


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            KPC + "iptables: {syncPeriod: abc}\n",
            'KubeProxyConfiguration.iptables.syncPeriod: "abc" is not a duration '
            "(like 30s or 1m0s)",
            id="bad-duration",
        ),
        pytest.param(
            KPC + "configSyncPeriod: 30\n",
            "KubeProxyConfiguration.configSyncPeriod: 30 is not a duration (like 30s or 1m0s)",
            id="duration-without-unit",
        ),
        pytest.param(
            KPC + "syncPeriod: -5s\n",
            "KubeProxyConfiguration.syncPeriod: -5s is negative",
            id="negative-duration",
        ),
        pytest.param(
            KPC + "conntrack: {tcpEstablishedTimeout: forever}\n",
            'KubeProxyConfiguration.conntrack.tcpEstablishedTimeout: "forever" is not a duration',
            id="bad-duration-in-ignored-field",
        ),
        pytest.param(
            KPC + "healthzBindAddress: example.com:10256\n",
            "KubeProxyConfiguration.healthzBindAddress: 'example.com' in 'example.com:10256' "
            "is not an IP address",
            id="bad-address",
        ),
        pytest.param(
            KPC + "metricsBindAddress: 'localhost'\n",
            "KubeProxyConfiguration.metricsBindAddress: 'localhost' is not IP:PORT",
            id="address-not-ip",
        ),
        pytest.param(
            KPC + "metricsBindAddress: 127.0.0.1:70000\n",
            "KubeProxyConfiguration.metricsBindAddress: port 70000 is out of range 0..65535",
            id="port-out-of-range",
        ),
        pytest.param(
            KPC + "nodePortAddresses: [10.0.0.1]\n",
            'KubeProxyConfiguration.nodePortAddresses: "10.0.0.1" is not a CIDR or one of '
            "primary, localhost, all",
            id="nodeport-address-not-cidr",
        ),
        pytest.param(
            KPC + "clusterCIDR: 10.0.0.0/8,bogus\n",
            'KubeProxyConfiguration.clusterCIDR: "bogus" in "10.0.0.0/8,bogus" is not a CIDR',
            id="bad-cluster-cidr",
        ),
        pytest.param(
            KPC + "hostnameOverride: '   '\n",
            'KubeProxyConfiguration.hostnameOverride: "   " is blank',
            id="blank-hostname",
        ),
        pytest.param(
            KPC + "iptables:\n  syncPeriode: 30s\nfoo: 1\n",
            "unknown fields KubeProxyConfiguration.iptables.syncPeriode, "
            "KubeProxyConfiguration.foo",
            id="unknown-fields",
        ),
        pytest.param(
            KPC + "metadata: {name: x}\n",
            "unknown field KubeProxyConfiguration.metadata",
            id="unknown-metadata",
        ),
        pytest.param(
            UPC + "syncPeriod: 30s\n",
            "unknown field UserProxyConfiguration.syncPeriod (set in the "
            "KubeProxyConfiguration document: syncPeriod -> syncPeriod or iptables.syncPeriod)",
            id="kube-proxy-field-in-userproxy-document",
        ),
        pytest.param(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n",
            'document 1: kind "KubeletConfiguration" is not KubeProxyConfiguration '
            "(kubeproxy.config.k8s.io/v1alpha1) or UserProxyConfiguration (userproxy.io/v1alpha1)",
            id="unknown-kind",
        ),
        pytest.param(
            "apiVersion: v1\nclusterCIDR: 10.0.0.0/8\n",
            "document 1: kind null is not",
            id="missing-kind",
        ),
        pytest.param(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n",
            'KubeProxyConfiguration: apiVersion "kubeproxy.config.k8s.io/v1alpha2" is not '
            "supported (use kubeproxy.config.k8s.io/v1alpha1)",
            id="wrong-api-version",
        ),
        pytest.param(
            "apiVersion: userproxy.io/v1\nkind: UserProxyConfiguration\n",
            'UserProxyConfiguration: apiVersion "userproxy.io/v1" is not supported '
            "(use userproxy.io/v1alpha1)",
            id="wrong-userproxy-api-version",
        ),
        pytest.param(
            f"{KPC}---\n{KPC}",
            "more than one KubeProxyConfiguration document",
            id="two-kube-proxy-documents",
        ),
        pytest.param(
            KPC + "hostnameOverride: [a, b]\n",
            'KubeProxyConfiguration.hostnameOverride: ["a", "b"] is not a string',
            id="list-where-string-expected",
        ),
        pytest.param(
            KPC + "nodePortAddresses: 10.0.0.0/8\n",
            'KubeProxyConfiguration.nodePortAddresses: "10.0.0.0/8" is not a list of strings',
            id="string-where-list-expected",
        ),
        pytest.param(
            KPC + "iptables: 30s\n",
            'KubeProxyConfiguration.iptables: "30s" is not a mapping',
            id="scalar-where-section-expected",
        ),
        pytest.param(
            KPC + "enableProfiling: 'yes please'\n",
            'KubeProxyConfiguration.enableProfiling: "yes please" is not true or false',
            id="wrong-type-in-ignored-field",
        ),
        pytest.param(
            KPC + "featureGates: {Foo: maybe}\n",
            "KubeProxyConfiguration.featureGates: ",
            id="bad-feature-gates",
        ),
        pytest.param(
            KPC + "clusterCIDR: 10.0.0.0/8\nclusterCIDR: 10.1.0.0/16\n",
            "line 4: field 'clusterCIDR' given twice",
            id="duplicate-field",
        ),
        pytest.param(
            KPC + "iptables:\n  syncPeriod: 30s\n minSyncPeriod: 1s\n",
            "line 5, column 2: YAML syntax error: ",
            id="yaml-syntax-error",
        ),
        pytest.param(
            KPC + "clusterCIDR: [10.0.0.0/8\n",
            "YAML syntax error",
            id="yaml-unclosed-flow",
        ),
        pytest.param("# nothing here\n", "no KubeProxyConfiguration or Use", id="empty-file"),
        pytest.param("- a\n- b\n", 'document 1: ["a", "b"] is not a mapping', id="not-a-mapping"),
        pytest.param(
            UPC + "loop: trio\n",
            'UserProxyConfiguration.loop: "trio" is not one of auto, uvloop, asyncio',
            id="bad-loop",
        ),
        pytest.param(
            UPC + "logLevel: verbose\n",
            'UserProxyConfiguration.logLevel: "verbose" is not one of',
            id="bad-log-level",
        ),
        pytest.param(
            UPC + "maxConnections: 0\n",
            "UserProxyConfiguration.maxConnections: 0 must be at least 1",
            id="max-connections-zero",
        ),
        pytest.param(
            UPC + "maxConnections: true\n",
            "UserProxyConfiguration.maxConnections: true is not an integer",
            id="max-connections-bool",
        ),
        pytest.param(
            UPC + "tcpIdleTimeout: 0s\n",
            "UserProxyConfiguration.tcpIdleTimeout: must be greater than 0",
            id="idle-timeout-zero",
        ),
        pytest.param(
            UPC + "manifests: /etc/manifests\n",
            'UserProxyConfiguration.manifests: "/etc/manifests" is not a list of strings',
            id="manifests-not-a-list",
        ),
    ],
)
def test_invalid_config(tmp_path: Path, text: str, message: str) -> None:
    assert message in error(tmp_path, text)


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    assert error(tmp_path, KPC + "iptables: {syncPeriod: abc}\n") == (
        f'{path}: KubeProxyConfiguration.iptables.syncPeriod: "abc" is not a duration '
        "(like 30s or 1m0s)"
    )


def test_unknown_fields_are_all_named(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    assert error(tmp_path, KPC + "iptables:\n  syncPeriode: 30s\nfoo: 1\n") == (
        f"{path}: unknown fields KubeProxyConfiguration.iptables.syncPeriode, "
        "KubeProxyConfiguration.foo"
    )


def test_kube_proxy_field_in_userproxy_document_points_home(tmp_path: Path) -> None:
    message = error(tmp_path, UPC + "syncPeriod: 30s\nkubeconfig: kc\n")
    assert message.endswith(
        "(set in the KubeProxyConfiguration document: syncPeriod -> syncPeriod or "
        "iptables.syncPeriod, kubeconfig -> clientConnection.kubeconfig)"
    )


def test_ipvs_scheduler_in_userproxy_document_points_home(tmp_path: Path) -> None:
    message = error(tmp_path, UPC + "ipvsScheduler: lc\n")
    assert message.endswith(
        "(set in the KubeProxyConfiguration document: ipvsScheduler -> ipvs.scheduler, "
        "with mode: ipvs)"
    )


def test_userproxy_balancer(tmp_path: Path) -> None:
    config = load(tmp_path, UPC + "balancer: power-of-two\n")
    assert dict(config.values) == {"balancer": "power-of-two"}
    assert config.applied == ("balancer",)


def test_refused_ipvs_scheduler_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    assert error(tmp_path, KPC + "mode: ipvs\nipvs: {scheduler: fo}\n").startswith(
        f"{path}: KubeProxyConfiguration.ipvs.scheduler: 'fo' has no close userproxy balancer: "
        "weighted failover"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read the config file"):
        load_config_file(path)


# --- Go durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("30s", 30.0, id="seconds"),
        pytest.param("1m0s", 60.0, id="go-formatted-minute"),
        pytest.param("15m0s", 900.0, id="go-formatted-15m"),
        pytest.param("24h0m0s", 86400.0, id="go-formatted-day"),
        pytest.param("1h2m3.5s", 3723.5, id="compound-fraction"),
        pytest.param("250ms", 0.25, id="milliseconds"),
        pytest.param("0s", 0.0, id="zero-seconds"),
        pytest.param("0", 0.0, id="bare-zero"),
        pytest.param("1.5h", 5400.0, id="fractional-hours"),
        pytest.param(".5s", 0.5, id="leading-dot"),
        pytest.param("1.s", 1.0, id="trailing-dot"),
        pytest.param("2h45m", 9900.0, id="hours-minutes"),
        pytest.param("300us", 0.0003, id="microseconds-us"),
        pytest.param("300\u00b5s", 0.0003, id="microseconds-micro-sign"),
        pytest.param("300\u03bcs", 0.0003, id="microseconds-mu"),
        pytest.param("100ns", 1e-7, id="nanoseconds"),
        pytest.param("+5s", 5.0, id="plus-sign"),
        pytest.param("-1m30s", -90.0, id="negative"),
        pytest.param("1s500ms", 1.5, id="mixed-units"),
    ],
)
def test_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("abc", id="letters"),
        pytest.param("30", id="missing-unit"),
        pytest.param("s", id="missing-number"),
        pytest.param("1x", id="unknown-unit"),
        pytest.param("1d", id="days-not-go"),
        pytest.param("1.5.5s", id="two-dots"),
        pytest.param("--1s", id="two-signs"),
        pytest.param("1 s", id="inner-space"),
        pytest.param(" 1s", id="leading-space"),
        pytest.param("1sm", id="unit-without-number"),
        pytest.param(".s", id="dot-only"),
        pytest.param("-", id="sign-only"),
        pytest.param("\u0661s", id="non-ascii-digit"),
    ],
)
def test_go_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)
