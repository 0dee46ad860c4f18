"""What a valid value is: the rules ``config.RULES`` gives each setting, and Go durations.

A rule takes a value as it came (from a flag's parser or the config file's reader) and
returns it normalised (a host name trimmed and lowercased, a CIDR with its host bits
cleared, an address given its default port), or raises ``ValueError`` whose text is the
problem alone, without the flag or field name: the caller (``config.check_setting``) names
where the value came from.  Rules are idempotent: ``Settings`` applies them again to
values that already passed.  The range checks live here and nowhere else.  The checks
follow kube-proxy's validation (pkg/proxy/apis/config/validation) where it has one.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, TypeVar

T = TypeVar("T")
Rule = Callable[[object], object]

#: Linux's IFNAMSIZ (16) less the terminating NUL: the longest network device name.
MAX_DEVICE_NAME: Final = 15
#: Go's time.Duration ends at 2**63-1 ns (about 292 years); kube-proxy cannot take more.
MAX_DURATION: Final = (2**63 - 1) / 1e9


def show(value: object) -> str:
    """A value as it would be written in a file or on the command line, for messages."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # a self-referencing YAML alias
        return repr(value)


def expect(value: object, kind: type[T], what: str) -> T:
    """``value`` if it is a ``kind`` (a bool is not an integer here, as in YAML and Go),
    else ``ValueError``: ``<value> is not <what>``."""
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"{show(value)} is not {what}")


def string(value: object) -> str:
    return expect(value, str, "a string")


def boolean(value: object) -> bool:
    return expect(value, bool, "true or false")


def integer(value: object) -> int:
    return expect(value, int, "an integer")


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
    sign = -1.0 if text.startswith("-") else 1.0
    rest = text[1:] if text[:1] in ("+", "-") else text
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


def format_duration(seconds: float) -> str:
    """Seconds as a Go duration (``30s``, ``15m0s``, ``250ms``), as kube-proxy prints them."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours:.0f}h{minutes:.0f}m{secs:g}s"
    if minutes:
        return f"{minutes:.0f}m{secs:g}s"
    return f"{secs:g}s"


# --- the rules: value -> normalised value, or ValueError(problem) ---------------------------


def duration(*, positive: bool = False) -> Rule:
    """Seconds: finite (NaN would make /configz invalid JSON), not negative, within Go's
    range; with ``positive`` also not 0."""

    def rule(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"{show(value)} is not a duration (like 30s or 1m0s)")  # NaN too
        seconds = float(value)
        if seconds < 0:
            shown = format_duration(-seconds) if math.isfinite(seconds) else "infinity"
            raise ValueError(f"-{shown} is negative")
        if seconds > MAX_DURATION:
            raise ValueError(f"{seconds:g}s is out of range (at most about 292 years)")
        if positive and seconds == 0:
            raise ValueError("must be greater than 0 (omit it for the default)")
        return seconds

    return rule


def count(minimum: int) -> Rule:
    def rule(value: object) -> object:
        if integer(value) < minimum:
            raise ValueError(f"{value} must be at least {minimum}")
        return value

    return rule


def percent(value: object) -> object:
    """A whole percentage, 1 to 100 (100: no bound of its own)."""
    number = expect(value, int, "a whole percentage (1 to 100)")
    if not 1 <= number <= 100:
        raise ValueError(f"{value} is not a percentage from 1 to 100")
    return value


def choice(choices: tuple[str, ...]) -> Rule:
    def rule(value: object) -> object:
        if value not in choices:
            raise ValueError(f"{show(value)} is not one of {', '.join(choices)}")
        return value

    return rule


def hostname(value: object) -> object:
    """kube-proxy's GetHostname: trimmed and lowercased, and then not empty (a Node name and
    an EndpointSlice's nodeName are lowercase, so "Node-1" would match nothing)."""
    name = string(value).strip().lower()
    if not name:
        raise ValueError(f"{show(value)} is blank")
    return name


