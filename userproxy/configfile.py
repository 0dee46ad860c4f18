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

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

import yaml

from userproxy.config import LOG_FORMATS, LOG_LEVELS, LOOPS, ConfigError, parse_host_port

KUBE_PROXY_KIND: Final = "KubeProxyConfiguration"
KUBE_PROXY_API_VERSION: Final = "kubeproxy.config.k8s.io/v1alpha1"
USERPROXY_KIND: Final = "UserProxyConfiguration"
USERPROXY_API_VERSION: Final = "userproxy.io/v1alpha1"
API_VERSIONS: Final[Mapping[str, str]] = {
    KUBE_PROXY_KIND: KUBE_PROXY_API_VERSION,
    USERPROXY_KIND: USERPROXY_API_VERSION,
}
# kube-proxy appends these to a healthz/metrics address given without a port.
DEFAULT_HEALTHZ_PORT: Final = 10256
DEFAULT_METRICS_PORT: Final = 10249


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

# Every field kube-proxy's v1alpha1 has had (current ones, plus removed ones still found in
# deployed files, plus the top-level sync periods of its internal config), by dotted name.
KUBE_PROXY_FIELDS: Final[Mapping[str, str]] = {
    "featureGates": _GATES,
    "clientConnection.kubeconfig": _STR,
    "clientConnection.acceptContentTypes": _STR,
    "clientConnection.contentType": _STR,
    "clientConnection.qps": _NUMBER,
    "clientConnection.burst": _INT,
    "logging.format": _STR,
    "logging.flushFrequency": _ANY,
    "logging.verbosity": _INT,
    "logging.vmodule": _ANY,
    "logging.options": _ANY,
    "hostnameOverride": _STR,
    "bindAddress": _STR,
    "healthzBindAddress": _STR,
    "metricsBindAddress": _STR,
    "bindAddressHardFail": _BOOL,
    "enableProfiling": _BOOL,
    "showHiddenMetricsForVersion": _STR,
    "mode": _STR,
    "syncPeriod": _DURATION,
    "minSyncPeriod": _DURATION,
    "iptables.masqueradeBit": _OPTINT,
    "iptables.masqueradeAll": _BOOL,
    "iptables.localhostNodePorts": _OPTBOOL,
    "iptables.snatNodeInternalIP": _OPTBOOL,
    "iptables.syncPeriod": _DURATION,
    "iptables.minSyncPeriod": _DURATION,
    "ipvs.syncPeriod": _DURATION,
    "ipvs.minSyncPeriod": _DURATION,
    "ipvs.scheduler": _STR,
    "ipvs.excludeCIDRs": _STRINGS,
    "ipvs.strictARP": _BOOL,
    "ipvs.tcpTimeout": _DURATION,
    "ipvs.tcpFinTimeout": _DURATION,
    "ipvs.udpTimeout": _DURATION,
    "nftables.masqueradeBit": _OPTINT,
    "nftables.masqueradeAll": _BOOL,
    "nftables.syncPeriod": _DURATION,
    "nftables.minSyncPeriod": _DURATION,
    "winkernel.networkName": _STR,
    "winkernel.sourceVip": _STR,
    "winkernel.enableDSR": _BOOL,
    "winkernel.rootHnsEndpointName": _STR,
    "winkernel.forwardHealthCheckVip": _BOOL,
    "detectLocalMode": _STR,
    "detectLocal.bridgeInterface": _STR,
    "detectLocal.interfaceNamePrefix": _STR,
    "clusterCIDR": _STR,
    "nodePortAddresses": _STRINGS,
    "oomScoreAdj": _OPTINT,
    "conntrack.max": _INT,
    "conntrack.maxPerCore": _OPTINT,
    "conntrack.min": _OPTINT,
    "conntrack.tcpEstablishedTimeout": _OPTDURATION,
    "conntrack.tcpCloseWaitTimeout": _OPTDURATION,
    "conntrack.tcpBeLiberal": _BOOL,
    "conntrack.udpTimeout": _DURATION,
    "conntrack.udpStreamTimeout": _DURATION,
    "configSyncPeriod": _DURATION,
    "portRange": _STR,
    "udpIdleTimeout": _DURATION,
    "resourceContainer": _STR,
    "windowsRunAsService": _BOOL,
}

