"""Medians, ratios and targets as markdown (docs/benchmarks.md); the chart is bench/chart.py."""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

PEERS = ("userproxy", "haproxy", "nginx", "relay", "direct")
PROXIES = PEERS[:4]
NAMES = {
    "userproxy": "userproxy",
    "haproxy": "HAProxy",
    "nginx": "nginx stream",
    "relay": "python relay",
    "direct": "direct",
}
#: userproxy is compared with these, in this order.
OTHERS = ("haproxy", "nginx", "relay")
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


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


#: The headline: the proxying process's CPU time (utime + stime) per unit of work.
CPU_ROWS: list[tuple[str, str]] = [
    ("conn_cpu_us", "µs per new TCP connection (wrk -c32, `Connection: close`)"),
    ("ka_cpu_us", "µs per keep-alive request (wrk -c32)"),
    ("lat_cpu_us", "µs per round trip at 2 000/s (sockperf TCP ping-pong, 64 B)"),
    ("udp64_cpu_us", "µs per datagram, UDP 64 B at the maximum rate"),
    ("udp1400_cpu_us", "µs per datagram, UDP 1 400 B at the maximum rate"),
    ("udp_rate_cpu_us", "µs per datagram, one UDP client at 50 000/s, 64 B"),
    ("tcp1_cpu_s_per_gb", "s per GB, bulk TCP, 1 stream"),
    ("tcp4_cpu_s_per_gb", "s per GB, bulk TCP, 4 streams"),
]

# (metric, label) per table
TABLES: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "Bulk TCP throughput (iperf3)",
        [
            ("tcp1_gbps", "1 stream, Gbit/s"),
            ("tcp4_gbps", "4 streams, Gbit/s"),
            ("tcp1_cpu_s_per_gb", "proxy CPU s per GB, 1 stream"),
            ("tcp4_cpu_s_per_gb", "proxy CPU s per GB, 4 streams"),
        ],
    ),
    (
        "New connections (wrk, 32 connections, `Connection: close`, one request each)",
        [
            ("conn_rps", "connections/s"),
            ("conn_cpu_us", "proxy CPU µs per connection"),
            ("conn_rps_errors", "wrk socket errors + non-2xx"),
        ],
    ),
    (
        "Keep-alive requests and added latency",
        [
            ("ka_rps", "keep-alive requests/s (wrk, 32 connections)"),
            ("ka_cpu_us", "proxy CPU µs per keep-alive request"),
            ("ka_rps_errors", "wrk socket errors + non-2xx"),
            ("lat_p50_us", "round trip p50, µs (sockperf TCP ping-pong, 2 000 msg/s, 64 B)"),
            ("lat_p99_us", "round trip p99, µs"),
            ("lat_added_p50_us", "added p50 vs direct, µs"),
            ("lat_added_p99_us", "added p99 vs direct, µs"),
            ("lat_cpu_us", "proxy CPU µs per round trip"),
        ],
    ),
    (
        "UDP (sockperf under-load, every datagram echoed)",
        [
            ("udp64_rx_per_s", "64 B, maximum rate: echoes received/s"),
            ("udp64_loss_pct", "64 B: loss %"),
            ("udp64_cpu_us", "64 B: proxy CPU µs per datagram"),
            ("udp1400_rx_per_s", "1 400 B, maximum rate: echoes received/s"),
            ("udp1400_loss_pct", "1 400 B: loss %"),
            ("udp1400_cpu_us", "1 400 B: proxy CPU µs per datagram"),
            ("udp_rate_sent_per_s", "one client at 50 000/s, 64 B: sent/s"),
            ("udp_rate_loss_pct", "one client at 50 000/s, 64 B: loss % (defaults)"),
            ("udp_rate_cpu_us", "one client at 50 000/s: proxy CPU µs per datagram"),
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
    note: str = ""  # shown beside it (e.g. the rate next to a CPU ratio)
    headline: bool = False  # one of issue 14's acceptance targets

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


def targets(m: Medians, cp: dict[str, float]) -> list[Target]:
    up, ha, ng = m.get("userproxy", {}), m.get("haproxy", {}), m.get("nginx", {})

    def vs(peer: dict[str, float], key: str) -> float | None:
        return ratio(up.get(key), peer.get(key))

    def times(value: float | None, peer: str) -> str:
        return f"{_fmt(value)} x {peer}" if value is not None else ""

    conn_rate, ka_rate = vs(ha, "conn_rps"), vs(ha, "ka_rps")
    udp_cpu = {size: vs(ng, f"udp{size}_cpu_us") for size in (64, 1400)}
    head = [
        Target(
            "CPU per new TCP connection ≤ 1.4 x HAProxy's",
            vs(ha, "conn_cpu_us"),
            1.4,
            False,
            "ratio",
            f"connections/s: {times(conn_rate, 'HAProxy')}",
        ),
        Target(
            "CPU per keep-alive request ≤ 1.0 x HAProxy's",
            vs(ha, "ka_cpu_us"),
            1.0,
            False,
            "ratio",
            f"keep-alive requests/s: {times(ka_rate, 'HAProxy')}",
        ),
        Target("bulk 1 stream ≥ 1.2 x HAProxy's Gbit/s", vs(ha, "tcp1_gbps"), 1.2, True, "ratio"),
        Target("bulk 4 streams ≥ 1.2 x HAProxy's Gbit/s", vs(ha, "tcp4_gbps"), 1.2, True, "ratio"),
        Target(
            "UDP 64 B datagrams/s ≥ 0.9 x nginx's",
            vs(ng, "udp64_rx_per_s"),
            0.9,
            True,
            "ratio",
            f"CPU per datagram: {times(udp_cpu[64], 'nginx')}",
        ),
        Target(
            "UDP 1 400 B datagrams/s ≥ 0.9 x nginx's",
            vs(ng, "udp1400_rx_per_s"),
            0.9,
            True,
            "ratio",
            f"CPU per datagram: {times(udp_cpu[1400], 'nginx')}",
        ),
        Target(
            "added p99 ≤ 1.5 x HAProxy's",
            # HAProxy's added p99 at or below 0 is noise: no meaningful ratio.
            vs(ha, "lat_added_p99_us") if ha.get("lat_added_p99_us", 0) > 0 else None,
            1.5,
            False,
            "ratio",
            "added p99 µs: "
            f"{_fmt(up.get('lat_added_p99_us'))} vs {_fmt(ha.get('lat_added_p99_us'))}",
        ),
    ]
    out = [dataclasses.replace(t, headline=True) for t in head]
    out.append(
        Target("memory/conn ≤ 2 x HAProxy's", vs(ha, "mem_per_conn_kib"), 2.0, False, "ratio")
    )
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
                f"{n} Services served ≤ 5 s",
                cp["cp_served_s"] / 5,
                1.0,
                False,
                f"{cp['cp_served_s']:.2f} s / 5 s",
                note=f"{cp['cp_served_cpu_s']:.2f} s CPU" if "cp_served_cpu_s" in cp else "",
                headline=True,
            )
        )
    for key, what in (("change_1svc", "1 Service"), ("change_many", "all Services loaded")):
        if f"{key}_p99_ms" in cp:
            p99 = cp[f"{key}_p99_ms"]
            out.append(
                Target(
                    f"change→traffic p99 ≤ 50 ms ({what})",
                    p99 / 50,
                    1.0,
                    False,
                    f"{p99:.0f} ms / 50 ms",
                    headline=key == "change_many",
                )
            )
    for key, what in (
        ("node_label_stall_ms", "a Node label change"),
        ("node_zone_stall_ms", "a zone change"),
        ("node_address_stall_ms", "a node address change"),
    ):
        if key in cp:
            out.append(
                Target(
                    f"loop stall of {what} ≤ 50 ms (all Services loaded)",
                    cp[key] / 50,
                    1.0,
                    False,
                    f"{cp[key]:.0f} ms / 50 ms",
                    headline=True,
                )
            )
    return out


