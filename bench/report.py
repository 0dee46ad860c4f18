"""Medians, ratios and targets as markdown (docs/benchmarks.md) and a PNG chart."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

PEERS = ("userproxy", "haproxy", "nginx", "direct")
Results = dict[str, dict[str, list[float]]]
Medians = dict[str, dict[str, float]]


def medians(results: Results) -> Medians:
    out: Medians = {}
    for peer, metrics in results.items():
        out[peer] = {k: statistics.median(v) for k, v in metrics.items() if v}
    direct = out.get("direct", {})
    for peer, m in out.items():
        if peer == "direct":
            continue
        for p in ("p50", "p99"):
            key = f"lat_{p}_us"
            if key in m and key in direct:
                m[f"lat_added_{p}_us"] = m[key] - direct[key]
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}".replace(",", " ")
    return f"{value:.{digits}g}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


# (metric, label) per table
TABLES: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "Bulk TCP throughput (iperf3, 4 s per run)",
        [
            ("tcp1_gbps", "1 stream, Gbit/s"),
            ("tcp4_gbps", "4 streams, Gbit/s"),
            ("tcp1_cpu_s_per_gb", "proxy CPU s per GB, 1 stream"),
            ("tcp4_cpu_s_per_gb", "proxy CPU s per GB, 4 streams"),
        ],
    ),
    (
        "New connections (wrk, 32 connections, `Connection: close`, one request each)",
        [("conn_rps", "connections/s"), ("conn_rps_errors", "wrk socket errors + non-2xx")],
    ),
    (
        "Keep-alive requests and added latency",
        [
            ("ka_rps", "keep-alive requests/s (wrk, 32 connections)"),
            ("ka_rps_errors", "wrk socket errors + non-2xx"),
            ("lat_p50_us", "round trip p50, µs (sockperf TCP ping-pong, 2 000 msg/s, 64 B)"),
            ("lat_p99_us", "round trip p99, µs"),
            ("lat_added_p50_us", "added p50 vs direct, µs"),
            ("lat_added_p99_us", "added p99 vs direct, µs"),
        ],
    ),
    (
        "UDP (sockperf under-load at its maximum rate, every datagram echoed)",
        [
            ("udp64_rx_per_s", "64 B: echoes received/s"),
            ("udp64_loss_pct", "64 B: loss %"),
            ("udp1400_rx_per_s", "1 400 B: echoes received/s"),
            ("udp1400_loss_pct", "1 400 B: loss %"),
            ("udp_rate_sent_per_s", "one client at 50 000/s, 64 B: sent/s"),
            ("udp_rate_loss_pct", "one client at 50 000/s, 64 B: loss % (defaults)"),
        ],
    ),
    (
        "Memory with idle proxied connections",
        [
            ("mem_idle_mib", "RSS before, MiB"),
            ("mem_loaded_mib", "RSS with the connections open, MiB"),
            ("mem_per_conn_kib", "RSS per connection, KiB"),
        ],
    ),
]


@dataclass(frozen=True)
class Target:
    label: str
    value: float | None  # the measured ratio (or fraction of an absolute limit)
    limit: float
    higher_is_better: bool
    detail: str

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


def targets(m: Medians, cp: dict[str, float]) -> list[Target]:
    up, ha, ng = m.get("userproxy", {}), m.get("haproxy", {}), m.get("nginx", {})

    def vs(peer: dict[str, float], key: str) -> float | None:
        return _ratio(up.get(key), peer.get(key))

    out = [
        Target("bulk 1 stream ≥ 1.2 x HAProxy", vs(ha, "tcp1_gbps"), 1.2, True, "ratio"),
        Target("bulk 4 streams ≥ 1.2 x HAProxy", vs(ha, "tcp4_gbps"), 1.2, True, "ratio"),
        Target("connections/s ≥ 0.9 x HAProxy", vs(ha, "conn_rps"), 0.9, True, "ratio"),
        Target("keep-alive req/s ≥ 1.0 x HAProxy", vs(ha, "ka_rps"), 1.0, True, "ratio"),
        Target("added p99 ≤ 1.5 x HAProxy's", vs(ha, "lat_added_p99_us"), 1.5, False, "ratio"),
        Target("UDP 64 B dgrams/s ≥ 1.0 x nginx", vs(ng, "udp64_rx_per_s"), 1.0, True, "ratio"),
        Target(
            "UDP 1 400 B dgrams/s ≥ 1.0 x nginx", vs(ng, "udp1400_rx_per_s"), 1.0, True, "ratio"
        ),
        Target("memory/conn ≤ 2 x HAProxy's", vs(ha, "mem_per_conn_kib"), 2.0, False, "ratio"),
    ]
    up_loss, ng_loss = up.get("udp_rate_loss_pct"), ng.get("udp_rate_loss_pct")
    if up_loss is not None and ng_loss is not None:
        # Percentage points over nginx's loss: a ratio means nothing when nginx loses 0.
        extra = up_loss - ng_loss
        out.append(
            Target(
                "UDP loss at 50 000/s, one client ≤ nginx's + 0.1 points",
                extra / 0.1,
                1.0,
                False,
                f"{up_loss:.3g} % vs {ng_loss:.3g} %",
            )
        )
    if "cp_served_s" in cp:
        n = int(cp.get("cp_services", 0))
        out.append(
            Target(
                f"{n} Services served ≤ 10 s",
                cp["cp_served_s"] / 10,
                1.0,
                False,
                f"{cp['cp_served_s']:.2f} s / 10 s",
            )
        )
    for key, what in (("change_1svc", "1 Service"), ("change_many", "all Services")):
        if f"{key}_p99_ms" in cp:
            p99 = cp[f"{key}_p99_ms"]
            out.append(
                Target(
                    f"change→traffic p99 ≤ 100 ms ({what})",
                    p99 / 100,
                    1.0,
                    False,
                    f"{p99:.0f} ms / 100 ms",
                )
            )
    return out


def markdown(
    m: Medians,
    cp: dict[str, float],
    machine: dict[str, str],
    settings: dict[str, str],
    reproduce: str,
) -> str:
    lines = ["# Benchmarks", ""]
    lines += [
        "Generated by `bench/run` (see [How to reproduce](#how-to-reproduce)); every number is",
        "the median of the rounds of one run, in which userproxy, HAProxy, nginx stream and",
        "the direct path were measured in turn (the order rotating each round). Ratios compare",
        "userproxy with each peer *in the same run*: absolute numbers move with the machine",
        "and its load, ratios much less.",
        "",
        "## Machine and run",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in machine.items()]
    lines += [f"- **{k}**: {v}" for k, v in settings.items()]
    lines += ["", "## Targets", "", "| target | measured | limit | met |", "|---|---:|---:|:---:|"]
    for t in targets(m, cp):
        met = {True: "yes", False: "**no**", None: "-"}[t.met]
        shown = _fmt(t.value) if t.detail == "ratio" else t.detail
        limit = _fmt(t.limit) if t.detail == "ratio" else ""
        lines.append(f"| {t.label} | {shown} | {limit} | {met} |")
    lines += ["", "![ratios against the targets](benchmarks.png)", ""]
    for title, rows in TABLES:
        lines += [f"## {title}", ""]
        lines += [
            "| metric | userproxy | HAProxy | nginx stream | direct | userproxy / HAProxy "
            "| userproxy / nginx |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, label in rows:
            vals = [m.get(p, {}).get(key) for p in PEERS]
            up = vals[0]
            ratios = [_fmt(_ratio(up, v), 3) for v in vals[1:3]]
            if key.endswith("_errors"):
                ratios = ["", ""]
            lines.append(
                f"| {label} | "
                + " | ".join(_fmt(v) for v in vals)
                + " | "
                + " | ".join(ratios)
                + " |"
            )
        lines.append("")
    lines += ["## Control plane (userproxy alone)", "", "| metric | value |", "|---|---:|"]
    cp_rows = [
        ("cp_services", "Services (10 endpoints each; the probe Service has 1)"),
        ("cp_last_listener_s", "start → the last Service and the probe accept, s"),
        ("cp_served_s", "start → `userproxy_listeners_open` counts every Service, s"),
        ("cp_rss_mib", "RSS once all are served, MiB"),
        ("change_1svc_p50_ms", "1 Service: slice change → new connections follow, p50 ms"),
        ("change_1svc_p99_ms", "1 Service: p99 ms"),
        ("change_1svc_n", "1 Service: changes measured"),
        ("change_many_p50_ms", "all Services loaded: slice change → new connections, p50 ms"),
        ("change_many_p99_ms", "all Services loaded: p99 ms"),
        ("change_many_n", "all Services loaded: changes measured"),
    ]
    lines += [f"| {label} | {_fmt(cp.get(key))} |" for key, label in cp_rows if key in cp]
    lines += ["", reproduce.rstrip(), ""]
    return "\n".join(lines)


def chart(m: Medians, cp: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [t for t in targets(m, cp) if t.value is not None]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ts) + 1.5))
    names = [t.label for t in ts]
    values = [t.value or 0.0 for t in ts]
    colors = ["#3a923a" if t.met else "#c0392b" for t in ts]
    ys = list(range(len(ts)))[::-1]
    ax.barh(ys, values, color=colors, height=0.6)
    for y, t in zip(ys, ts, strict=True):
        ax.plot([t.limit, t.limit], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text((t.value or 0) + 0.02, y, f"{t.value:.2f}", va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel(
        "userproxy / peer (ratios), or measured / limit (absolute targets); black tick: target"
    )
    ax.set_title("userproxy against its targets (green: met, red: not met)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stdout_table(m: Medians, cp: dict[str, float]) -> str:
    rows = [f"{'metric':32} " + " ".join(f"{p:>12}" for p in PEERS) + f" {'up/ha':>8} {'up/ng':>8}"]
    for _title, table in TABLES:
        for key, _label in table:
            vals = [m.get(p, {}).get(key) for p in PEERS]
            r = [_fmt(_ratio(vals[0], v)) for v in vals[1:3]]
            rows.append(
                f"{key:32} " + " ".join(f"{_fmt(v):>12}" for v in vals) + f" {r[0]:>8} {r[1]:>8}"
            )
    rows += [f"{k:32} {_fmt(v):>12}" for k, v in cp.items()]
    rows.append("")
    for t in targets(m, cp):
        met = {True: "met", False: "NOT met", None: "n/a"}[t.met]
        rows.append(f"{t.label:42} {_fmt(t.value):>8} (limit {_fmt(t.limit)}) {met}")
    return "\n".join(rows)
