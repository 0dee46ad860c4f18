"""The chart of docs/benchmarks.md (matplotlib): userproxy's CPU per unit of work over each
peer's (the headline), and userproxy against its targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import CPU_ROWS, NAMES, OTHERS, Medians, ratio, targets

#: Short names of the CPU rows for the chart, and the CPU targets drawn on it.
_CHART_CPU = {
    "conn_cpu_us": "new TCP connection",
    "ka_cpu_us": "keep-alive request",
    "lat_cpu_us": "round trip at 2 000/s",
    "udp64_cpu_us": "UDP datagram, 64 B",
    "udp1400_cpu_us": "UDP datagram, 1 400 B",
    "udp_rate_cpu_us": "UDP datagram at 50 000/s",
    "tcp1_cpu_s_per_gb": "GB of bulk TCP, 1 stream",
    "tcp4_cpu_s_per_gb": "GB of bulk TCP, 4 streams",
}
_CPU_TARGETS = {"conn_cpu_us": 1.4, "ka_cpu_us": 1.0}  # x HAProxy's
_COLORS = {"haproxy": "#1f77b4", "nginx": "#2ca02c", "relay": "#ff7f0e"}


def cpu_ratios(m: Medians) -> dict[str, dict[str, float]]:
    """userproxy's CPU per unit over each other proxy's, per CPU row that has one."""
    up = m.get("userproxy", {})
    out: dict[str, dict[str, float]] = {}
    for key, _label in CPU_ROWS:
        ratios = {o: ratio(up.get(key), m.get(o, {}).get(key)) for o in OTHERS}
        kept = {o: r for o, r in ratios.items() if r is not None}
        if kept:
            out[key] = kept
    return out


def _bar(
    ax: Any, y: float, value: float, *, top: float, height: float, color: str, size: int
) -> None:
    """A horizontal bar clipped to [0, top]; the label gives the true value."""
    shown = min(max(value, 0.0), top)
    ax.barh(y, shown, height=height, color=color)
    ax.text(
        shown + 0.02, y, f"{value:.2f}" + (" →" if value > top else ""), va="center", fontsize=size
    )
    ax.set_xlim(0, top * 1.08)


def chart(m: Medians, cp: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cpu = cpu_ratios(m)
    ts = [t for t in targets(m, cp) if t.value is not None]
    fig, (top, ax) = plt.subplots(
        2,
        1,
        figsize=(9, 0.55 * len(cpu) + 0.45 * len(ts) + 3),
        height_ratios=[max(len(cpu), 1) * 1.2, max(len(ts), 1)],
    )
    # The headline: userproxy's CPU per unit of work over each peer's.
    width = 0.26
    top_max = min(max([2.2, *(r * 1.1 for rs in cpu.values() for r in rs.values())]), 4.0)
    ys = list(range(len(cpu)))[::-1]
    for y, (key, ratios) in zip(ys, cpu.items(), strict=True):
        for i, other in enumerate(OTHERS):
            if other not in ratios:
                continue
            yy = y + (1 - i) * width
            _bar(top, yy, ratios[other], top=top_max, height=width, color=_COLORS[other], size=7)
            if other == "haproxy" and key in _CPU_TARGETS:
                limit = _CPU_TARGETS[key]
                top.plot([limit, limit], [yy - 0.18, yy + 0.18], color="black", linewidth=2)
    top.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    top.set_yticks(ys)
    top.set_yticklabels([_CHART_CPU.get(k, k) for k in cpu], fontsize=8)
    top.legend(
        [Rectangle((0, 0), 1, 1, color=_COLORS[o]) for o in OTHERS],
        [f"userproxy / {NAMES[o]}" for o in OTHERS],
        fontsize=7,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=3,
        frameon=False,
    )
    top.set_title(
        "CPU per unit of work, userproxy / peer (lower is better; black tick: target)",
        fontsize=10,
        pad=18,
    )
    # The targets.
    names = [t.label for t in ts]
    ys = list(range(len(ts)))[::-1]
    ax_max = max(2.5, *(1.5 * t.limit for t in ts))
    for y, t in zip(ys, ts, strict=True):
        _bar(
            ax,
            y,
            t.value or 0.0,
            top=ax_max,
            height=0.6,
            color="#3a923a" if t.met else "#c0392b",
            size=8,
        )
        ax.plot([t.limit, t.limit], [y - 0.4, y + 0.4], color="black", linewidth=2)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel(
        "userproxy / peer (ratios), or measured / limit (absolute targets); black tick: target",
        fontsize=8,
    )
    ax.set_title("userproxy against its targets (green: met, red: not met)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
