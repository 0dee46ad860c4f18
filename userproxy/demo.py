"""``userproxy demo``: three HTTP backends on 127.0.60.x, proxied from 127.0.50.1:8080.

The backends answer every request with their name, so repeated requests show the
balancing; editing the manifests (examples/demo/) while the demo runs shows the proxy
following changes without a restart.  Everything binds to 127.0.0.0/8: no root needed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from aiohttp import web

from userproxy.config import Settings
from userproxy.proxy import Proxy

log = logging.getLogger(__name__)

DEMO_NODE = "demo-node"
BACKENDS = (("web-1", "127.0.60.1"), ("web-2", "127.0.60.2"), ("web-3", "127.0.60.3"))
BACKEND_PORT = 9376
SERVICE_ADDRESS = ("127.0.50.1", 8080)


def demo_manifests(requested: Path | None) -> Path:
    """The manifest directory to serve: the one asked for, ./examples/demo, or a copy of
    the packaged manifests in a temporary directory (for an installed userproxy)."""
    if requested is not None:
        return requested
    local = Path("examples/demo")
    if local.is_dir() and any(local.glob("*.yaml")):
        return local
    target = Path(tempfile.mkdtemp(prefix="userproxy-demo-"))
    packaged = resources.files("userproxy") / "demo_manifests"
    for entry in packaged.iterdir():
        if entry.name.endswith(".yaml"):
            with resources.as_file(entry) as source:
                shutil.copy(source, target / entry.name)
    return target


async def start_backends() -> list[web.AppRunner]:
    """Start the three demo backends; each answers ``<name> (<ip>)``."""
    runners: list[web.AppRunner] = []
    for name, ip in BACKENDS:

        async def hello(request: web.Request, name: str = name, ip: str = ip) -> web.Response:
            return web.Response(text=f"hello from {name} ({ip})\n")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip, BACKEND_PORT).start()
        runners.append(runner)
    return runners


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
  curl -s http://127.0.0.1:10249/metrics | grep -E '^(userproxy|kubeproxy)_'
  curl -s http://127.0.0.1:10256/healthz

Press Ctrl-C to stop.
"""


async def run_demo(
    settings: Settings, install_signals: Callable[[Callable[[], None]], None]
) -> None:
    runners = await start_backends()
    try:
        proxy = Proxy(settings)
        install_signals(proxy.stop)
        serving = asyncio.ensure_future(proxy.run())
        synced = asyncio.ensure_future(proxy.synced.wait())
        await asyncio.wait({serving, synced}, return_when=asyncio.FIRST_COMPLETED)
        if synced.done():
            print(instructions(settings.manifests[0]), flush=True)
        else:
            synced.cancel()
        await serving
    finally:
        for runner in runners:
            await runner.cleanup()
