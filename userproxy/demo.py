"""``userproxy demo``: three HTTP backends on 127.0.60.x, proxied from 127.0.50.1:8080.

The backends answer every request with their name, so repeated requests show the
balancing; editing the manifests (examples/demo/) while the demo runs shows the proxy
following changes without a restart.  Everything binds to 127.0.0.0/8: no root needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Final

from aiohttp import web

from userproxy.config import ConfigError, Settings, SettingsValues
from userproxy.proxy import Proxy

log = logging.getLogger(__name__)

BACKENDS = (("web-1", "127.0.60.1"), ("web-2", "127.0.60.2"), ("web-3", "127.0.60.3"))
BACKEND_PORT = 9376
SERVICE_ADDRESS = ("127.0.50.1", 8080)
#: The demo's own defaults (flags and the config file still override them): a node name
#: that matches the demo manifests, and a health server on loopback (one machine).
DEMO_DEFAULTS: Final[SettingsValues] = {
    "hostname": "demo-node",
    "healthz_bind_address": "127.0.0.1:10256",
}


@contextlib.contextmanager
def demo_manifests(requested: Path | None) -> Iterator[Path]:
    """The manifest directory to serve: the one asked for, ./examples/demo, or a copy of
    the packaged manifests in a temporary directory (for an installed userproxy), which is
    removed when the block ends (a demo run leaves nothing behind)."""
    if requested is not None:
        yield requested
        return
    local = Path("examples/demo")
    if local.is_dir() and any(local.glob("*.yaml")):
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="userproxy-demo-") as name:
        target = Path(name)
        packaged = resources.files("userproxy") / "demo_manifests"
        for entry in packaged.iterdir():
            if entry.name.endswith(".yaml"):
                with resources.as_file(entry) as source:
                    shutil.copy(source, target / entry.name)
        yield target


async def start_backends() -> list[web.ServerRunner]:
    """Start the three demo backends, each answering ``hello from <name> (<ip>)``;
    ConfigError when one cannot listen, with those already started cleaned up."""
    runners: list[web.ServerRunner] = []
    try:
        for name, ip in BACKENDS:

            async def hello(_: web.BaseRequest, name: str = name, ip: str = ip) -> web.Response:
                return web.Response(text=f"hello from {name} ({ip})\n")  # any method, any path

            runner = web.ServerRunner(web.Server(hello, access_log=None))
            await runner.setup()
            runners.append(runner)
            try:
                await web.TCPSite(runner, ip, BACKEND_PORT).start()
            except OSError as exc:
                raise ConfigError(_cannot_listen(ip, BACKEND_PORT, exc)) from None
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return runners


def _cannot_listen(ip: str, port: int, exc: OSError) -> str:
    hint = " (is another userproxy demo running?)" if exc.errno == errno.EADDRINUSE else ""
    return f"demo: cannot listen on {ip}:{port}: {exc.strerror or exc}{hint}"


def instructions(manifests: Path) -> str:
    ip, port = SERVICE_ADDRESS
    return f"""
userproxy demo is running.

  Service demo/web  ->  {ip}:{port}  ->  {", ".join(f"{b}:{BACKEND_PORT}" for _, b in BACKENDS)}

Try:
  for i in $(seq 9); do curl -s http://{ip}:{port}/; done     # answers rotate over web-1..3
  $EDITOR {manifests / "web-endpoints.yaml"}
      # set `ready: false` on one endpoint: within a second it gets no new connections
      # set `endpoints: []`: connections to {ip}:{port} are refused at once
  curl -s http://{ip}:{port}/                                   # see the change, no restart

Watch it work:
  open http://127.0.0.1:10249/ in a browser        # the status page, live
  userproxy status                                  # the same in the terminal
  userproxy explain demo/web --server http://127.0.0.1:10249
                                                    # why a connection goes where it goes
  curl -s http://127.0.0.1:10249/metrics | grep -E '^(userproxy|kubeproxy)_'
  curl -s http://127.0.0.1:10256/healthz
  (run the demo with --access-log - to see one line per connection)

Press Ctrl-C to stop.
"""


def _service_not_listening(proxy: Proxy) -> str | None:
    """Why the demo Service's address does not listen after the first sync, if it does not."""
    for listener in proxy.listeners:
        if (listener.spec.ip, listener.spec.port) == SERVICE_ADDRESS:
            error = listener.bind_error
            return None if error is None else _cannot_listen(*SERVICE_ADDRESS, error)
    return None  # other manifests (--manifests DIR): nothing to check


async def _ready(proxy: Proxy, settings: Settings) -> None:
    await proxy.synced.wait()
    if settings.metrics_address is not None:
        # Not forever: a metrics port that is taken is retried (and logged) by its server;
        # the demo itself still works.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await proxy.metrics_ready.wait()


async def run_demo(settings: Settings, install_signals: Callable[[Proxy], object]) -> None:
    runners = await start_backends()
    try:
        proxy = Proxy(settings)
        install_signals(proxy)
        serving = asyncio.ensure_future(proxy.run())
        # Ready when synced and (unless turned off) the metrics server listens: the
        # instructions point at its status page.
        synced = asyncio.ensure_future(_ready(proxy, settings))
        await asyncio.wait({serving, synced}, return_when=asyncio.FIRST_COMPLETED)
        if not synced.done():
            synced.cancel()
        elif (problem := _service_not_listening(proxy)) is not None:
            # Say so and stop rather than print "is running" over a dead address.
            proxy.stop()
            await serving
            raise ConfigError(problem)
        else:
            print(instructions(settings.manifests[0]), flush=True)
        await serving
    finally:
        for runner in runners:
            await runner.cleanup()
