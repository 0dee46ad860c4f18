"""The ``--config`` file: kube-proxy's own ``KubeProxyConfiguration`` plus userproxy's settings.

A file holds one or two YAML documents: a ``KubeProxyConfiguration``
(``kubeproxy.config.k8s.io/v1alpha1``) exactly as written for kube-proxy, and/or a
``UserProxyConfiguration`` (``userproxy.io/v1alpha1``) with the settings kube-proxy has no field
for.  ``load_config_file`` reads and validates it into ``Settings`` field values; it does not
apply precedence (the CLI does: defaults < file < flags) and does not look at other files.

Rules, matching kube-proxy where it has one (see docs/configuration.md):

- Field names are decoded strictly: an unknown field, kind or apiVersion is an error, and so is
  a value of the wrong type, in honoured and ignored fields alike.
- ``null`` and ``""`` mean unset.  In a ``KubeProxyConfiguration`` a Go zero value (``0s``,
  ``0``, ``false``, ``[]``) also means unset, because kube-proxy substitutes its default for it
  (``kubeadm`` writes such files); such fields are neither applied nor listed as ignored.
- Durations are Go durations (``30s``, ``1m0s``, ``1h2m3.5s``, ``250ms``).
- ``syncPeriod``/``minSyncPeriod``: the top-level field if set (the layout of kube-proxy's
  internal config and of the proposed v1alpha2), else the one of the section ``mode`` selects
  (``ipvs``, ``nftables``; anything else: ``iptables``), as kube-proxy itself does.  Every other
  non-zero one is listed as ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

import yaml

from userproxy.config import (
    DEFAULT_HEALTHZ_PORT,
    DEFAULT_METRICS_PORT,
    ConfigError,
    check_setting,
    show,
)

KUBE_PROXY_KIND: Final = "KubeProxyConfiguration"
KUBE_PROXY_API_VERSION: Final = "kubeproxy.config.k8s.io/v1alpha1"
USERPROXY_KIND: Final = "UserProxyConfiguration"
USERPROXY_API_VERSION: Final = "userproxy.io/v1alpha1"
API_VERSIONS: Final[Mapping[str, str]] = {
    KUBE_PROXY_KIND: KUBE_PROXY_API_VERSION,
    USERPROXY_KIND: USERPROXY_API_VERSION,
}
__all__ = [
    "DEFAULT_HEALTHZ_PORT",
    "DEFAULT_METRICS_PORT",
    "KUBE_PROXY_FIELDS",
    "USERPROXY_FIELDS",
    "FileConfig",
    "describe",
    "load_config_file",
    "parse_go_duration",
]


@dataclass(frozen=True, slots=True)
class FileConfig:
    """What a config file sets.

    ``values`` maps ``Settings`` field names to converted, validated values (float seconds,
    ``Path``, tuples, int, str); ``applied`` and ``ignored`` are the dotted file field names
    (``iptables.minSyncPeriod``) that were honoured and that userproxy does not apply, sorted.
    """

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


# --- Go durations -------------------------------------------------------------------------

_DURATION_UNITS: Final[Mapping[str, float]] = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART: Final = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go ``time.ParseDuration`` string (``1h2m3.5s``, ``250ms``, ``0``).

    Raises ``ValueError`` for anything Go rejects.  Negative values are returned as such.
    """
    rest, sign = text, 1.0
    if rest[:1] in ("+", "-"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total, position = 0.0, 0
    while position < len(rest):
        match = _DURATION_PART.match(rest, position)
        if match is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return sign * total


# --- schemas ------------------------------------------------------------------------------

# Value kinds.  "opt" kinds are Go pointers: only null is unset, a zero is a real value.
_STR, _BOOL, _OPTBOOL, _INT, _OPTINT, _NUMBER = "str", "bool", "optbool", "int", "optint", "num"
_DURATION, _OPTDURATION, _STRINGS, _GATES, _ANY = "dur", "optdur", "strings", "gates", "any"

# One table per document: dotted field name -> (the value's kind, the Settings field it sets,
# or None when ignored).  The KubeProxyConfiguration's lists every field kube-proxy's v1alpha1
# has had (current ones, plus removed ones still found in deployed files, plus the top-level
# sync periods of its internal config); its sync periods are None here because the one that
# applies depends on ``mode`` (``_SYNC_SECTIONS``).  Each set value goes through the setting's
# one rule (``config.check_setting``), the same the flag's value goes through.
KUBE_PROXY_FIELDS: Final[Mapping[str, tuple[str, str | None]]] = {
    "featureGates": (_GATES, None),
    "clientConnection.kubeconfig": (_STR, "kubeconfig"),
    "clientConnection.acceptContentTypes": (_STR, None),
    "clientConnection.contentType": (_STR, None),
    "clientConnection.qps": (_NUMBER, None),
    "clientConnection.burst": (_INT, None),
    "logging.format": (_STR, None),
    "logging.flushFrequency": (_ANY, None),
    "logging.verbosity": (_INT, None),
    "logging.vmodule": (_ANY, None),
    "logging.options": (_ANY, None),
    "hostnameOverride": (_STR, "hostname"),
    "bindAddress": (_STR, None),
    "healthzBindAddress": (_STR, "healthz_bind_address"),
    "metricsBindAddress": (_STR, "metrics_bind_address"),
    "bindAddressHardFail": (_BOOL, None),
    "enableProfiling": (_BOOL, None),
    "showHiddenMetricsForVersion": (_STR, None),
    "mode": (_STR, None),
    "syncPeriod": (_DURATION, None),
    "minSyncPeriod": (_DURATION, None),
    "iptables.masqueradeBit": (_OPTINT, None),
    "iptables.masqueradeAll": (_BOOL, None),
    "iptables.localhostNodePorts": (_OPTBOOL, None),
    "iptables.snatNodeInternalIP": (_OPTBOOL, None),
    "iptables.syncPeriod": (_DURATION, None),
    "iptables.minSyncPeriod": (_DURATION, None),
    "ipvs.syncPeriod": (_DURATION, None),
    "ipvs.minSyncPeriod": (_DURATION, None),
    "ipvs.scheduler": (_STR, None),
    "ipvs.excludeCIDRs": (_STRINGS, None),
    "ipvs.strictARP": (_BOOL, None),
    "ipvs.tcpTimeout": (_DURATION, None),
    "ipvs.tcpFinTimeout": (_DURATION, None),
    "ipvs.udpTimeout": (_DURATION, None),
    "nftables.masqueradeBit": (_OPTINT, None),
    "nftables.masqueradeAll": (_BOOL, None),
    "nftables.syncPeriod": (_DURATION, None),
    "nftables.minSyncPeriod": (_DURATION, None),
    "winkernel.networkName": (_STR, None),
    "winkernel.sourceVip": (_STR, None),
    "winkernel.enableDSR": (_BOOL, None),
    "winkernel.rootHnsEndpointName": (_STR, None),
    "winkernel.forwardHealthCheckVip": (_BOOL, None),
    "detectLocalMode": (_STR, None),
    "detectLocal.bridgeInterface": (_STR, None),
    "detectLocal.interfaceNamePrefix": (_STR, None),
    "clusterCIDR": (_STR, "cluster_cidr"),
    "nodePortAddresses": (_STRINGS, "nodeport_addresses"),
    "oomScoreAdj": (_OPTINT, None),
    "conntrack.max": (_INT, None),
    "conntrack.maxPerCore": (_OPTINT, None),
    "conntrack.min": (_OPTINT, None),
    "conntrack.tcpEstablishedTimeout": (_OPTDURATION, None),
    "conntrack.tcpCloseWaitTimeout": (_OPTDURATION, None),
    "conntrack.tcpBeLiberal": (_BOOL, None),
    "conntrack.udpTimeout": (_DURATION, None),
    "conntrack.udpStreamTimeout": (_DURATION, None),
    "configSyncPeriod": (_DURATION, "config_sync_period"),
    "portRange": (_STR, None),
    "udpIdleTimeout": (_DURATION, "udp_idle_timeout"),
    "resourceContainer": (_STR, None),
    "windowsRunAsService": (_BOOL, None),
}

USERPROXY_FIELDS: Final[Mapping[str, tuple[str, str | None]]] = {
    "manifests": (_STRINGS, "manifests"),
    "serviceProxyName": (_STR, "service_proxy_name"),
    "loop": (_STR, "loop"),
    "logLevel": (_STR, "log_level"),
    "logFormat": (_STR, "log_format"),
    "shutdownGrace": (_DURATION, "shutdown_grace"),
    "tcpFinTimeout": (_DURATION, "tcp_fin_timeout"),
    "tcpIdleTimeout": (_DURATION, "tcp_idle_timeout"),
    "maxConnections": (_INT, "max_connections"),
    "serviceConnectionShare": (_INT, "service_connection_share"),
    "clientConnectionShare": (_INT, "client_connection_share"),
    "udpMaxSessions": (_INT, "udp_max_sessions"),
    "udpSessionRate": (_INT, "udp_session_rate"),
    "manageAddresses": (_BOOL, "manage_addresses"),
    "addressDevice": (_STR, "address_device"),
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
}


def _sections(schema: Mapping[str, tuple[str, str | None]]) -> frozenset[str]:
    return frozenset(name.rpartition(".")[0] for name in schema if "." in name)


# --- reading ------------------------------------------------------------------------------


_show = show


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
            if node is None:
                continue
            _reject_duplicate_keys(node, str(path), set())
            document: object = loader.construct_document(node)
            documents.append(document)
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


# --- generic validation -------------------------------------------------------------------


def _flatten(
    document: Mapping[object, object],
    schema: Mapping[str, tuple[str, str | None]],
    sections: frozenset[str],
    where: str,
) -> tuple[dict[str, object], list[str]]:
    """The leaf values by dotted name, and the dotted names of unknown fields."""
    leaves: dict[str, object] = {}
    unknown: list[str] = []

    def walk(mapping: Mapping[object, object], prefix: str) -> None:
        for key, value in mapping.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}.{prefix}{_show(key)}: a field name must be a string")
            dotted = prefix + key
            if dotted in schema:
                leaves[dotted] = value
            elif dotted in sections:
                if isinstance(value, dict):
                    walk(value, dotted + ".")
                elif value is not None:
                    raise ConfigError(f"{where}.{dotted}: {_show(value)} is not a mapping")
            else:
                unknown.append(dotted)

    walk(document, "")
    return leaves, unknown


