"""docs/walkthrough.md runs as shown: every ``$ command`` of its ``console`` blocks is run,
in order, in a copy of the demo (the demo itself started as the page says, in the
background), and must exit 0 and print what the page shows.

What differs from run to run is masked on both sides before comparing (``normalize``):
clock times, a client's ephemeral port, durations in ms, and which of the three demo
backends round-robin happened to pick (in ``curl``'s answer, the access-log line,
explain's "next pick" and the per-endpoint totals of ``userproxy status``: the order is
shuffled at start).
Everything else (every listener, endpoint, count, rule and reason) must match exactly.

``USERPROXY_WALKTHROUGH_UPDATE=1 pytest tests/process/test_walkthrough.py`` writes the
outputs of this run into the page instead (for after a deliberate change of output).

The demo binds fixed addresses (127.0.50.1:8080, 127.0.60.1-3:9376, 127.0.0.1:10249 and
:10256), as tests/process/test_demo.py does; the suite runs serially.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.proxyrun import stop_process, wait_logged

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "walkthrough.md"
DEMO = "userproxy demo --access-log access.log"

MASKS = (
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z"), "<time>"),
    (re.compile(r"\b\d\d:\d\d:\d\d\b"), "<time>"),
    (re.compile(r"\b127\.0\.0\.1:\d+ ->"), "127.0.0.1:<port> ->"),
    (re.compile(r"\d+(\.\d+)? ?ms\b"), "<ms>"),
    (re.compile(r"hello from web-\d \(127\.0\.60\.\d\)"), "hello from <backend>"),
    (re.compile(r"endpoint=127\.0\.60\.\d:9376"), "endpoint=<backend>"),
    (re.compile(r"(next pick.*)127\.0\.60\.\d:9376"), r"\1<backend>"),
    (re.compile(r"total \d+ bytes \d+/\d+"), "total <n> bytes <n>/<n>"),
)


def normalize(text: str) -> list[str]:
    """``text``'s lines with the run-dependent parts masked, trailing blanks dropped."""
    lines = []
    for raw in text.rstrip("\n").splitlines():
        line = raw
        for pattern, mask in MASKS:
            line = pattern.sub(mask, line)
        lines.append(line.rstrip())
    return lines


@dataclass
class Command:
    """One ``$ command`` of the page and the output shown under it (``start``..``end``
    are its output's line numbers in the page)."""

    command: str
    start: int
    shown: list[str] = field(default_factory=list)


def commands(lines: list[str]) -> list[Command]:
    """Every ``$ command`` in the page's ``console`` blocks, in order, with its output."""
    found: list[Command] = []
    in_console = False
    for number, line in enumerate(lines):
        if line.startswith("```"):
            in_console = line.strip() == "```console"
            continue
        if not in_console:
            continue
        if line.startswith("$ "):
            found.append(Command(line[2:], number + 1))
        elif found:
            found[-1].shown.append(line)
    return found


def run(command: str, cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"$ {command}\nexit {done.returncode}\n{done.stderr}"
    return done.stdout


def test_the_walkthrough_runs_as_shown(tmp_path: Path) -> None:
    page = PAGE.read_text().splitlines()
    steps = commands(page)
    assert len(steps) >= 6, "the page lost its commands"
    assert f"{DEMO}" in page, "the page starts the demo as this test does"
    shutil.copytree(ROOT / "examples" / "demo", tmp_path / "examples" / "demo")
    log = tmp_path / "demo.log"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with log.open("wb") as out:
        demo = subprocess.Popen(
            ["bash", "-c", f"exec {DEMO}"], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    outputs: list[str] = []
    try:
        wait_logged(log, "userproxy demo is running", within=20)
        for step in steps:
            outputs.append(run(step.command, tmp_path))
    finally:
        assert stop_process(demo) == 0, log.read_text()
    if os.environ.get("USERPROXY_WALKTHROUGH_UPDATE"):
        for step, output in reversed(list(zip(steps, outputs, strict=True))):
            page[step.start : step.start + len(step.shown)] = output.rstrip("\n").splitlines()
        PAGE.write_text("\n".join(page) + "\n")
        return
    for step, output in zip(steps, outputs, strict=True):
        assert normalize(output) == normalize("\n".join(step.shown)), f"$ {step.command}"
