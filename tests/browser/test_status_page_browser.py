"""The status page live in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by the ``chromium`` fixture when missing; .ci/run installs
them first) driven by selenium, against a proxy on the test's loop (both loops) serving
two Services with real echo backends and open connections through it.

The page is opened once; then one endpoint goes not ready, then a Service is deleted, and
each change must show on the open page within 2 s, with no reload (a marker set on
``window`` before the changes is still there after them) and with what was typed into
the search box, and its focus, kept.  Then, with JavaScript off, the page is still
whole, its search still works (a plain form), and a change does not show by itself.

The screenshot: every run saves one into ``tmp_path`` (and checks it is a PNG); with
``USERPROXY_SCREENSHOT=PATH`` (relative to the repository) it is also written there.
docs/status-page.png is made so:
``USERPROXY_SCREENSHOT=docs/status-page.png .venv/bin/pytest tests/browser -k 'not uvloop'``
(taken after the first change: one endpoint not ready, four connections open).

Addresses: Services on 127.215.2.x, backends on 127.215.2.1x-2x, the metrics server on
127.215.2.100 (tests/admin/test_live_status.py uses 127.215.1.x).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By

from tests.support.backends import Backend, echo
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import running_proxy, wait_for_sync, wait_listening, wait_until

# The first run may install Chromium with apt (minutes); the test itself takes seconds.
pytestmark = [pytest.mark.both_loops, pytest.mark.timeout(600)]

REPO = Path(__file__).parents[2]
METRICS_IP = "127.215.2.100"
WEB = ("127.215.2.1", 8080)
API = ("127.215.2.2", 9090)
WEB_IPS = ("127.215.2.11", "127.215.2.12", "127.215.2.13")
API_IPS = ("127.215.2.21", "127.215.2.22")
#: How soon a change must show on the open page.
WITHIN = 2.0


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """The Chromium binary and its driver, installed from Debian if missing (as root)."""
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y -qq chromium chromium-driver >/dev/null",
            shell=True,
            check=True,
            timeout=540,
        )
    version = subprocess.run(
        ["chromium", "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    assert "Chromium" in version.stdout, version
    # The real binary, not Debian's wrapper script (which adds flags of its own).
    binary = "/usr/lib/chromium/chromium"
    if not os.path.exists(binary):
        binary = str(shutil.which("chromium"))
    return binary, str(shutil.which("chromedriver"))


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def browser(chromium: tuple[str, str], tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a profile and a config directory of its own (its crash
    handler's database goes there, not into ~/.config); quit at the end, and every process
    it started, the driver, the browser, its helpers and the crash handlers (which detach
    to init at once), must be gone: none left whose command line names ``tmp_path``."""
    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    driver = webdriver.Chrome(options=options, service=DriverService(driver_path, env=env))
    assert driver.service.process is not None
    driver_pid = driver.service.process.pid
    started: set[int] = set()
    try:
        yield driver
    finally:
        started = {driver_pid, *descendants(driver_pid)}
        driver.quit()
    # Exited ones may stay zombies for a moment, until init reaps them: they count as gone.
    wait_until(
        lambda: not any(alive(pid) for pid in started) and not named(str(tmp_path)),
        10,
        "the browser's processes to end",
    )


def named(text: str) -> list[str]:
    """The processes (not zombies) whose command line holds ``text``."""
    found = subprocess.run(
        ["pgrep", "-af", text], check=False, capture_output=True, text=True
    ).stdout.splitlines()
    return [line for line in found if alive(int(line.split()[0]))]


def slice_of(
    name: str, service_name: str, port_name: str, port: int, rows: list[tuple[str, str, bool]]
) -> dict[str, Any]:
    """An EndpointSlice with one endpoint per (ip, node, ready), zones by node."""
    return endpoint_slice(name, service_name, port, port_name=port_name, endpoints=[
        {
            "addresses": [ip],
            "nodeName": node,
            "zone": "zone-a" if node == "test-node" else "zone-b",
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
        }
        for ip, node, ready in rows
    ])  # fmt: skip


def write_manifests(
    path: Path, web_port: int, api_port: int, *, web3_ready: bool = True, api: bool = True
) -> None:
    objects = [
        service("web", WEB[0], {"http": WEB[1]}),
        slice_of(
            "web-1",
            "web",
            "http",
            web_port,
            [
                (WEB_IPS[0], "test-node", True),
                (WEB_IPS[1], "node-b", True),
                (WEB_IPS[2], "node-b", web3_ready),
            ],
        ),
    ]
    if api:
        objects += [
            service("api", API[0], {"grpc": API[1]}),
            slice_of(
                "api-1",
                "api",
                "grpc",
                api_port,
                [(API_IPS[0], "test-node", True), (API_IPS[1], "node-b", True)],
            ),
        ]
    write(path / "demo.json", *objects)


