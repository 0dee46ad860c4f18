"""``python -m tests.soak --loop uvloop --minutes 10``: a long soak; prints its figures.

Exits 0 when nothing failed, 1 otherwise.  ``--keep DIR`` keeps the proxy log, the
manifests and the backends' reports there (else a temporary directory is removed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from tests.soak.harness import SoakConfig, run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--relay",
        choices=["compiled", "python"],
        default="compiled",
        help="the proxy's TCP relay (compiled: the default data path; python: the reference)",
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=10, help="TCP client threads")
    parser.add_argument("--grace", type=float, default=3.0, help="the proxy's --shutdown-grace")
    parser.add_argument("--stall-every", type=float, default=12.0, help="big manifest period, s")
    parser.add_argument("--no-burner", action="store_true", help="no CPU burner")
    parser.add_argument(
        "--proxy-src", type=Path, help="run the proxy from this source tree (its userproxy/)"
    )
    parser.add_argument("--keep", type=Path, help="keep logs and reports in this directory")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="userproxy-soak-"))
    config = SoakConfig(
        loop=args.loop,
        relay=args.relay,
        seconds=seconds,
        seed=args.seed,
        workdir=workdir,
        tcp_workers=args.workers,
        grace=args.grace,
        stall_every=args.stall_every,
        burn=None if args.no_burner else (0.4, 0.7),
        proxy_src=args.proxy_src,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    try:
        report = run_soak(config)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.render())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
