"""``userproxy explain --kubeconfig``: the same explanation as ``--manifests`` for the same
objects, listed once from an API server speaking the real wire protocol
(tests/support/fake_apiserver.py), paged as ``run``'s list is; every failure to list is
one line and exit status 2.

The command runs as a child process (``run_cli``, in a thread while the fake server
serves on the test's loop).  Addresses: 127.216.0.x for API servers, 127.216.10.x for the
Services' objects (nothing connects to those).
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.process.test_cli import run_cli
from tests.support.fake_apiserver import FakeApiServer, write_kubeconfig
from tests.support.manifests import endpoint_slice, node, write

NODE_FLAGS = ("--node", "n1", "--node-address", "127.216.10.100")
READY = {"ready": True}
NOT_READY = {"ready": False, "serving": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}
#: Services without endpoints added so the Service LIST takes two pages (limit 500).
FILLERS = 510


def _service(name: str, ip: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "tcp", "port": 80}], **spec},
    }


def _slice(service: str, endpoints: Sequence[tuple[str, str, dict[str, bool]]]) -> dict[str, Any]:
    return endpoint_slice(f"{service}-1", service, 8080, endpoints=[
        {"addresses": [ip], "nodeName": node_name, "conditions": conditions}
        for ip, node_name, conditions in endpoints
    ])  # fmt: skip


def _objects() -> list[dict[str, Any]]:
    objects = [
        node("n1", "z1"),
        _service("web", "127.216.10.1"),
        _slice(
            "web",
            [
                ("127.216.10.11", "n1", READY),
                ("127.216.10.12", "n2", READY),
                ("127.216.10.13", "n1", NOT_READY),
            ],
        ),
        _service("loc", "127.216.10.2", internalTrafficPolicy="Local"),
        _slice("loc", [("127.216.10.21", "n1", READY), ("127.216.10.22", "n2", READY)]),
        _service("term", "127.216.10.3"),
        _slice(
            "term",
            [
                ("127.216.10.31", "n2", TERMINATING),
                ("127.216.10.32", "n1", TERMINATING),
                ("127.216.10.33", "n1", NOT_READY),
            ],
        ),
    ]
    objects += [
        _service(f"fill-{n:03}", f"127.216.11.{n % 250 + 1}", ports=[{"name": "p", "port": n + 1}])
        for n in range(FILLERS)
    ]
    return objects


_RESOURCES = {"Service": "services", "EndpointSlice": "endpointslices", "Node": "nodes"}


def _serve(api: FakeApiServer, objects: Sequence[dict[str, Any]]) -> None:
    for obj in objects:
        api.create(_RESOURCES[obj["kind"]], copy.deepcopy(obj))


async def _explain(*args: str) -> tuple[int, str, str]:
    result = await asyncio.to_thread(run_cli, "explain", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


async def test_api_explains_as_the_manifests_do(tmp_path: Path) -> None:
    objects = _objects()
    manifest = tmp_path / "m.json"
    write(manifest, *objects)
    async with FakeApiServer(host="127.216.0.1") as api:
        _serve(api, objects)
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        want = {
            "default/web": ["127.216.10.11:8080", "127.216.10.12:8080"],
            "default/loc": ["127.216.10.21:8080"],
            "default/term": ["127.216.10.31:8080", "127.216.10.32:8080"],
        }
        rules = {
            "default/web": "[internalTrafficPolicy: Cluster]",
            "default/loc": "[internalTrafficPolicy: Local]",
            "default/term": "[terminating fallback: used]",
        }
        for target, candidates in want.items():
            results = []
            for source in (("--manifests", str(manifest)), ("--kubeconfig", str(kubeconfig))):
                status, out, err = await _explain(target, *source, *NODE_FLAGS, "-o", "json")
                assert status == 0, err
                results.append(json.loads(out))
            from_manifests, from_api = results
            assert (from_manifests["source"], from_api["source"]) == ("manifests", "api")
            del from_manifests["source"], from_api["source"]
            # The one difference besides: the steps name their source ("not deterministic
            # from the API", "... from manifests").
            same = json.loads(json.dumps(from_api).replace("from the API", "from manifests"))
            assert same == from_manifests
            assert from_api["candidates"] == candidates
            status, text, err = await _explain(target, "--kubeconfig", str(kubeconfig), *NODE_FLAGS)
            assert status == 0, err
            assert rules[target] in text, text
            assert "(from the API)" in text.splitlines()[0]
        # Listed as run lists: paged (the Service list took a continue token), with the
        # label selector, and the own Node by field selector; never watched.
        services = api.list_requests_for("services")
        assert any("continue" in r.query for r in services), services
        assert all(r.label_selector and "!service.kubernetes.io/headless" in r.label_selector
                   for r in services)  # fmt: skip
        assert {r.field_selector for r in api.list_requests_for("nodes")} == {"metadata.name=n1"}
        assert not api.watch_requests


async def test_unknown_service_from_the_api_lists_what_exists(tmp_path: Path) -> None:
    async with FakeApiServer(host="127.216.0.1") as api:
        _serve(api, _objects()[:3])
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        status, out, err = await _explain("default/nope", "--kubeconfig", str(kubeconfig))
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert "no Service default/nope from the API server; there are: default/web:tcp" in err


async def test_unreachable_api_server_is_one_line(tmp_path: Path) -> None:
    # Nothing listens on 127.216.0.9:9: the connection is refused.
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.216.0.9:9")
    status, out, err = await _explain("default/web", "--kubeconfig", str(kubeconfig), *NODE_FLAGS)
    assert out == ""
    assert status == 2
    assert err.count("\n") == 1, err
    assert "cannot reach the API server http://127.216.0.9:9" in err, err


async def test_bad_kubeconfig_is_one_line(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("clusters: [oops\n")
    status, _, err = await _explain("default/web", "--kubeconfig", str(kubeconfig), *NODE_FLAGS)
    assert status == 2
    assert err.count("\n") == 1, err
    assert "--kubeconfig" in err
    assert "YAML syntax error" in err
    missing = tmp_path / "absent"
    status, _, err = await _explain("default/web", "--kubeconfig", str(missing), *NODE_FLAGS)
    assert status == 2
    assert err.count("\n") == 1, err
    assert "is not a file" in err


async def test_forbidden_is_one_line(tmp_path: Path) -> None:
    """An API server that answers 403 (RBAC) to every list."""

    async def forbidden(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "Forbidden",
                "code": 403,
                "message": 'services is forbidden: User "x" cannot list resource "services"',
            },
            status=403,
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", forbidden)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.216.0.2", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.216.0.2:{port}")
        status, _, err = await _explain("default/web", "--kubeconfig", str(kubeconfig), *NODE_FLAGS)
    finally:
        await runner.cleanup()
    assert status == 2
    assert err.count("\n") == 1, err
    assert "listing services failed: HTTP 403" in err
    assert "cannot list resource" in err


async def test_a_server_that_does_not_answer_is_bounded(tmp_path: Path) -> None:
    async with FakeApiServer(host="127.216.0.1") as api:
        api.hold_lists("services")
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        status, _, err = await _explain(
            "default/web", "--kubeconfig", str(kubeconfig), *NODE_FLAGS, "--timeout", "1"
        )
    assert status == 2
    assert err.count("\n") == 1, err
    assert "did not answer the lists within 1s" in err