USERPROXY_FIELDS: Final[Mapping[str, str]] = {
    "manifests": _STRINGS,
    "serviceProxyName": _STR,
    "loop": _STR,
    "logLevel": _STR,
    "logFormat": _STR,
    "shutdownGrace": _DURATION,
    "tcpFinTimeout": _DURATION,
    "tcpIdleTimeout": _DURATION,
    "maxConnections": _INT,
    "udpMaxSessions": _INT,
    "udpSessionRate": _INT,
    "manageAddresses": _BOOL,
    "addressDevice": _STR,
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


def _sections(schema: Mapping[str, str]) -> frozenset[str]:
    return frozenset(name.rpartition(".")[0] for name in schema if "." in name)


# --- reading ------------------------------------------------------------------------------


def _show(value: object) -> str:
    """A value as it would be written in the file, for messages."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # a self-referencing YAML alias
        return repr(value)


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
    schema: Mapping[str, str],
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
                raise ConfigError(f"{where}: {_show(value)} is negative")
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
    schema: Mapping[str, str],
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
        value = _check(schema[name], raw, f"{where}.{name}", zero_is_unset)
        if value is not None:
            present[name] = value
    return present


# --- converters for honoured fields -------------------------------------------------------


def _bind_address(default_port: int) -> Callable[[object, str], object]:
    """kube-proxy's rule: an address without a port gets the default port appended."""

    def convert(value: object, where: str) -> object:
        assert isinstance(value, str)
        text = value.strip()
        bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            pass
        else:
            text = (
                f"[{address}]:{default_port}"
                if address.version == 6
                else f"{address}:{default_port}"
            )
        parse_host_port(text, where)
        return text

    return convert


def _hostname(value: object, where: str) -> object:
    assert isinstance(value, str)
    name = value.strip().lower()  # kube-proxy's GetHostname trims and lowercases
    if not name:
        raise ConfigError(f"{where}: {_show(value)} is blank")
    return name


def _path(value: object, where: str) -> object:
    assert isinstance(value, str)
    return Path(value)


def _seconds(value: object, where: str) -> object:
    assert isinstance(value, float)
    return value


def _positive_seconds(value: object, where: str) -> object:
    assert isinstance(value, float)
    if value <= 0:
        raise ConfigError(f"{where}: must be greater than 0 (omit it for the default)")
    return value


_NODEPORT_KEYWORDS: Final[Mapping[str, tuple[str, ...]]] = {
    "localhost": ("127.0.0.0/8", "::1/128"),
    "all": ("0.0.0.0/0", "::/0"),
}


def _nodeport_addresses(value: object, where: str) -> object:
    assert isinstance(value, tuple)
    result: list[str] = []
    for index, item in enumerate(value):
        assert isinstance(item, str)
        entry = item.strip()
        if entry == "primary":
            expanded: tuple[str, ...] = (entry,)
        elif entry in _NODEPORT_KEYWORDS:
            expanded = _NODEPORT_KEYWORDS[entry]
        else:
            try:
                if "/" not in entry:
                    raise ValueError(entry)
                expanded = (str(ipaddress.ip_network(entry, strict=False)),)
            except ValueError:
                raise ConfigError(
                    f"{where}[{index}]: {_show(item)} is not a CIDR or one of "
                    "primary, localhost, all"
                ) from None
        result.extend(cidr for cidr in expanded if cidr not in result)
    return tuple(result)


def _cluster_cidr(value: object, where: str) -> object:
    assert isinstance(value, str)
    cidrs = [cidr.strip() for cidr in value.split(",")]
    if len(cidrs) > 2:
        raise ConfigError(f"{where}: {_show(value)} has more than two (a dual-stack pair) CIDRs")
    for cidr in cidrs:
        try:
            if "/" not in cidr:
                raise ValueError(cidr)
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"{where}: {_show(cidr)} in {_show(value)} is not a CIDR") from None
    return ",".join(cidrs)


def _manifests(value: object, where: str) -> object:
    assert isinstance(value, tuple)
    paths: list[Path] = []
    for index, item in enumerate(value):
        assert isinstance(item, str)
        if not item.strip():
            raise ConfigError(f"{where}[{index}]: an empty path")
        paths.append(Path(item))
    return tuple(paths)


def _choice(choices: tuple[str, ...]) -> Callable[[object, str], object]:
    def convert(value: object, where: str) -> object:
        if value not in choices:
            raise ConfigError(f"{where}: {_show(value)} is not one of {', '.join(choices)}")
        return value

    return convert


def _text(value: object, where: str) -> object:
    assert isinstance(value, str)
    return value


