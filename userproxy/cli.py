"""Command line: the commands, the settings' precedence, logging, signals and the loop.

This is the only module that reads ``sys.argv``, installs signal handlers or picks the loop;
the flags and the parser are in ``flags.py``.  Settings: ``Settings``' defaults < the
command's own (the demo's) < the ``--config`` file < the flags (``settings_from``).
Signals of ``run``: SIGTERM/SIGINT shut down gracefully, a second one forces it; SIGHUP
reloads the settings and the manifests (``reload_settings``), never ending the process.
``--workers N`` (N > 1) runs the workers' parent instead of a ``Proxy``: same signals.
Exit status: 0 after a clean shutdown, 128 + the signal after a forced one (``StopSignals``),
2 for invalid flags or manifests at start, 1 when ``--handoff-socket`` finds a running
proxy it cannot take over from (userproxy/handoff/taker.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from userproxy.check import check_command
from userproxy.cleanup import cleanup_command
from userproxy.config import ConfigError, Loop, Settings, SettingsValues, settings_values
from userproxy.configfile import describe, load_config_file
from userproxy.demo import DEMO_DEFAULTS
from userproxy.explain_cli import explain_command
from userproxy.flags import DEFAULT, build_parser
from userproxy.handoff.taker import HandoffRefused
from userproxy.logs import setup_logging
from userproxy.proxy import Proxy
from userproxy.sources.manifests import ManifestError
from userproxy.status_cli import status_command
from userproxy.workers.supervisor import Supervisor

log = logging.getLogger(__name__)


def settings_from(
    args: argparse.Namespace,
    *,
    defaults: SettingsValues | None = None,
    fixed: SettingsValues | None = None,
) -> tuple[Settings, str | None, dict[str, str]]:
    """``Settings``' defaults, then ``defaults`` (the command's own), then the ``--config``
    file, then flags, then ``fixed``.  Returns the settings, what the file applied and
    ignored (to log once logging is set up), and where in the file each setting it gave
    came from (``FILE: Kind.field``: an error about it names that, not an untyped flag)."""
    own_defaults: dict[str, object] = dict(defaults or {})
    values = dict(own_defaults)
    fixed = fixed or {}
    described = None
    origins: dict[str, str] = {}
    fields = Settings.__dataclass_fields__
    flags = {key: value for key, value in vars(args).items() if key in fields}
    command_line = flags.keys() | fixed.keys()
    if args.config is not None:
        file_config = load_config_file(args.config)
        file_values = dict(file_config.values)
        if {"manifests", "kubeconfig"} & command_line:
            # A source chosen on the command line replaces the file's, whichever it is.
            file_values.pop("manifests", None)
            file_values.pop("kubeconfig", None)
        values.update(file_values)
        in_effect = file_values.keys() - command_line
        origins = {
            setting: f"{args.config}: {origin}"
            for setting, origin in file_config.origins.items()
            if setting in in_effect
        }
        described = f"{args.config}: {describe(file_config)}"
        if overridden := sorted(file_config.values.keys() - in_effect):
            described += f"; overridden by the command line: {', '.join(overridden)}"
    for key, value in flags.items():
        if value is not DEFAULT:
            values[key] = value
        elif key in own_defaults:  # '' on the command line: back to the default
            values[key] = own_defaults[key]
        else:
            values.pop(key, None)
    values.update(fixed)
    if not values.get("manifests") and values.get("kubeconfig") is None:
        # kube-proxy's rule: no kubeconfig means the in-cluster configuration.
        values["in_cluster"] = "KUBERNETES_SERVICE_HOST" in os.environ
    try:
        return Settings(**settings_values(values)), described, origins
    except ConfigError as exc:
        raise located(exc, origins) from None


def located(exc: ConfigError, origins: Mapping[str, str]) -> ConfigError:
    """``exc`` naming the config file's field instead of the flag when the value at fault
    came from the file."""
    if exc.setting is None or exc.setting not in origins:
        return exc
    return ConfigError.of(exc.setting, exc.problem, origins[exc.setting])


def loop_factory(choice: Loop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop to run on: uvloop when asked for (or for auto, when importable)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


class StopSignals:
    """SIGTERM and SIGINT: the first begins a graceful shutdown (``stop``), the next one
    forces it (``force``: open connections are reset now instead of at the end of the
    grace period), as uvicorn's "press CTRL+C again to force quit".

    ``exit_status`` is 0, or 128 + the number of the signal that forced the shutdown (130
    for SIGINT, 143 for SIGTERM: what a shell reports for a process that signal ended),
    so that a supervisor can tell connections were cut short on demand."""

    def __init__(self, stop: Callable[[], None], force: Callable[[], None]) -> None:
        self._stop = stop
        self._force = force
        self.received: list[int] = []

    def on_signal(self, signum: int) -> None:
        """SIGTERM or SIGINT arrived (a loop signal handler: runs in the loop's thread)."""
        self.received.append(signum)
        name = signal.Signals(signum).name
        if len(self.received) == 1:
            log.info(
                "%s: shutting down (SIGTERM or SIGINT again: close open connections now)", name
            )
            self._stop()
        else:
            log.warning("%s again: closing open connections now", name)
            self._force()

    @property
    def exit_status(self) -> int:
        return 0 if len(self.received) < 2 else 128 + self.received[1]


def _handle_stop_signals(handler: StopSignals) -> StopSignals:
    """``handler`` takes SIGTERM and SIGINT (call from inside the running loop)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handler.on_signal, signum)
    return handler


def install_demo_signals(proxy: Proxy) -> Callable[[], int]:
    """The signals of the demo and ``connect``, as ``run``'s: SIGTERM/SIGINT stop and a
    second one forces; SIGHUP re-reads the manifests only (the settings are read once, at
    start).  Returns the getter of the exit status (``StopSignals.exit_status``)."""
    stopping = _handle_stop_signals(StopSignals(proxy.stop, proxy.force_stop))
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, proxy.reload, proxy.settings)
    return lambda: stopping.exit_status


def reload_settings(proxy: Proxy | Supervisor, args: argparse.Namespace) -> None:
    """SIGHUP: the settings again as at start (defaults, ``--config`` file, flags), handed
    to ``proxy.reload`` (which also re-reads the manifests).  Never raises: the process
    must outlive a bad edit, so an invalid file is logged and the last good settings stay."""
    log.info("SIGHUP: reloading%s", f" {args.config}" if args.config else "")
    try:
        settings, described, _ = settings_from(args)
    except ConfigError as exc:  # already names the file's field when it came from there
        log.error("SIGHUP: %s; keeping the last good settings", exc)
        return
    except Exception:  # a bug in reading must not end the node's proxy either
        log.exception("SIGHUP: cannot reload the settings; keeping the last good ones")
        return
    if described:
        log.info("config file %s", described)
    proxy.reload(settings)


async def serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run a proxy until stopped; its exit status (see StopSignals).  SIGHUP reloads the
    settings from ``args``.  With ``--workers`` above 1, the parent of the workers
    (userproxy/workers/supervisor.py) takes the signals and passes them on."""
    proxy = Supervisor(settings) if settings.workers > 1 else Proxy(settings)
    stopping = _handle_stop_signals(StopSignals(proxy.stop, proxy.force_stop))
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_settings, proxy, args)
    await proxy.run()
    return stopping.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":  # validates and prints; serves and binds nothing
        return check_command(args)
    if args.command == "explain":  # plans and explains; serves and binds nothing
        return explain_command(args)
    if args.command == "cleanup":  # removes what --manage-addresses left; serves nothing
        return cleanup_command(args)
    if args.command == "status":  # reads /status of a running proxy; serves nothing
        return status_command(args)
    origins: dict[str, str] = {}
    try:
        with contextlib.ExitStack() as resources:
            if args.command == "demo":
                from userproxy.demo import demo_manifests, run_demo

                manifests = resources.enter_context(demo_manifests(args.demo_manifests))
                settings, described, origins = settings_from(
                    args, defaults=DEMO_DEFAULTS, fixed={"manifests": (manifests,)}
                )
                main_coroutine: Coroutine[Any, Any, int | None] = run_demo(
                    settings, install_demo_signals
                )
            elif args.command == "connect":
                from userproxy.connect.command import CONNECT_DEFAULTS, ConnectOptions, run_connect

                options = ConnectOptions.from_args(args)
                settings, described, origins = settings_from(
                    args, defaults=CONNECT_DEFAULTS, fixed={"kubeconfig": options.kubeconfig}
                )
                main_coroutine = run_connect(settings, options, install_demo_signals)
            else:
                settings, described, origins = settings_from(args)
                main_coroutine = serve(settings, args)
            setup_logging(settings.log_level, settings.log_format)
            if described:
                log.info("config file %s", described)
            with asyncio.Runner(loop_factory=loop_factory(settings.loop)) as runner:
                status = runner.run(main_coroutine)
    except ConfigError as exc:
        print(f"userproxy: {located(exc, origins)}", file=sys.stderr)
        return 2
    except ManifestError as exc:
        print(f"userproxy: invalid manifests:\n{exc}", file=sys.stderr)
        return 2
    except HandoffRefused as exc:  # the running proxy serves on, untouched
        print(f"userproxy: --handoff-socket: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        print("userproxy: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return status or 0  # None from the demo


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
