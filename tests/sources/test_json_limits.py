"""JSON from an API server cannot crash the source: depth bounded, long integers refused
by the decoder for the one object that carries them."""

from __future__ import annotations

import json

import pytest

from tests.support.manifests import endpoint_slice
from userproxy.sources import json_limits
from userproxy.sources.decode import DecodeError, decode_endpoint_slice


def test_deep_nesting_is_a_value_error_not_a_recursion_error() -> None:
    with pytest.raises(ValueError, match="nested more than 200 levels"):
        json_limits.loads(b"[" * 100_000 + b"]" * 100_000)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 1000}).encode()
    assert json_limits.loads(text) == {"a": "[" * 1000}


def test_a_5000_digit_integer_fails_only_its_object() -> None:
    good = endpoint_slice("s-1", "s", 8080, ["10.0.0.1"])
    bad = endpoint_slice("s-2", "s", 8080, ["10.0.0.2"])
    text = json.dumps({"items": [good, bad]})
    text = text.replace(
        '"port": 8080}], "endpoints": [{"addresses": ["10.0.0.2"]',
        '"port": ' + "9" * 5000 + '}], "endpoints": [{"addresses": ["10.0.0.2"]',
    )
    assert "9" * 5000 in text
    items = json_limits.loads(text.encode())
    assert isinstance(items, dict)
    first, second = items["items"]
    assert decode_endpoint_slice(first) is not None
    with pytest.raises(DecodeError) as caught:
        decode_endpoint_slice(second)
    assert "ports[0].port" in str(caught.value)
    assert len(str(caught.value)) < 500


def test_invalid_json_is_a_value_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        json_limits.loads(b'{"a": ')