def _max_connections(value: object, where: str) -> object:
    assert isinstance(value, int)
    if value < 1:
        raise ConfigError(f"{where}: {value} must be at least 1 (omit it for the default)")
    return value


def _non_negative_rate(value: object, where: str) -> object:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}: {_show(value)} is not a rate >= 0 (0: unlimited)")
    return float(value)


def _flag_value(value: object, where: str) -> object:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {_show(value)} is not true or false")
    return value


# KubeProxyConfiguration field -> (Settings field, converter); the sync periods are chosen
# separately.
_KUBE_PROXY_HONOURED: Final[Mapping[str, tuple[str, Callable[[object, str], object]]]] = {
    "hostnameOverride": ("hostname", _hostname),
    "healthzBindAddress": ("healthz_bind_address", _bind_address(DEFAULT_HEALTHZ_PORT)),
    "metricsBindAddress": ("metrics_bind_address", _bind_address(DEFAULT_METRICS_PORT)),
    "clientConnection.kubeconfig": ("kubeconfig", _path),
    "configSyncPeriod": ("config_sync_period", _seconds),
    "nodePortAddresses": ("nodeport_addresses", _nodeport_addresses),
    "clusterCIDR": ("cluster_cidr", _cluster_cidr),
    # The old userspace mode's own field: exactly userproxy's UDP session idle timeout.
    "udpIdleTimeout": ("udp_idle_timeout", _positive_seconds),
}

_USERPROXY_HONOURED: Final[Mapping[str, tuple[str, Callable[[object, str], object]]]] = {
    "manifests": ("manifests", _manifests),
    "serviceProxyName": ("service_proxy_name", _text),
    "loop": ("loop", _choice(LOOPS)),
    "logLevel": ("log_level", _choice(LOG_LEVELS)),
    "logFormat": ("log_format", _choice(LOG_FORMATS)),
    "shutdownGrace": ("shutdown_grace", _seconds),
    "tcpFinTimeout": ("tcp_fin_timeout", _seconds),
    "tcpIdleTimeout": ("tcp_idle_timeout", _positive_seconds),
    "maxConnections": ("max_connections", _max_connections),
    "udpMaxSessions": ("udp_max_sessions", _max_connections),
    "udpSessionRate": ("udp_session_rate", _non_negative_rate),
    "manageAddresses": ("manage_addresses", _flag_value),
    "addressDevice": ("address_device", _text),
}


_SYNC_SECTIONS: Final[Mapping[str, str]] = {"ipvs": "ipvs", "nftables": "nftables"}


def _kube_proxy(
    document: Mapping[object, object], file: str, values: dict[str, object]
) -> tuple[list[str], list[str]]:
    present = _checked_leaves(
        document, KUBE_PROXY_FIELDS, file, KUBE_PROXY_KIND, zero_is_unset=True
    )
    where = f"{file}: {KUBE_PROXY_KIND}"
    applied: list[str] = []
    mode = present.get("mode")
    section = _SYNC_SECTIONS.get(mode, "iptables") if isinstance(mode, str) else "iptables"
    for name, field in (("syncPeriod", "sync_period"), ("minSyncPeriod", "min_sync_period")):
        for candidate in (name, f"{section}.{name}"):
            if candidate in present:
                values[field] = _seconds(present[candidate], f"{where}.{candidate}")
                applied.append(candidate)
                break
    for name, (field, convert) in _KUBE_PROXY_HONOURED.items():
        if name in present:
            values[field] = convert(present[name], f"{where}.{name}")
            applied.append(name)
    ignored = [name for name in present if name not in applied]
    return applied, ignored


def _userproxy(
    document: Mapping[object, object], file: str, values: dict[str, object]
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
        field, convert = _USERPROXY_HONOURED[name]
        values[field] = convert(value, f"{where}.{name}")
    return list(present)


def load_config_file(path: Path) -> FileConfig:
    """Read and validate a config file; raises ``ConfigError`` naming the file and field."""
    documents = _read_documents(path)
    if not documents:
        raise ConfigError(f"{path}: no {KUBE_PROXY_KIND} or {USERPROXY_KIND} document")
    values: dict[str, object] = {}
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
            kube_applied, kube_ignored = _kube_proxy(body, str(path), values)
            applied += kube_applied
            ignored += kube_ignored
        else:
            applied += _userproxy(body, str(path), values)
    return FileConfig(
        values=MappingProxyType(values),
        applied=tuple(sorted(applied)),
        ignored=tuple(sorted(ignored)),
    )
