"""One busy UDP client at 50 000 datagrams/s through userproxy (its defaults) and nginx
stream, side by side: the loss each path adds.  The same measurement is a step of the full
``bench/run``; this runs it alone, needing only ``nginx`` (with the stream module) and
``sockperf``.

    .venv/bin/python -m bench.udp_rate [--rounds 5] [--seconds 3] [--rate 50000]

Prints one line per run and the medians; the order of the paths rotates each round.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import measure, peers
from bench.procs import Procs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udp_rate", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rate", type=int, default=50_000)
    args = parser.parse_args(argv)
    missing = [tool for tool in ("nginx", "sockperf") if shutil.which(tool) is None]
    if missing or not peers.STREAM_MODULE.exists():
        print("install: apt-get install -y nginx libnginx-mod-stream sockperf", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="userproxy-bench-udp-"))
    procs = Procs(tmp)
    losses: dict[str, list[float]] = {}
    try:
        backend = peers.UdpBackend(procs)
        everyone = [peers.start_userproxy(procs, tmp), peers.start_nginx_stream(procs, tmp)]
        everyone.append(peers.direct())
        for r in range(args.rounds):
            for peer in everyone[r % 3 :] + everyone[: r % 3]:
                sample = measure.udp_at_rate(peer, backend, args.seconds, args.rate)
                losses.setdefault(peer.name, []).append(sample["udp_rate_loss_pct"])
                sent, loss = sample["udp_rate_sent_per_s"], sample["udp_rate_loss_pct"]
                print(
                    f"round {r + 1}/{args.rounds} {peer.name:9} sent/s {sent:8.0f}  "
                    f"loss {loss:.3f} %",
                    flush=True,
                )
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"one client, {args.rate} datagrams/s of 64 B, {args.seconds:g} s per run:")
    for name, values in losses.items():
        print(f"  {name:9} loss median {statistics.median(values):.3f} %  (runs: "
              + ", ".join(f"{v:.3f}" for v in values) + ")")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
