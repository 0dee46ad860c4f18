"""The ``--config`` file: kube-proxy's own ``KubeProxyConfiguration`` plus userproxy's settings.

A file holds one or two YAML documents: a ``KubeProxyConfiguration``
(``kubeproxy.config.k8s.io/v1alpha1``) exactly as written for kube-proxy, and/or a
``UserProxyConfiguration`` (``userproxy.io/v1alpha1``) with the settings kube-proxy has no field
for.  ``load_config_file`` reads and validates it into ``Settings`` field values; it does not
apply precedence (the CLI does: defaults < file < flags) and does not look at other files.
Its rules are kube-proxy's where it has one (docs/configuration.md lists them): strict
decoding of names and types, ignored fields included; ``null`` and ``""`` unset, and in a
``KubeProxyConfiguration`` a Go zero value too (kube-proxy defaults it); Go durations; the
sync periods of the top level, else of the section ``mode`` selects (``_applies``).

Each document has one table (``DOCUMENTS``): dotted field name -> (its ``Kind``, the
``Settings`` field it sets or None).  The range checks are not here: an applied value goes
through the setting's rule (``config.check_setting``), as a flag's value does.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

import yaml

from userproxy.config import ConfigError, check_setting
from userproxy.config_rules import boolean, integer, parse_go_duration, show, string

KUBE_PROXY_KIND: Final = "KubeProxyConfiguration"
KUBE_PROXY_API_VERSION: Final = "kubeproxy.config.k8s.io/v1alpha1"
USERPROXY_KIND: Final = "UserProxyConfiguration"
USERPROXY_API_VERSION: Final = "userproxy.io/v1alpha1"
__all__ = ["KUBE_PROXY_FIELDS", "USERPROXY_FIELDS", "FileConfig", "describe", "load_config_file"]


@dataclass(frozen=True, slots=True)
class FileConfig:
    """What a config file sets: ``values`` maps ``Settings`` fields to converted, validated
    values; ``applied`` and ``ignored`` are the dotted file field names (``iptables.
    minSyncPeriod``) honoured and not applied by userproxy, sorted."""

    values: Mapping[str, object]
    applied: tuple[str, ...]
    ignored: tuple[str, ...]
    #: ``Settings`` field -> the file field it came from (``KubeProxyConfiguration.iptables.
    #: syncPeriod``), to name that field, not a flag, when the value is rejected later.
    origins: Mapping[str, str] = field(default_factory=dict)


def describe(config: FileConfig) -> str:
    """The one-time log text: ``applied: a, b; ignored: c, d`` (``none`` for an empty list)."""
    applied = ", ".join(config.applied) or "none"
    ignored = ", ".join(config.ignored) or "none"
    return f"applied: {applied}; ignored: {ignored}"


# --- the kinds of field values ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """How a field's value is read.  ``read`` checks the YAML value and converts it (a Go
    duration to seconds, a list to a tuple; ``ValueError``: what is wrong), None for an empty
    list or map (unset).  ``is_zero`` tells Go's zero value of the type (``false``, ``0``,
    ``0s``), which kube-proxy replaces by its default: in a KubeProxyConfiguration it is
    unset too."""

    read: Callable[[object], object]
    is_zero: Callable[[object], bool] = operator.not_


def _number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{show(value)} is not a number")
    return value


def _duration(value: object) -> float:
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError:
            pass
        else:
            if seconds < 0:
                raise ValueError(f"{value} is negative")
            return seconds
    raise ValueError(f"{show(value)} is not a duration (like 30s or 1m0s)")


def _strings(value: object) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{show(value)} is not a list of strings")
    return tuple(item for item in value if isinstance(item, str)) or None


def _gates(value: object) -> object:
    if not isinstance(value, dict) or not all(
        isinstance(name, str) and isinstance(on, bool) for name, on in value.items()
    ):
        raise ValueError(f"{show(value)} is not a map of feature names to booleans")
    return value or None


def _is_zero(value: object) -> bool:
    """A Go zero value, looked for recursively (``logging.options`` as kubeadm writes it)."""
    if value in (None, False, 0, "", "0", "0s"):  # 0 == 0.0; True is not 0
        return True
    if isinstance(value, dict):
        return all(_is_zero(item) for item in value.values())
    if isinstance(value, list):
        return all(_is_zero(item) for item in value)
    return False


def _pointer(value: object) -> bool:
    """A Go pointer (``*int32``, ``*bool``) has no zero value: only null is unset."""
    return False


_STR, _BOOL, _INT, _NUMBER = Kind(string), Kind(boolean), Kind(integer), Kind(_number)
_OPTBOOL, _OPTINT = Kind(boolean, _pointer), Kind(integer, _pointer)
_DURATION, _OPTDURATION = Kind(_duration), Kind(_duration, _pointer)
_STRINGS, _GATES, _ANY = Kind(_strings), Kind(_gates), Kind(lambda value: value, _is_zero)

#: The fields of kube-proxy's v1alpha1 that a userspace proxy has no use for (current ones,
#: plus removed ones still found in deployed files), by kind.
_KUBE_PROXY_IGNORED: Final[Mapping[Kind, str]] = {
    _STR: "bindAddress clientConnection.acceptContentTypes clientConnection.contentType "
    "detectLocal.bridgeInterface detectLocal.interfaceNamePrefix detectLocalMode "
    "logging.format mode portRange resourceContainer "
    "showHiddenMetricsForVersion winkernel.networkName winkernel.rootHnsEndpointName "
    "winkernel.sourceVip",
    _BOOL: "bindAddressHardFail conntrack.tcpBeLiberal enableProfiling iptables.masqueradeAll "
    "ipvs.strictARP nftables.masqueradeAll windowsRunAsService winkernel.enableDSR "
    "winkernel.forwardHealthCheckVip",
    _OPTBOOL: "iptables.localhostNodePorts iptables.snatNodeInternalIP",
    _INT: "clientConnection.burst conntrack.max logging.verbosity",
    _OPTINT: "conntrack.maxPerCore conntrack.min iptables.masqueradeBit nftables.masqueradeBit "
    "oomScoreAdj",
    _NUMBER: "clientConnection.qps",
    _DURATION: "conntrack.udpStreamTimeout conntrack.udpTimeout ipvs.tcpFinTimeout "
    "ipvs.tcpTimeout ipvs.udpTimeout",
    _OPTDURATION: "conntrack.tcpCloseWaitTimeout conntrack.tcpEstablishedTimeout",
    _STRINGS: "ipvs.excludeCIDRs",
    _GATES: "featureGates",
    _ANY: "logging.flushFrequency logging.options logging.vmodule",
}

#: The KubeProxyConfiguration: the fields userproxy applies; the sync periods at the top level
#: (the layout of kube-proxy's internal config) and in each mode's section, of which one per
#: setting applies (``_applies``); and the ignored ones.
KUBE_PROXY_FIELDS: Final[Mapping[str, tuple[Kind, str | None]]] = {
    "clientConnection.kubeconfig": (_STR, "kubeconfig"),
    "hostnameOverride": (_STR, "hostname"),
    "healthzBindAddress": (_STR, "healthz_bind_address"),
    "metricsBindAddress": (_STR, "metrics_bind_address"),
    "clusterCIDR": (_STR, "cluster_cidr"),
    "nodePortAddresses": (_STRINGS, "nodeport_addresses"),
    "configSyncPeriod": (_DURATION, "config_sync_period"),
    "udpIdleTimeout": (_DURATION, "udp_idle_timeout"),
    # Read only with ``mode: ipvs`` (``_applies``), as kube-proxy uses it only there.
    "ipvs.scheduler": (_STR, "ipvs_scheduler"),
    **{
        f"{section}{name}": (_DURATION, setting)
        for section in ("", "iptables.", "ipvs.", "nftables.")
        for name, setting in (("syncPeriod", "sync_period"), ("minSyncPeriod", "min_sync_period"))
    },
    **{name: (kind, None) for kind, names in _KUBE_PROXY_IGNORED.items() for name in names.split()},
}

#: The UserProxyConfiguration's fields, by kind.  Each one sets the setting its name gives in
#: snake_case (``serviceProxyName``: ``service_proxy_name``).
_USERPROXY: Final[Mapping[Kind, str]] = {
    _STRINGS: "manifests",
    _STR: "serviceProxyName loop logLevel logFormat addressDevice balancer accessLog "
    "accessLogFormat handoffSocket",
    _DURATION: "shutdownGrace tcpFinTimeout tcpIdleTimeout outlierBaseEjection outlierMaxEjection "
    "endpointDrain",
    _INT: "maxConnections serviceConnectionShare clientConnectionShare udpMaxSessions "
    "udpSessionRate outlierConsecutiveFailures outlierMaxEjectedPercent workers",
    _BOOL: "manageAddresses",
}
USERPROXY_FIELDS: Final[Mapping[str, tuple[Kind, str | None]]] = {
    name: (kind, re.sub("([A-Z])", r"_\1", name).lower())
    for kind, names in _USERPROXY.items()
    for name in names.split()
}

# Settings that belong in the KubeProxyConfiguration document, for a helpful error.
_KUBE_PROXY_HOME: Final[Mapping[str, str]] = {
    "kubeconfig": "clientConnection.kubeconfig",
    "hostname": "hostnameOverride",
    "hostnameOverride": "hostnameOverride",
    "syncPeriod": "syncPeriod or iptables.syncPeriod",
    "minSyncPeriod": "minSyncPeriod or iptables.minSyncPeriod",
    "configSyncPeriod": "configSyncPeriod",
    "healthzBindAddress": "healthzBindAddress",
    "metricsBindAddress": "metricsBindAddress",
    "nodePortAddresses": "nodePortAddresses",
    "nodeportAddresses": "nodePortAddresses",
    "clusterCIDR": "clusterCIDR",
    "clusterCidr": "clusterCIDR",
    "ipvsScheduler": "ipvs.scheduler, with mode: ipvs",
    "scheduler": "ipvs.scheduler, with mode: ipvs",
}


_MODE_SECTIONS: Final = frozenset({"iptables", "ipvs", "nftables"})


@dataclass(frozen=True, slots=True)
class _Document:
    """A kind of document: its apiVersion; its table; whether a Go zero value means unset
    (kube-proxy's defaulting); where its unknown fields belong, for the error."""

    api_version: str
    fields: Mapping[str, tuple[Kind, str | None]]
    zero_is_unset: bool
    hints: Mapping[str, str] = field(default_factory=dict)


DOCUMENTS: Final[Mapping[str, _Document]] = {
    KUBE_PROXY_KIND: _Document(KUBE_PROXY_API_VERSION, KUBE_PROXY_FIELDS, zero_is_unset=True),
    USERPROXY_KIND: _Document(
        USERPROXY_API_VERSION, USERPROXY_FIELDS, zero_is_unset=False, hints=_KUBE_PROXY_HOME
    ),
}


# --- reading ------------------------------------------------------------------------------


def _reject_duplicate_keys(node: yaml.Node, where: str, seen: set[int]) -> None:
    """kube-proxy's strict decoding rejects a field given twice; PyYAML keeps the last one."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[object] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in keys:
                    line = key_node.start_mark.line + 1
                    raise ConfigError(f"{where}: line {line}: field {key_node.value!r} given twice")
                keys.add(key_node.value)
            _reject_duplicate_keys(value_node, where, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _reject_duplicate_keys(item, where, seen)


def _read_documents(path: Path) -> list[object]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    loader = yaml.SafeLoader(text)
    documents: list[object] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                _reject_duplicate_keys(node, str(path), set())
                documents.append(loader.construct_document(node))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{path}: {at}YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    return [document for document in documents if document is not None]


# --- checking a document -----------------------------------------------------------------


def _flatten(
    document: Mapping[object, object], table: _Document, where: str
) -> tuple[dict[str, object], list[str]]:
    """The leaf values by dotted name, and the dotted names of unknown fields."""
    leaves: dict[str, object] = {}
    unknown: list[str] = []
    sections = frozenset(name.rpartition(".")[0] for name in table.fields if "." in name)

    def walk(mapping: Mapping[object, object], prefix: str) -> None:
        for key, value in mapping.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}.{prefix}{show(key)}: a field name must be a string")
            dotted = prefix + key
            if dotted in table.fields:
                leaves[dotted] = value
            elif dotted in sections:
                if isinstance(value, dict):
                    walk(value, dotted + ".")
                elif value is not None:
                    raise ConfigError(f"{where}.{dotted}: {show(value)} is not a mapping")
            else:
                unknown.append(dotted)

    walk(document, "")
    return leaves, unknown


def _check(kind: Kind, value: object, where: str, zero_is_unset: bool) -> object | None:
    """The value read as its kind, or None when it counts as unset."""
    if value is None or (isinstance(value, str) and value == ""):
        return None
    try:
        value = kind.read(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return None if value is None or (zero_is_unset and kind.is_zero(value)) else value


def _set_fields(
    document: Mapping[object, object], table: _Document, file: str, kind: str
) -> dict[str, object]:
    """The set fields of a document, by dotted name, after strict name and type checks."""
    where = f"{file}: {kind}"
    leaves, unknown = _flatten(document, table, where)
    if unknown:
        names = ", ".join(f"{kind}.{name}" for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        message = f"{file}: unknown field{plural} {names}"
        homes = [f"{name} -> {table.hints[name]}" for name in unknown if name in table.hints]
        if homes:
            message += f" (set in the {KUBE_PROXY_KIND} document: {', '.join(homes)})"
        raise ConfigError(message)
    checked = {
        name: _check(table.fields[name][0], raw, f"{where}.{name}", table.zero_is_unset)
        for name, raw in leaves.items()
    }
    return {name: value for name, value in checked.items() if value is not None}


def _applies(name: str, present: Mapping[str, object]) -> bool:
    """Whether a set field that has a setting is the one applied: a field of a mode's
    section (``iptables.syncPeriod``, ``ipvs.scheduler``) only in the section ``mode``
    selects (``ipvs``, ``nftables``, else ``iptables``) and only without the top-level
    field, as kube-proxy."""
    section, _, leaf = name.rpartition(".")
    if section not in _MODE_SECTIONS:
        return True
    mode = present.get("mode")
    return section == (mode if mode in ("ipvs", "nftables") else "iptables") and leaf not in present


def load_config_file(path: Path) -> FileConfig:
    """Read and validate a config file; raises ``ConfigError`` naming the file and field."""
    documents = _read_documents(path)
    if not documents:
        raise ConfigError(f"{path}: no {KUBE_PROXY_KIND} or {USERPROXY_KIND} document")
    values: dict[str, object] = {}
    origins: dict[str, str] = {}
    applied: list[str] = []
    ignored: list[str] = []
    seen: set[str] = set()
    for number, document in enumerate(documents, start=1):
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: document {number}: {show(document)} is not a mapping")
        body = dict(document)
        kind, api_version = body.pop("kind", None), body.pop("apiVersion", None)
        if not isinstance(kind, str) or kind not in DOCUMENTS:
            raise ConfigError(
                f"{path}: document {number}: kind {show(kind)} is not {KUBE_PROXY_KIND} "
                f"({KUBE_PROXY_API_VERSION}) or {USERPROXY_KIND} ({USERPROXY_API_VERSION})"
            )
        table = DOCUMENTS[kind]
        if api_version != table.api_version:
            raise ConfigError(
                f"{path}: {kind}: apiVersion {show(api_version)} is not supported "
                f"(use {table.api_version})"
            )
        if kind in seen:
            raise ConfigError(f"{path}: more than one {kind} document")
        seen.add(kind)
        present = _set_fields(body, table, str(path), kind)
        for name, value in present.items():
            setting = table.fields[name][1]
            if setting is None or not _applies(name, present):
                ignored.append(name)
                continue
            values[setting] = check_setting(setting, value, f"{path}: {kind}.{name}")
            origins[setting] = f"{kind}.{name}"
            applied.append(name)
    return FileConfig(
        values=MappingProxyType(values),
        applied=tuple(sorted(applied)),
        ignored=tuple(sorted(ignored)),
        origins=MappingProxyType(origins),
    )