def _is_zero(value: object) -> bool:
    """A Go zero value, looked for recursively (``logging.options`` as kubeadm writes it)."""
    if value is None or value is False or value in ("", "0", "0s"):
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, dict):
        return all(_is_zero(item) for item in value.values())
    if isinstance(value, list):
        return all(_is_zero(item) for item in value)
    return False


def _duration(value: object, where: str) -> float:
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError:
            pass
        else:
            if seconds < 0:
                raise ConfigError(f"{where}: {value} is negative")
            return seconds
    raise ConfigError(f"{where}: {_show(value)} is not a duration (like 30s or 1m0s)")


def _check(kind: str, value: object, where: str, zero_is_unset: bool) -> object | None:
    """The value checked against its kind, or None when it counts as unset."""
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if kind == _STR:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {_show(value)} is not a string")
        return value
    if kind in (_BOOL, _OPTBOOL):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {_show(value)} is not true or false")
        return None if zero_is_unset and kind == _BOOL and not value else value
    if kind in (_INT, _OPTINT):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {_show(value)} is not an integer")
        return None if zero_is_unset and kind == _INT and value == 0 else value
    if kind == _NUMBER:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {_show(value)} is not a number")
        return None if zero_is_unset and value == 0 else value
    if kind in (_DURATION, _OPTDURATION):
        seconds = _duration(value, where)
        return None if zero_is_unset and kind == _DURATION and seconds == 0 else seconds
    if kind == _STRINGS:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: {_show(value)} is not a list of strings")
        items = tuple(item for item in value if isinstance(item, str))
        return items or None
    if kind == _GATES:
        if not isinstance(value, dict) or not all(
            isinstance(name, str) and isinstance(on, bool) for name, on in value.items()
        ):
            raise ConfigError(f"{where}: {_show(value)} is not a map of feature names to booleans")
        return value or None
    return None if zero_is_unset and _is_zero(value) else value