def _table(m: Medians, rows: list[tuple[str, str]], peers: tuple[str, ...]) -> list[str]:
    """One markdown table: a column per peer, then userproxy / each other proxy."""
    lines = [
        "| metric | "
        + " | ".join(NAMES[p] for p in peers)
        + " | "
        + " | ".join(f"userproxy / {NAMES[o]}" for o in OTHERS)
        + " |",
        "|---|" + "---:|" * (len(peers) + len(OTHERS)),
    ]
    for key, label in rows:
        vals = [m.get(p, {}).get(key) for p in peers]
        up = m.get("userproxy", {}).get(key)
        ratios = [_fmt(ratio(up, m.get(o, {}).get(key))) for o in OTHERS]
        if key.endswith("_errors"):
            ratios = [""] * len(OTHERS)
        lines.append(f"| {label} | " + " | ".join([*map(_fmt, vals), *ratios]) + " |")
    return [*lines, ""]


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
        "the median of the rounds of one run, in which userproxy, HAProxy, nginx stream, a",
        "minimal uvloop relay (`bench/relay.py`, the *python relay*: what Python does without",
        "effort) and the direct path were measured in turn (the order rotating each round).",
        "Ratios compare userproxy with each peer *in the same run*: absolute numbers move with",
        "the machine and its load, ratios much less.",
        "",
        "## CPU per unit of work",
        "",
        "The proxying process's CPU time (utime + stime from `/proc/PID/stat`, before and",
        "after each run; for nginx its worker) divided by the work the run did. This leads",
        "because it moves far less with machine noise than the rates below: on a shared",
        "2-core machine a proxy's rate depends on how much CPU the load generator, the",
        "backends and other tenants leave it, while the CPU it spends on one connection,",
        "request or datagram mostly does not. A UDP datagram counts once per crossing (the",
        "request on its way in, the echo on its way back). Lower is better; a ratio below 1",
        "means userproxy spends less than the peer.",
        "",
    ]
    lines += _table(m, CPU_ROWS, PROXIES)
    lines += ["## Machine and run", ""]
    lines += [f"- **{k}**: {v}" for k, v in machine.items()]
    lines += [f"- **{k}**: {v}" for k, v in settings.items()]
    lines += [
        "",
        "## Targets",
        "",
        "The first rows are issue 14's acceptance targets; the rest are earlier ones that",
        "still apply.",
        "",
        "| target | measured | limit | met | beside it |",
        "|---|---:|---:|:---:|---|",
    ]
    for t in targets(m, cp):
        met = {True: "yes", False: "**no**", None: "-"}[t.met]
        shown = _fmt(t.value) if t.detail == "ratio" else t.detail
        limit = _fmt(t.limit) if t.detail == "ratio" else ""
        lines.append(f"| {t.label} | {shown} | {limit} | {met} | {t.note} |")
    lines += ["", "![CPU ratios and the targets](benchmarks.png)", ""]
    for title, rows in TABLES:
        lines += [f"## {title}", ""]
        lines += _table(m, rows, PEERS)
    lines += ["## Control plane (userproxy alone)", "", "| metric | value |", "|---|---:|"]
    cp_rows = [
        ("cp_services", "Services (10 endpoints each; the probe Service has 1)"),
        ("cp_last_listener_s", "start → the last Service and the probe accept, s"),
        ("cp_served_s", "start → every Service listening (the kernel's socket table), s"),
        ("cp_served_cpu_s", "the proxy's CPU time until then, s"),
        ("cp_rss_mib", "RSS once all are served, MiB"),
        ("change_1svc_p50_ms", "1 Service: slice change → new connections follow, p50 ms"),
        ("change_1svc_p99_ms", "1 Service: p99 ms"),
        ("change_1svc_n", "1 Service: changes measured"),
        ("change_many_p50_ms", "all Services loaded: slice change → new connections, p50 ms"),
        ("change_many_p99_ms", "all Services loaded: p99 ms"),
        ("change_many_n", "all Services loaded: changes measured"),
        ("node_label_stall_ms", "all Services loaded: longest loop stall, Node label change, ms"),
        ("node_zone_stall_ms", "all Services loaded: longest loop stall, zone change, ms"),
        ("node_address_stall_ms", "all Services loaded: longest loop stall, node address, ms"),
        ("node_unsliced_stall_ms", "for comparison: every Service re-planned unsliced, ms"),
    ]
    lines += [f"| {label} | {_fmt(cp.get(key))} |" for key, label in cp_rows if key in cp]
    lines += ["", reproduce.rstrip(), ""]
    return "\n".join(lines)


