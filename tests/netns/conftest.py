"""Fixtures of the network-namespace tests: the lab (namespaces, backends, agents, the
proxy) for the module, one manifest file per test, and the logs on failure."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Generator, Iterator

import pytest

from tests.netns.harness import (
    DEVICE,
    METRICS_ADDRESS,
    Agent,
    Lab,
    LabError,
    ManifestFile,
    NoPrivilege,
    backends,
    eventually,
    ip,
    network_namespaces,
    userproxy,
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Client and node namespaces, the backends, userproxy in the node namespace and one
    agent per namespace; everything stopped and both namespaces deleted at the end (the
    namespaces' deletion is checked by ``network_namespaces``)."""
    base = tmp_path_factory.mktemp("netns")
    manifests = base / "manifests"
    manifests.mkdir()
    logs = base / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stack:
        try:
            client_ns, node_ns = stack.enter_context(network_namespaces())
        except NoPrivilege as exc:
            # The one skip the issue allows: without CAP_SYS_ADMIN/CAP_NET_ADMIN no
            # namespace can be made. Any other failure fails. CI runs as root.
            pytest.skip(str(exc))
        log = stack.enter_context((logs / "helpers.log").open("ab"))
        proxy_log = stack.enter_context((logs / "userproxy.log").open("ab"))
        stack.enter_context(backends(node_ns, log))
        proxy = stack.enter_context(userproxy(node_ns, manifests, proxy_log))
        client = Agent(client_ns, log)
        stack.callback(client.close)
        node = Agent(node_ns, log)
        stack.callback(node.close)
        the_lab = Lab(client_ns, node_ns, manifests, logs, proxy, client, node)

        def up() -> int | None:
            if proxy.poll() is not None:
                tails = "\n".join(text for _, text in the_lab.log_tails())
                raise LabError(f"userproxy exited ({proxy.returncode}):\n{tails}")
            status: int | None = node.http(*METRICS_ADDRESS, "/healthz").get("status")
            return status

        eventually(up, lambda status: status == 200, within=15, what="userproxy up")
        ip("-n", node_ns, "link", "show", DEVICE)  # --manage-addresses made its device
        yield the_lab
        assert proxy.poll() is None, f"userproxy exited early ({proxy.returncode})"


@pytest.fixture
def manifest(lab: Lab, request: pytest.FixtureRequest) -> Iterator[ManifestFile]:
    """This test's manifest file; emptied at the end, and the proxy seen to drop it."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    file = ManifestFile(lab.manifests / f"{name}.json")
    file.write()
    try:
        yield file
    finally:
        file.write()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test shows the tails of the proxy's and the helpers' logs."""
    report = yield
    lab = getattr(item, "funcargs", {}).get("lab")
    if report.failed and isinstance(lab, Lab):
        for name, text in lab.log_tails():
            report.sections.append((f"netns {name}", text))
    return report