def free_port(ip: str) -> int:
    with socket.socket() as probe:
        probe.bind((ip, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_page(driver: webdriver.Chrome, script: str, *args: object) -> float:
    """Poll ``script`` in the page every 50 ms until it returns true; the seconds it took
    (fails after ``WITHIN`` s)."""
    started = time.monotonic()
    while not driver.execute_script(script, *args):
        assert time.monotonic() - started < WITHIN, f"not on the page within {WITHIN}s: {script}"
        time.sleep(0.05)
    return time.monotonic() - started


#: Finds ``row``: the table row whose first cell is ``arguments[0]`` (an endpoint).
ROW = """
const row = [...document.querySelectorAll("main tr")]
  .find((r) => r.cells[0].textContent === arguments[0]);
"""
#: The row's class ("" ready, "not-ready"), or null when there is no such row.
ROW_CLASS = ROW + "return row === undefined ? null : row.className;"


async def test_status_page_updates_live_in_chromium(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    driver = browser
    backends = [Backend(ip, echo) for ip in WEB_IPS[:1]]
    backends += [Backend(ip, echo, port=backends[0].port) for ip in WEB_IPS[1:]]
    backends += [Backend(API_IPS[0], echo)]
    backends += [Backend(API_IPS[1], echo, port=backends[-1].port)]
    web_port, api_port = backends[0].port, backends[-1].port
    write_manifests(tmp_path, web_port, api_port)
    port = free_port(METRICS_IP)
    base = f"http://{METRICS_IP}:{port}"
    conns: list[socket.socket] = []
    try:
        async with running_proxy(tmp_path, metrics_bind_address=f"{METRICS_IP}:{port}") as proxy:
            # Connections held open through the proxy: the page shows them per endpoint.
            for address, count in ((WEB, 3), (API, 1)):
                await asyncio.to_thread(wait_listening, address)
                for _ in range(count):
                    conn = await asyncio.to_thread(socket.create_connection, address, 5)
                    conns.append(conn)
                    await asyncio.to_thread(conn.sendall, b"hello through userproxy\n")
                    assert await asyncio.to_thread(conn.recv, 64) == b"hello through userproxy\n"

            # The page as served, then live (the script's badge says so once its stream
            # delivered the first message and the first fragment was swapped in).
            await asyncio.to_thread(driver.get, f"{base}/")
            run: Callable[..., Any] = driver.execute_script
            took = await asyncio.to_thread(
                wait_page, driver, "return document.getElementById('live').className === 'live'"
            )
            print(f"\npage live {took * 1000:.0f} ms after load")
            heading = await asyncio.to_thread(driver.find_element, By.ID, "default/web")
            assert heading.text == "default/web"
            assert await asyncio.to_thread(driver.find_element, By.ID, "default/api")
            for ip in (*WEB_IPS, *API_IPS):
                port_of = web_port if ip in WEB_IPS else api_port
                assert await asyncio.to_thread(run, ROW_CLASS, f"{ip}:{port_of}") == ""
            await asyncio.to_thread(run, "window.liveMarker = 'set before the changes'")

            # Change 1: one endpoint of web not ready.
            started = time.monotonic()
            write_manifests(tmp_path, web_port, api_port, web3_ready=False)
            script = ROW + "return row !== undefined && row.className === 'not-ready';"
            await asyncio.to_thread(wait_page, driver, script, f"{WEB_IPS[2]}:{web_port}")
            took = time.monotonic() - started
            print(f"endpoint not ready on the page {took * 1000:.0f} ms after the change")
            assert took < WITHIN
            page = await asyncio.to_thread(lambda: driver.page_source)
            assert "default/web:http 3 -&gt; 2 ready endpoints" in page
            assert await asyncio.to_thread(run, "return window.liveMarker") == (
                "set before the changes"
            )
            await asyncio.to_thread(screenshot, driver, tmp_path / "status-page.png")

            # Something typed into the search box (not submitted) and its focus stay.
            box = await asyncio.to_thread(driver.find_element, By.NAME, "q")
            await asyncio.to_thread(box.send_keys, "def")

            # Change 2: api deleted.
            started = time.monotonic()
            write_manifests(tmp_path, web_port, api_port, web3_ready=False, api=False)
            await asyncio.to_thread(
                wait_page, driver, "return document.getElementById('default/api') === null"
            )
            took = time.monotonic() - started
            print(f"Service gone from the page {took * 1000:.0f} ms after the change")
            assert took < WITHIN
            assert await asyncio.to_thread(driver.find_element, By.ID, "default/web")
            assert await asyncio.to_thread(run, "return window.liveMarker") == (
                "set before the changes"
            )
            assert await asyncio.to_thread(box.get_attribute, "value") == "def"
            assert await asyncio.to_thread(run, "return document.activeElement.name") == "q"

            # With JavaScript off: the same page, no badge, and the search is a plain form.
            await asyncio.to_thread(
                driver.execute_cdp_cmd, "Emulation.setScriptExecutionDisabled", {"value": True}
            )
            await asyncio.to_thread(driver.get, f"{base}/?q=nothing-matches")
            box = await asyncio.to_thread(driver.find_element, By.NAME, "q")
            await asyncio.to_thread(box.clear)
            await asyncio.to_thread(box.send_keys, "WEB\n")
            await asyncio.to_thread(
                wait_until, lambda: driver.current_url == f"{base}/?q=WEB", 5, "the search"
            )
            heading = await asyncio.to_thread(driver.find_element, By.ID, "default/web")
            assert heading.text == "default/web"
            # Not live: a change does not show, looked for as long as a live page gets.
            syncs = proxy.proxier.status.syncs
            write_manifests(tmp_path, web_port, api_port, web3_ready=True, api=False)
            await wait_for_sync(proxy, syncs)
            await asyncio.sleep(WITHIN)
            row = await asyncio.to_thread(
                driver.find_element, By.XPATH, f"//main//tr[td[1]='{WEB_IPS[2]}:{web_port}']"
            )
            assert await asyncio.to_thread(row.get_attribute, "class") == "not-ready"
            badge = await asyncio.to_thread(driver.find_element, By.ID, "live")
            assert await asyncio.to_thread(lambda: badge.text) == ""
    finally:
        for conn in conns:
            conn.close()
        for backend in backends:
            backend.stop()


def screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """The whole page (not only the window) as a PNG at ``path``, and at
    $USERPROXY_SCREENSHOT when set, through the DevTools protocol."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    path.write_bytes(png)
    extra = os.environ.get("USERPROXY_SCREENSHOT")
    if extra:
        (REPO / extra).write_bytes(png)