def stdout_table(m: Medians, cp: dict[str, float]) -> str:
    head = f"{'metric':24} " + " ".join(f"{p:>10}" for p in PEERS)
    rows = [head + "".join(f" {'up/' + o[:2]:>7}" for o in OTHERS)]
    keys = [key for key, _label in CPU_ROWS]
    keys += [k for _title, table in TABLES for k, _label in table if k not in keys]
    for key in keys:
        vals = [m.get(p, {}).get(key) for p in PEERS]
        ratios = [_fmt(ratio(vals[0], m.get(o, {}).get(key))) for o in OTHERS]
        rows.append(
            f"{key:24} "
            + " ".join(f"{_fmt(v):>10}" for v in vals)
            + "".join(f" {r:>7}" for r in ratios)
        )
    rows += [f"{k:24} {_fmt(v):>10}" for k, v in cp.items()]
    rows.append("")
    for t in targets(m, cp):
        met = {True: "met", False: "NOT met", None: "n/a"}[t.met]
        rows.append(f"{t.label:46} {_fmt(t.value):>8} (limit {_fmt(t.limit)}) {met}  {t.note}")
    return "\n".join(rows)


_SECTION = re.compile(r"<!-- (bench\.[\w.]+):start -->.*?<!-- \1:end -->", re.DOTALL)


def replace_section(doc: Path, name: str, section: str) -> None:
    """Put ``section`` between ``doc``'s ``<!-- bench.NAME:start -->`` and ``:end`` markers
    (the markers included, replacing what stood there), or append it with its markers."""
    start, end = f"<!-- bench.{name}:start -->", f"<!-- bench.{name}:end -->"
    marked = f"{start}\n{section.strip()}\n{end}"
    current = doc.read_text() if doc.exists() else ""
    if start in current and end in current:
        head, rest = current.split(start, 1)
        current = head + marked + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + marked + "\n"
    doc.write_text(current)


def keep_sections(doc: Path, text: str) -> str:
    """``text`` (a new docs/benchmarks.md) with every section another benchmark wrote
    between ``<!-- bench.NAME:start -->`` and ``<!-- bench.NAME:end -->`` in the current
    ``doc`` carried over (``python -m bench.balancers``, the /status figures of
    ``python -m bench.status``), so a full run does not drop them."""
    current = doc.read_text() if doc.exists() else ""
    sections = [m.group(0) for m in _SECTION.finditer(current) if m.group(0) not in text]
    if not sections:
        return text
    return text.rstrip("\n") + "\n\n" + "\n\n".join(sections) + "\n"
