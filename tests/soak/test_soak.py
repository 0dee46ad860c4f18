"""The soak: 40 s on uvloop with the compiled relay (the default data path wherever it
is built), and 32 s on each loop with the Python relay, the reference (the relays' other
tests run in tests/dataplane): fails on any cross-delivered or corrupted byte, any reset,
truncation or refusal without a cause (a SIGKILLed backend, a drained listener, a Service
without usable endpoints), any reset turned into a clean end in either direction, a
descriptor or socket not returned, an error line in the proxy's log.

USERPROXY_SOAK_SECONDS sets the length (default 40; the Python relay's runs take 0.8 of
it); USERPROXY_SOAK_PROXY_SRC runs the proxy from another source tree.  See docs/soak.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.soak.harness import SoakConfig, run_soak

SECONDS = float(os.environ.get("USERPROXY_SOAK_SECONDS", "40"))
SOURCE = os.environ.get("USERPROXY_SOAK_PROXY_SRC")


@pytest.mark.soak
@pytest.mark.timeout(int(SECONDS) + 180)
@pytest.mark.parametrize(
    ("loop", "relay", "share"),
    [("uvloop", "python", 0.8), ("asyncio", "python", 0.8), ("uvloop", "compiled", 1.0)],
)
def test_soak(tmp_path: Path, loop: str, relay: str, share: float) -> None:
    config = SoakConfig(
        loop=loop,
        relay=relay,
        seconds=SECONDS * share,
        seed=7,
        workdir=tmp_path,
        proxy_src=Path(SOURCE) if SOURCE else None,
    )
    report = run_soak(config)
    text = report.render()
    print(text)
    assert not report.failures, text