def _checked_leaves(
    document: Mapping[object, object],
    schema: Mapping[str, tuple[str, str | None]],
    file: str,
    kind: str,
    *,
    zero_is_unset: bool,
    hints: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """The set fields of a document, by dotted name, after strict name and type checks."""
    where = f"{file}: {kind}"
    leaves, unknown = _flatten(document, schema, _sections(schema), where)
    if unknown:
        names = ", ".join(f"{kind}.{name}" for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        message = f"{file}: unknown field{plural} {names}"
        homes = [f"{name} -> {hints[name]}" for name in unknown if hints and name in hints]
        if homes:
            message += f" (set in the {KUBE_PROXY_KIND} document: {', '.join(homes)})"
        raise ConfigError(message)
    present: dict[str, object] = {}
    for name, raw in leaves.items():
        value = _check(schema[name][0], raw, f"{where}.{name}", zero_is_unset)
        if value is not None:
            present[name] = value
    return present


# --- applying the honoured fields ------------------------------------------------------


_SYNC_SECTIONS: Final[Mapping[str, str]] = {"ipvs": "ipvs", "nftables": "nftables"}


def _apply(
    setting: str,
    name: str,
    value: object,
    *,
    where: str,
    values: dict[str, object],
    origins: dict[str, str],
) -> None:
    """Set ``setting`` from the file field ``name`` (dotted, with its kind) after its rule."""
    values[setting] = check_setting(setting, value, f"{where}.{name}")
    origins[setting] = f"{where.partition(': ')[2]}.{name}"


def _kube_proxy(
    document: Mapping[object, object],
    file: str,
    values: dict[str, object],
    origins: dict[str, str],
) -> tuple[list[str], list[str]]:
    present = _checked_leaves(
        document, KUBE_PROXY_FIELDS, file, KUBE_PROXY_KIND, zero_is_unset=True
    )
    where = f"{file}: {KUBE_PROXY_KIND}"
    applied: list[str] = []
    mode = present.get("mode")
    section = _SYNC_SECTIONS.get(mode, "iptables") if isinstance(mode, str) else "iptables"
    for name, setting in (("syncPeriod", "sync_period"), ("minSyncPeriod", "min_sync_period")):
        for candidate in (name, f"{section}.{name}"):
            if candidate in present:
                _apply(
                    setting,
                    candidate,
                    present[candidate],
                    where=where,
                    values=values,
                    origins=origins,
                )
                applied.append(candidate)
                break
    for name, value in present.items():
        honoured = KUBE_PROXY_FIELDS[name][1]
        if honoured is not None:
            _apply(honoured, name, value, where=where, values=values, origins=origins)
            applied.append(name)
    ignored = [name for name in present if name not in applied]
    return applied, ignored


def _userproxy(
    document: Mapping[object, object],
    file: str,
    values: dict[str, object],
    origins: dict[str, str],
) -> list[str]:
    present = _checked_leaves(
        document,
        USERPROXY_FIELDS,
        file,
        USERPROXY_KIND,
        zero_is_unset=False,
        hints=_KUBE_PROXY_HOME,
    )
    where = f"{file}: {USERPROXY_KIND}"
    for name, value in present.items():
        setting = USERPROXY_FIELDS[name][1]
        assert setting is not None  # every UserProxyConfiguration field is honoured
        _apply(setting, name, value, where=where, values=values, origins=origins)
    return list(present)


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
            raise ConfigError(f"{path}: document {number}: {_show(document)} is not a mapping")
        body = dict(document)
        kind, api_version = body.pop("kind", None), body.pop("apiVersion", None)
        if not isinstance(kind, str) or kind not in API_VERSIONS:
            raise ConfigError(
                f"{path}: document {number}: kind {_show(kind)} is not {KUBE_PROXY_KIND} "
                f"({KUBE_PROXY_API_VERSION}) or {USERPROXY_KIND} ({USERPROXY_API_VERSION})"
            )
        if api_version != API_VERSIONS[kind]:
            raise ConfigError(
                f"{path}: {kind}: apiVersion {_show(api_version)} is not supported "
                f"(use {API_VERSIONS[kind]})"
            )
        if kind in seen:
            raise ConfigError(f"{path}: more than one {kind} document")
        seen.add(kind)
        if kind == KUBE_PROXY_KIND:
            kube_applied, kube_ignored = _kube_proxy(body, str(path), values, origins)
            applied += kube_applied
            ignored += kube_ignored
        else:
            applied += _userproxy(body, str(path), values, origins)
    return FileConfig(
        values=MappingProxyType(values),
        applied=tuple(sorted(applied)),
        ignored=tuple(sorted(ignored)),
        origins=MappingProxyType(origins),
    )
