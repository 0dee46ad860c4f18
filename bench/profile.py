"""py-spy profiles of userproxy under load, summarised into small text files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.peers import UdpBackend
from bench.procs import Procs

_LINE = re.compile(r":\d+\)$")
#: Frames every sample shares (the process's entry and the loop's run call).
_ROOTS = ("runpy", "asyncio/runners.py", "userproxy/cli.py", "userproxy/__main__.py")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def record(
    procs: Procs,
    *,
    tmp: Path,
    pid: int,
    name: str,
    seconds: float,
    load: Callable[[], object],
    out_dir: Path,
    title: str,
) -> Path | None:
    """Sample ``pid`` with py-spy while ``load()`` runs and write
    the top of the profile to ``out_dir/NAME.txt``."""
    tool = py_spy()
    if tool is None:
        print("  py-spy not found: skipping the profile (pip install py-spy)", flush=True)
        return None
    raw = tmp / f"{name}.raw"
    base = [tool, "record", "--pid", str(pid), "--duration", f"{seconds:.0f}", "--rate", "250"]
    base += ["--format", "raw", "--output", str(raw)]
    # Native frames show where uvloop's C code spends the time; they need py-spy to pause
    # the process for each sample. Without them, sample without pausing.
    for extra in (["--native"], ["--nonblocking"]):
        spy = procs.start(f"py-spy-{name}", [*base, *extra])
        try:
            load()
            spy.wait(seconds + 30)
        finally:
            procs.stop(spy)
        if raw.exists():
            title += f" (py-spy {' '.join(extra)})"
            break
    else:
        print(f"  py-spy wrote no profile:\n{procs.log_tail(f'py-spy-{name}')}", flush=True)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.txt"
    path.write_text(summarise(raw.read_text(), title))
    return path


def _frame(text: str) -> str:
    return _LINE.sub(")", text.strip())


def summarise(raw: str, title: str, top: int = 30) -> str:
    """Top functions by self and by total samples from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    by_py: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        py = [f for f in frames if ".py)" in f and not any(r in f for r in _ROOTS)]
        by_py[py[-1] if py else "(no Python frame: loop internals or another thread)"] += count
        for frame in set(py):
            total[frame] += count
    lines = [f"# {title}", f"# {samples} samples at 250 Hz", ""]
    for label, counter in (
        ("self time (innermost frame, native included)", own),
        ("self time of the innermost Python function (native time folded into its caller)", by_py),
        ("total time of Python functions (inclusive)", total),
    ):
        lines.append(f"## top {top} by {label}")
        for frame, count in counter.most_common(top):
            lines.append(f"{100 * count / max(samples, 1):6.1f}%  {frame}")
        lines.append("")
    return "\n".join(lines)


def run_wrk(host: str, port: int, seconds: float) -> Callable[[], object]:
    argv = ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-H", "Connection: close"]
    return lambda: subprocess.run(
        [*argv, f"http://{host}:{port}/"], capture_output=True, timeout=seconds + 30, check=False
    )


def run_udp(host: str, port: int, seconds: float, backend: UdpBackend) -> Callable[[], object]:
    argv = ["sockperf", "under-load", "-i", host, "-p", str(port), "-m", "64"]
    argv += ["-t", f"{seconds:g}", "--mps", "max", "--reply-every", "1"]

    def load() -> object:
        with backend.counting():
            return subprocess.run(argv, capture_output=True, timeout=seconds + 30, check=False)

    return load
