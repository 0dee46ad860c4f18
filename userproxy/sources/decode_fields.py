"""Reading one field of a raw API object: its type checked, its path in every error.

The building blocks of :mod:`userproxy.sources.decode`.  Each reader takes the mapping, the
key and the path of the mapping (``spec.ports[1]``) and returns the value in the type its
name says, or raises :class:`DecodeError` naming the field (``spec.ports[1].port``).  The
``opt_*`` readers give None (or an empty collection) for a key that is absent or null, as
the API server treats an omitted field.  Last, the ObjectMeta every kind has: name,
namespace, labels and annotations, checked as the API server's validation does.

Typing is strict on purpose: booleans must be real booleans, integers real integers (a
boolean is not an integer, and the string ``"80"`` is not a port).  Invariant: every
message is bounded, whatever the object held (:func:`quote`, :class:`DecodeError`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import TypeVar

from userproxy.model import IPFamily, parse_ip

_E = TypeVar("_E", bound=StrEnum)
_V = TypeVar("_V", str, int, bool)

#: Longest quoted value in a message (characters, ellipsis included).
MAX_QUOTED_CHARS = 200
#: Longest field path and message of a DecodeError (characters, ellipsis included).
MAX_FIELD_CHARS = 300
MAX_MESSAGE_CHARS = 400
#: Longer than any IP literal (IPv6 with an embedded IPv4 and blanks around it): checked
#: before parsing, so a huge string neither costs a parse nor fills the parse cache.
_MAX_IP_CHARS = 64

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def target_pod(target_ref: object) -> str | None:
    """The pod an endpoint's ``targetRef`` names, or None: kube-proxy ignores the field,
    so a missing, other-kind or malformed one is never an error here."""
    if type(target_ref) is not dict or target_ref.get("kind") != "Pod":
        return None
    name = target_ref.get("name")
    return name if type(name) is str and name else None


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending with an ellipsis when cut."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + "\u2026"


def quote(value: object) -> str:
    """``repr(value)``, bounded: a 10 MB string in an object gives a short message.

    Strings are cut before ``repr`` so quoting never copies a huge value; an integer is
    shown by its digit count beyond 40 digits (its decimal spelling costs quadratic time).
    """
    if isinstance(value, str) and len(value) > MAX_QUOTED_CHARS:
        return shorten(repr(value[:MAX_QUOTED_CHARS]), MAX_QUOTED_CHARS)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    return shorten(repr(value), MAX_QUOTED_CHARS)


class DecodeError(ValueError):
    """A raw API object failed validation.

    ``field`` is the path of the offending field (``spec.ports[1].port``; ``""`` for the
    object itself) and ``message`` says what is wrong with it.  Invariant: both are
    bounded (:data:`MAX_FIELD_CHARS`, :data:`MAX_MESSAGE_CHARS`), whatever the object held.
    """

    def __init__(self, field: str, message: str) -> None:
        field = shorten(field, MAX_FIELD_CHARS)
        message = shorten(message, MAX_MESSAGE_CHARS)
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def unknown_value(path: str, value: str, expected: str, what: str = "value") -> DecodeError:
    """The error for a value outside a fixed set: ``unknown value 'x' (expected ...)``."""
    return DecodeError(path, f"unknown {what} {quote(value)} (expected {expected})")


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(value: object) -> str:
    """A short description of a value of the wrong type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {quote(value)}"
    if isinstance(value, float):
        return f"number {quote(value)}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a value of type {type(value).__name__}"


def as_mapping(value: object, path: str) -> dict[str, object]:
    if not isinstance(value, Mapping):
        raise DecodeError(path, f"expected a mapping, got {describe(value)}")
    result: dict[str, object] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise DecodeError(path, f"key {quote(key)} is not a string")
        result[key] = item
    return result


def opt_mapping(m: Mapping[str, object], key: str, path: str) -> dict[str, object]:
    value = m.get(key)
    if value is None:
        return {}
    return as_mapping(value, join(path, key))


def opt_list(m: Mapping[str, object], key: str, path: str) -> list[object]:
    value = m.get(key)
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise DecodeError(join(path, key), f"expected a list, got {describe(value)}")
    return list(value)


def opt_items(m: Mapping[str, object], key: str, path: str) -> Iterator[tuple[str, object]]:
    """(path, item) of each item of the list ``m[key]``: ``("spec.ports[1]", item)``."""
    field = join(path, key)
    for i, item in enumerate(opt_list(m, key, path)):
        yield f"{field}[{i}]", item


def opt_entries(
    m: Mapping[str, object], key: str, path: str
) -> Iterator[tuple[str, dict[str, object]]]:
    """(path, mapping) of each item of the list ``m[key]``, checked one by one."""
    for item_path, item in opt_items(m, key, path):
        yield item_path, as_mapping(item, item_path)


def _opt_scalar(
    m: Mapping[str, object], key: str, path: str, kind: type[_V], what: str
) -> _V | None:
    """``m[key]`` of exactly type ``kind`` (a bool is no int), or None when absent or null."""
    value = m.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DecodeError(join(path, key), f"expected {what}, got {describe(value)}")
    return value


