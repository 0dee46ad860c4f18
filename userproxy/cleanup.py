"""``userproxy cleanup``: remove what ``--manage-addresses`` left behind, then exit.

kube-proxy has ``--cleanup`` for the same need.  A clean shutdown removes every address
userproxy added and deletes the device it created; a SIGKILL or a crash leaves them, and
the service IPs stay local on the node (answered with RSTs by nothing) until the next run
adopts them.  This command removes them without starting a proxy, by the marks they carry
in the kernel (``hostnet.address_device.cleanup``).  Exit status: 0 when it cleaned up or
there was nothing to clean; 2 with one line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import sys
from pathlib import Path
from typing import TextIO, TypeVar

from userproxy.config import ConfigError, Settings, check_setting

_P = TypeVar("_P", bound=argparse.ArgumentParser)


def add_cleanup_parser(commands: argparse._SubParsersAction[_P]) -> None:
    """Register ``cleanup`` with the command line's subcommands."""
    default = Settings.__dataclass_fields__["address_device"].default
    parser = commands.add_parser(
        "cleanup",
        help="remove the service IPs and the device that --manage-addresses left behind "
        "after a crash, then exit (kube-proxy's --cleanup)",
        description="Remove the addresses userproxy added (marked proto 0x75) from the device "
        "of --manage-addresses, and delete the device if userproxy created it. Nothing else "
        "is touched. Run it when no userproxy runs with this device. Exit 0: done or nothing "
        "to do; 2: an error.",
    )
    parser.add_argument(
        "--address-device",
        metavar="NAME",
        help=f"the device to clean (default: the config file's addressDevice, else {default})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the --config file the proxy ran with (for its addressDevice)",
    )


def _device(args: argparse.Namespace) -> str:
    """The device: the flag, else the config file's, else the default (ConfigError if
    invalid; the same rule as for ``run``)."""
    if args.address_device is not None:
        return str(check_setting("address_device", args.address_device))
    if args.config is not None:
        from userproxy.configfile import load_config_file

        value = load_config_file(args.config).values.get("address_device")
        if value is not None:
            return str(value)  # validated by the loader
    return str(Settings.__dataclass_fields__["address_device"].default)


def cleanup_command(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``userproxy cleanup`` with parsed ``args``; the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        device = _device(args)
    except ConfigError as exc:
        print(f"userproxy: cleanup: {exc}", file=err)
        return 2
    # Imported here: pyroute2 is only needed when there is something to do.
    from userproxy.hostnet.address_device import cleanup

    try:
        result = asyncio.run(cleanup(device))
    except OSError as exc:
        hint = " (it needs CAP_NET_ADMIN)" if exc.errno in (errno.EPERM, errno.EACCES) else ""
        print(f"userproxy: cleanup of {device}: {exc.strerror or exc}{hint}", file=err)
        return 2
    print(result.summary(), file=out)
    return 0