def host_port(text: str) -> tuple[str, int] | None:
    """``ip:port`` or ``[ip6]:port`` (port 0: disabled -> None); ValueError names the problem."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{text!r} is not IP:PORT (e.g. 0.0.0.0:10256)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} in {text!r} is not an IP address") from None
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0..65535")
    return None if port == 0 else (host, port)


def bind_address(default_port: int) -> Rule:
    """``IP:PORT``; an address without a port gets ``default_port`` (kube-proxy's rule);
    ``""`` stays ``""``: the server is off."""

    def rule(value: object) -> object:
        text = string(value).strip()
        if not text:
            return ""
        bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            pass
        else:
            host = f"[{address}]" if address.version == 6 else str(address)
            text = f"{host}:{default_port}"
        host_port(text)
        return text

    return rule


_NODEPORT_KEYWORDS: Final[Mapping[str, tuple[str, ...]]] = {
    "primary": ("primary",),
    "localhost": ("127.0.0.0/8", "::1/128"),
    "all": ("0.0.0.0/0", "::/0"),
}


def _network(text: str) -> str:
    """A CIDR with a prefix length (a bare IP is not one, as in kube-proxy), host bits
    cleared as Go's net.ParseCIDR does (``10.1.2.3/8`` is ``10.0.0.0/8``)."""
    if "/" not in text:
        raise ValueError(text)
    return str(ipaddress.ip_network(text, strict=False))


def nodeport_addresses(value: object) -> object:
    """CIDRs and ``primary``; ``localhost`` and ``all`` expanded; duplicates dropped."""
    if not isinstance(value, tuple | list):
        raise ValueError(f"{show(value)} is not a list of CIDRs")
    result: list[str] = []
    for item in value:
        entry = string(item).strip()
        if entry in _NODEPORT_KEYWORDS:
            expanded = _NODEPORT_KEYWORDS[entry]
        else:
            try:
                expanded = (_network(entry),)
            except ValueError:
                raise ValueError(
                    f"{show(item)} is not a CIDR or one of primary, localhost, all"
                ) from None
        result.extend(cidr for cidr in expanded if cidr not in result)
    return tuple(result)


def cluster_cidr(value: object) -> object:
    """One CIDR, or an IPv4 and an IPv6 one, comma-separated (kube-proxy's rule)."""
    text = string(value)
    cidrs = [cidr.strip() for cidr in text.split(",")]
    if len(cidrs) > 2:
        raise ValueError(f"{show(text)} has more than two (a dual-stack pair) CIDRs")
    networks = []
    for cidr in cidrs:
        try:
            networks.append(_network(cidr))
        except ValueError:
            raise ValueError(f"{show(cidr)} in {show(text)} is not a CIDR") from None
    if len(networks) == 2 and (":" in networks[0]) == (":" in networks[1]):
        family = "IPv6" if ":" in networks[0] else "IPv4"
        raise ValueError(
            f"{show(text)} has two {family} CIDRs: a pair must be one IPv4 and one IPv6"
        )
    return ",".join(networks)


def device_name(value: object) -> object:
    """A name the kernel takes for a device (net/core/dev.c dev_valid_name)."""
    name = string(value)
    length = len(name.encode())
    if length > MAX_DEVICE_NAME:
        raise ValueError(
            f"{show(name)} is {length} characters long; a Linux device name has at most "
            f"{MAX_DEVICE_NAME} (IFNAMSIZ)"
        )
    if not name or name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise ValueError(f"{show(name)} is not a device name (no '/', ':' or spaces)")
    return name


_LABEL_VALUE: Final = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def label_value(value: object) -> object:
    """A Kubernetes label value, as the label selector of the watches needs one."""
    text = string(value)
    if not _LABEL_VALUE.fullmatch(text):
        raise ValueError(
            f"{show(text)} is not a label value (at most 63 letters, digits, '-', '_' or '.', "
            "beginning and ending with a letter or digit)"
        )
    return text


def paths(value: object) -> object:
    if not isinstance(value, tuple | list):
        raise ValueError(f"{show(value)} is not a list of paths")
    if any(isinstance(item, str) and not item.strip() for item in value):
        raise ValueError("an empty path")  # Path("") would be the working directory
    result = tuple(Path(item) if isinstance(item, str) else item for item in value)
    if not all(isinstance(path, Path) for path in result):
        raise ValueError(f"{show(value)} is not a list of paths")
    return result


def balancer_name(value: object) -> object:
    """A balancer's name as registered (``round-robin``, or a plug-in's entry point name):
    a word without spaces.  Whether such a balancer exists is known only once the plug-ins
    are loaded: ``BalancerRegistry`` checks that when the proxy starts."""
    text = string(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"{show(text)} is not a balancer name (like round-robin or maglev)")
    return text


def access_log_path(value: object) -> object:
    """``--access-log``: a file path, or ``-`` for stderr; not checked for writability here
    (the proxy opens it at start and says so if it cannot)."""
    text = string(value)
    if not text.strip():
        raise ValueError("is empty: give a file path, or - for stderr")
    return text


def path(value: object) -> object:
    return expect(Path(value) if isinstance(value, str) else value, Path, "a path")