def opt_str(m: Mapping[str, object], key: str, path: str) -> str | None:
    return _opt_scalar(m, key, path, str, "a string")


def opt_int(m: Mapping[str, object], key: str, path: str) -> int | None:
    return _opt_scalar(m, key, path, int, "an integer")


def opt_bool(m: Mapping[str, object], key: str, path: str) -> bool | None:
    return _opt_scalar(m, key, path, bool, "a boolean")


def opt_port(m: Mapping[str, object], key: str, path: str) -> int | None:
    """An optional port number in 1..65535 (absent or null gives None)."""
    value = opt_int(m, key, path)
    if value is not None and not 1 <= value <= 65535:
        raise DecodeError(join(path, key), f"{quote(value)} is out of range 1..65535")
    return value


def opt_enum(m: Mapping[str, object], key: str, path: str, enum: type[_E], default: _E) -> _E:
    """``m[key]`` as a member of ``enum``; absent, null or "" gives ``default``."""
    value = opt_str(m, key, path)
    if value is None or value == "":
        return default
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise unknown_value(join(path, key), value, f"one of {allowed}") from None


def string_map(m: Mapping[str, object], key: str, path: str) -> dict[str, str]:
    """``m[key]`` as a mapping of strings to strings (labels, annotations)."""
    raw = opt_mapping(m, key, path)
    result: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(value, str):
            raise DecodeError(
                f"{join(path, key)}[{quote(name)}]", f"expected a string, got {describe(value)}"
            )
        result[name] = value
    return result


def ip_literal(value: object, path: str, family: IPFamily | None = None) -> str:
    """A literal IP address in its canonical spelling, optionally of one family."""
    if not isinstance(value, str):
        raise DecodeError(path, f"expected an IP address, got {describe(value)}")
    if len(value) > _MAX_IP_CHARS:
        raise DecodeError(path, f"{quote(value)} is not a valid IP address")
    try:
        parsed = parse_ip(value.strip())
    except ValueError:
        raise DecodeError(path, f"{quote(value)} is not a valid IP address") from None
    if parsed.zoned:
        raise DecodeError(path, f"{quote(value)} is not a valid IP address (zone index)")
    if family is not None and parsed.family is not family:
        raise DecodeError(path, f"{quote(value)} is not an {family.value} address")
    return parsed.canonical


def cidr(value: object, path: str) -> str:
    """A CIDR in its canonical spelling (host bits cleared: 10.1.2.3/8 is 10.0.0.0/8)."""
    if not isinstance(value, str):
        raise DecodeError(path, f"expected a CIDR, got {describe(value)}")
    if len(value) > _MAX_IP_CHARS + 4:
        raise DecodeError(path, f"{quote(value)} is not a valid CIDR")
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise DecodeError(path, f"{quote(value)} is not a valid CIDR") from None
    return str(network)


# --------------------------------------------------------------------------- ObjectMeta


def metadata(obj: Mapping[str, object]) -> dict[str, object]:
    """``metadata`` of a raw object (checked to be one: a mapping)."""
    if not isinstance(obj, Mapping):  # the type says so, but raw input is checked anyway
        raise DecodeError("", f"expected a mapping (an API object), got {describe(obj)}")
    return opt_mapping(obj, "metadata", "")


def meta_name(meta: Mapping[str, object], *, label: bool) -> str:
    """``metadata.name``: a DNS-1123 label (``label``) or subdomain, as its kind requires."""
    name = opt_str(meta, "name", "metadata")
    if not name:
        raise DecodeError("metadata.name", "is required")
    if label:
        if len(name) > 63 or not _DNS1123_LABEL.fullmatch(name):
            raise DecodeError(
                "metadata.name",
                f"{quote(name)} is not a valid name (at most 63 lower-case letters, digits and "
                "'-', starting and ending with a letter or digit)",
            )
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise DecodeError(
            "metadata.name",
            f"{quote(name)} is not a valid name (at most 253 lower-case letters, digits, '-' "
            "and '.', starting and ending with a letter or digit)",
        )
    return name


def meta_namespace(meta: Mapping[str, object]) -> str:
    """``metadata.namespace``, "default" when unset (as kubectl applies a manifest)."""
    namespace = opt_str(meta, "namespace", "metadata")
    if not namespace:
        return "default"
    if len(namespace) > 63 or not _DNS1123_LABEL.fullmatch(namespace):
        raise DecodeError("metadata.namespace", f"{quote(namespace)} is not a valid namespace name")
    return namespace


def decode_labels(obj: Mapping[str, object]) -> dict[str, str]:
    """``metadata.labels`` of a raw object (every value must be a string)."""
    return string_map(metadata(obj), "labels", "metadata")


def decode_annotations(obj: Mapping[str, object]) -> dict[str, str]:
    """``metadata.annotations`` of a raw object (every value must be a string)."""
    return string_map(metadata(obj), "annotations", "metadata")
