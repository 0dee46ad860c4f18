"""A ``--workers`` data-plane process: ``python -m userproxy.workers.child FD PARENT_PID``.

FD is this worker's end of the socket pair the parent made (``channel.py``).  The worker
reads ``Hello`` (its number, the settings), then runs an ordinary ``Proxy`` whose source is
the channel: every ``Call`` goes to the proxy's ChangeRecorder as the parent's source made
it.  Its listening sockets get SO_REUSEPORT (``hostnet/listen.py``), so every worker serves
every address; with more than one worker, ClientIP affinity picks by a hash of the client IP
(``balancers/affinity.py``) so that all of them agree.  Its metrics server's routes are on a
private Unix socket, which the parent reads and merges.

It never outlives the parent: ``PR_SET_PDEATHSIG`` sends it SIGTERM when the parent dies,
and the end of the channel (the parent gone) forces the shutdown.  SIGTERM/SIGINT from the
parent stop it as they stop ``userproxy run`` (a second one forces); SIGHUP is ignored (the
parent sends the reloaded settings down the channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from userproxy.balancers.affinity import ClientIPAffinity
from userproxy.config import ConfigError, Settings
from userproxy.control.handlers import Handlers
from userproxy.hostnet import listen
from userproxy.logs import setup_logging
from userproxy.proxy import Proxy
from userproxy.workers.channel import HANDLER_METHODS, Call, Hello, Reload, read_hello, read_message

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def worker_settings(settings: Settings, worker: int) -> Settings:
    """What a worker runs with: no admin ports of its own (the parent serves them); only
    worker 0 manages the Service addresses (one owner of the device); an access log file
    of its own, ``PATH.N`` (N processes appending buffered text to one file would cut
    each other's lines), while ``-`` (stderr, line by line) stays shared."""
    access_log = settings.access_log
    if access_log is not None and access_log != "-":
        access_log = f"{access_log}.{worker}"
    return dataclasses.replace(
        settings,
        healthz_bind_address="",
        metrics_bind_address="",
        manage_addresses=settings.manage_addresses and worker == 0,
        access_log=access_log,
    )


def _name_the_worker(worker: int) -> None:
    """Every log record of this process begins with ``worker N:`` (they all share the
    parent's stderr)."""
    factory = logging.getLogRecordFactory()
    prefix = f"worker {worker}: "

    def record(*args: object, **kwargs: object) -> logging.LogRecord:
        made = factory(*args, **kwargs)
        made.msg = prefix + str(made.msg)
        return made

    logging.setLogRecordFactory(record)


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the parent dies; exit now if it already has (the race before prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(1)


class Channel:
    """The proxy's source: applies the parent's calls to the handlers, in order."""

    def __init__(self, sock: socket.socket, hello: Hello) -> None:
        self.sock = sock
        self.hello = hello
        self.proxy: Proxy | None = None

    async def feed(self, handlers: Handlers) -> None:
        reader, writer = await asyncio.open_connection(sock=self.sock)
        try:
            while True:
                try:
                    message = await read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if isinstance(message, Call):
                    if message.method not in HANDLER_METHODS:
                        raise ValueError(f"not a handler: {message.method!r}")
                    getattr(handlers, message.method)(*message.args)
                elif isinstance(message, Reload) and self.proxy is not None:
                    self.proxy.reload(worker_settings(message.settings, self.hello.worker))
            # The parent is gone: nobody will send changes or stop this worker any more.
            log.warning("the parent closed the channel; stopping")
            if self.proxy is not None:
                self.proxy.force_stop()
            await asyncio.Event().wait()  # until the proxy's shutdown cancels the source
        finally:
            writer.close()


async def _serve(channel: Channel) -> int:
    from userproxy.cli import StopSignals

    hello = channel.hello
    proxy = Proxy(
        worker_settings(hello.settings, hello.worker),
        feed=channel.feed,
        admin_socket=hello.admin_socket,
    )
    channel.proxy = proxy
    stopping = StopSignals(proxy.stop, proxy.force_stop)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    await proxy.run()
    return stopping.exit_status


def main(argv: Sequence[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    hello = read_hello(sock)
    settings = hello.settings
    setup_logging(settings.log_level, settings.log_format)
    _name_the_worker(hello.worker)
    listen.REUSE_PORT = True
    ClientIPAffinity.deterministic = hello.workers > 1
    from userproxy.cli import loop_factory

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.loop)) as runner:
            return runner.run(_serve(Channel(sock, hello)))
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    finally:
        # The parent removes the directory at its exit; a parent killed outright cannot,
        # so the last worker out removes it (rmdir fails while another's socket is there).
        with contextlib.suppress(OSError):
            os.unlink(hello.admin_socket)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(hello.admin_socket))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
