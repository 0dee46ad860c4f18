"""Hostile manifests: limits, non-regular files, the reader child process, bounded messages.

Every case uses real files in ``tmp_path``.  What must hold (``manifest_read.py``,
``manifest_worker.py``): a bad file gives a ManifestError line naming it (never another
exception, never a hang), the running source keeps its last good state, and messages stay
bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from tests.support.manifest_cases import (
    BAD,
    Fixture,
    age,
    endpoint_slice,
    key,
    load_error,
    service,
    write_bad,
    write_text,
    write_yaml,
)
from tests.support.proxyrun import eventually
from userproxy.sources import manifest_worker
from userproxy.sources.manifest_files import load_manifests
from userproxy.sources.manifest_read import (
    MAX_FILE_BYTES,
    MAX_PROBLEM_CHARS,
    MAX_SHOWN_PROBLEMS,
    MAX_TOTAL_BYTES,
    ManifestError,
    list_manifest_files,
    read_manifest_file,
)
from userproxy.sources.manifests import INLINE_BYTES

# --------------------------------------------------------------------------- the bad inputs


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_one_problem_naming_the_file(tmp_path: Path, case: str) -> None:
    name, content, expected = BAD[case]
    path = write_bad(tmp_path / name, content)
    started = time.monotonic()
    error = load_error([path])
    assert len(error.problems) == 1, error.problems
    assert str(error).startswith(f"{path}: "), str(error)
    assert expected in str(error), str(error)
    assert len(str(error)) <= MAX_PROBLEM_CHARS
    assert time.monotonic() - started < 5


def test_deep_yaml_error_names_the_document_and_line(tmp_path: Path) -> None:
    deep = "- " * 300 + "x\n"
    first = yaml.safe_dump(service("ok"))
    first_lines = first.count("\n")
    path = write_text(tmp_path / "web.yaml", first + "---\n" + deep)
    assert str(load_error([path])) == (
        f"{path}: document 2: line {first_lines + 2}, column 401: nested more than 200 levels deep"
    )


def test_nesting_up_to_the_limit_is_fine(tmp_path: Path) -> None:
    items = "[" * 150 + "]" * 150
    json_text = f'{{"apiVersion": "v1", "kind": "C", "d": {items}}}'
    path = write_text(tmp_path / "deep.json", json_text)
    write_text(tmp_path / "deep.yaml", f"apiVersion: v1\nkind: ConfigMap\nd: {items}\n")
    assert load_manifests([path, tmp_path / "deep.yaml"]).services == {}


def test_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "web.yaml",
        "apiVersion: v1\nkind: List\nitems:\n"
        "- apiVersion: v1\n  kind: Service\n"
        "  metadata: &meta {name: web, namespace: shop}\n"
        "  spec: &spec {clusterIP: 10.96.0.1, ports: [{name: http, port: 0x50}]}\n"
        "- apiVersion: v1\n  kind: Service\n"
        "  metadata: {<<: *meta, name: api}\n"
        "  spec: {<<: *spec, clusterIP: 10.96.0.2,\n"
        "         ports: [{name: a, port: 1_000}, {name: b, port: 81}]}\n",
    )
    state = load_manifests([path])
    assert state.services[key("web", "shop")].ports[0].port == 80
    assert [p.port for p in state.services[key("api", "shop")].ports] == [1000, 81]


# --------------------------------------------------------------------------- files that are not


def test_fifo_named_explicitly_is_a_problem_and_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "web.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert str(load_error([fifo])) == f"{fifo}: not a regular file (a FIFO)"
    assert time.monotonic() - started < 2


def test_fifo_opened_by_a_racing_replace_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stat said "regular", then the path became a FIFO: O_NONBLOCK + fstat still catch it.
    fifo = tmp_path / "web.yaml"
    os.mkfifo(fifo)
    real_stat = os.stat

    def lying_stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        return real_stat(tmp_path / "regular" if path == fifo else path)  # type: ignore[arg-type]

    (tmp_path / "regular").write_text("x")
    monkeypatch.setattr(os, "stat", lying_stat)
    with pytest.raises(ManifestError, match=r"not a regular file \(a FIFO\)"):
        read_manifest_file(fifo)


def test_fifo_and_other_entries_in_a_directory_are_skipped(tmp_path: Path) -> None:
    write_yaml(tmp_path / "api.yaml", service("api"))
    os.mkfifo(tmp_path / "web.yaml")
    (tmp_path / "sub.yaml").mkdir()
    listing = list_manifest_files([tmp_path])
    assert listing.files == (tmp_path / "api.yaml",)
    state = load_manifests([tmp_path])
    assert set(state.services) == {key("api")}
    assert state.skipped == (
        f"{tmp_path / 'sub.yaml'}: not a regular file (a directory)",
        f"{tmp_path / 'web.yaml'}: not a regular file (a FIFO)",
    )


def test_character_device_named_explicitly_is_a_problem() -> None:
    assert (
        str(load_error([Path("/dev/zero")])) == "/dev/zero: not a regular file (a character device)"
    )


def test_file_over_the_size_limit_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk
    assert str(load_error([path])) == (
        f"{path}: {MAX_FILE_BYTES + 1} bytes, more than the limit of {MAX_FILE_BYTES}"
    )
    small = write_text(tmp_path / "small.yaml", "x" * 100)
    with pytest.raises(ManifestError, match="100 bytes, more than the limit of 99"):
        read_manifest_file(small, limit=99)


def test_files_over_the_total_limit_are_not_read(tmp_path: Path) -> None:
    count = MAX_TOTAL_BYTES // MAX_FILE_BYTES + 1
    for i in range(count):
        with (tmp_path / f"f{i}.yaml").open("wb") as f:
            f.truncate(MAX_FILE_BYTES)
    error = load_error([tmp_path])
    assert f"more than the limit of {MAX_TOTAL_BYTES}" in str(error)


# --------------------------------------------------------------------------- bounded messages


@pytest.mark.parametrize(
    "where",
    ["metadata.name", "spec.clusterIP", "label-key", "spec.type", "protocol", "kind"],
)
def test_ten_megabyte_value_gives_a_bounded_message(tmp_path: Path, where: str) -> None:
    huge = "a" * 10_000_000
    obj = service("web")
    spec = obj["spec"]
    assert isinstance(spec, dict)
    if where == "metadata.name":
        obj["metadata"] = {"name": huge}
    elif where == "spec.clusterIP":
        spec["clusterIP"] = huge
    elif where == "label-key":
        obj["metadata"] = {"name": "web", "labels": {huge: 1}}
    elif where == "spec.type":
        spec["type"] = huge
    elif where == "protocol":
        spec["ports"] = [{"name": "p", "port": 1, "protocol": huge}]
    else:
        obj["kind"] = huge
    path = write_text(tmp_path / "web.json", json.dumps(obj))
    started = time.monotonic()
    if where == "kind":
        assert load_manifests([path]).services == {}  # an unknown kind is ignored
        return
    error = load_error([path])
    print(f"{where}: {len(str(error))} characters: {str(error)[-150:]}")
    assert len(error.problems) == 1
    assert len(str(error)) <= MAX_PROBLEM_CHARS
    assert str(error).startswith(f"{path}: document 1: Service ")
    assert time.monotonic() - started < 10


def test_fifty_thousand_invalid_items_give_a_bounded_message(tmp_path: Path) -> None:
    items = [service(f"s{i}", port=0) for i in range(50_000)]
    path = write_text(
        tmp_path / "many.json", json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    error = load_error([path])
    text = str(error)
    lines = text.splitlines()
    print(f"50 000 invalid items: {len(text)} characters, {len(lines)} lines")
    assert len(error.problems) == 50_000
    assert lines[0] == "50000 problems in the manifests:"
    assert len(lines) == 1 + MAX_SHOWN_PROBLEMS + 1
    assert lines[-1] == f"  ... and {50_000 - MAX_SHOWN_PROBLEMS} more"
    assert len(text) <= (MAX_SHOWN_PROBLEMS + 2) * (MAX_PROBLEM_CHARS + 2)


async def test_reload_error_log_is_bounded(
    running: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    fx = running
    items = [service(f"s{i}", port=0) for i in range(5_000)]
    items.append(service("x" * 1_000_000))
    with caplog.at_level(logging.ERROR, logger="userproxy.sources.manifests"):
        write_text(
            fx.dir / "web.json", json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        )
        await eventually(lambda: len(fx.errors) == 1, within=20, what="the reload error")
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    message = record.getMessage()
    print(f"reload error log: {len(message)} characters, {message.count(chr(10)) + 1} lines")
    assert len(message) < 15_000
    assert message.count("\n") <= MAX_SHOWN_PROBLEMS + 2
    assert "... and 4981 more" in message


# --------------------------------------------------------------------------- the running source


@pytest.fixture
async def running(fx: Fixture) -> AsyncIterator[Fixture]:
    async with fx.running():
        yield fx


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    fixture = Fixture(tmp_path)
    age(*fixture.dir.iterdir())  # only what a test changes is read again
    return fixture


@pytest.mark.parametrize("case", list(BAD))
async def test_running_source_keeps_the_last_good_state(running: Fixture, case: str) -> None:
    fx = running
    before = fx.state()
    name, content, expected = BAD[case]
    path = fx.dir / name
    if name != "web.yaml":
        (fx.dir / "web.yaml").unlink()  # the objects move to the bad file
    write_bad(path, content)
    await eventually(lambda: len(fx.errors) == 1, within=10)
    assert str(fx.errors[0]).startswith(f"{path}: "), str(fx.errors[0])
    assert expected in str(fx.errors[0])
    await fx.polled()
    assert fx.handlers.calls == []
    assert fx.source.state is before

    path.unlink()
    write_yaml(fx.dir / "web.yaml", service("web", port=81), endpoint_slice("web-1", "web"))
    await eventually(lambda: bool(fx.handlers.calls), within=10)
    assert fx.state().services[key("web")].ports[0].port == 81


async def test_running_source_skips_a_fifo_and_applies_the_rest(
    running: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    fx = running
    before = fx.state()
    web = fx.dir / "web.yaml"
    with caplog.at_level(logging.ERROR, logger="userproxy.sources.manifests"):
        web.unlink()
        os.mkfifo(web)
        # Its objects go, as for a deleted file; the rest keeps working.
        await eventually(lambda: key("web") not in fx.state().services, within=10)
        write_yaml(fx.dir / "api.yaml", service("api", cluster_ip="10.96.0.2", port=90))
        await eventually(lambda: fx.state().services[key("api")].ports[0].port == 90, within=10)
        await fx.polled()
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"manifest skipped: {web}: not a regular file (a FIFO)"]  # once
    assert fx.errors == []

    web.unlink()
    write_yaml(web, service("web"), endpoint_slice("web-1", "web"))
    await eventually(lambda: key("web") in fx.state().services, within=10)
    assert fx.state().services[key("web")] == before.services[key("web")]


# --------------------------------------------------------------------------- the child process


def place(path: Path, content: str) -> Path:
    """Write ``content``, backdated, then rename it to ``path`` (one change, never racy)."""
    tmp = write_text(path.with_name(path.name + ".tmp"), content)
    age(tmp)
    tmp.replace(path)
    return path


def big_manifest(path: Path, count: int, **labels: str) -> Path:
    """``count`` Services (10.{i}) in one YAML file, larger than INLINE_BYTES for 200+."""
    docs = []
    for i in range(count):
        obj = service(f"s{i}", cluster_ip=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        if labels:
            obj["metadata"] = {"name": f"s{i}", "labels": dict(labels)}
        docs.append(obj)
    return place(path, yaml.safe_dump_all(docs, sort_keys=False))


async def test_large_reload_is_read_by_a_child_process(running: Fixture) -> None:
    fx = running
    path = big_manifest(fx.dir / "bulk.yaml", 500)
    assert path.stat().st_size > INLINE_BYTES
    await eventually(lambda: len(fx.state().services) == 502, within=10)
    assert fx.source.worker_reads >= 1
    expected = load_manifests([fx.dir])
    assert fx.state().services == expected.services
    adds = [call for call in fx.handlers.calls if call[0] == "service_add"]
    assert len(adds) == 500


async def test_large_bad_reload_in_the_child_keeps_the_state(running: Fixture) -> None:
    fx = running
    before = fx.state()
    padding = "# padding\n" * (INLINE_BYTES // 10)
    place(fx.dir / "bulk.yaml", padding + "a: " + "[" * 5000 + "]" * 5000)
    await eventually(lambda: len(fx.errors) == 1, within=10)
    assert fx.source.worker_reads == 1
    assert str(fx.errors[0]) == (
        f"{fx.dir / 'bulk.yaml'}: document 1: line {INLINE_BYTES // 10 + 1}, column 203: "
        "nested more than 200 levels deep"
    )
    assert fx.source.state is before


def _children() -> set[int]:
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids.update(int(pid) for pid in f.read().split())
    return pids


async def test_cancelling_a_reload_kills_the_child(fx: Fixture) -> None:
    fx.source.initial_load()
    before = _children()
    # Written as text: PyYAML's emitter would take seconds for 20 000 objects.
    place(
        fx.dir / "bulk.yaml",
        "".join(
            f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\n"
            f"spec: {{clusterIP: 10.1.{i // 256 % 256}.{i % 256}, ports: [{{port: 80}}]}}\n"
            for i in range(20_000)
        ),
    )
    task = asyncio.create_task(fx.source.run())
    await eventually(lambda: fx.source.worker_reads == 1, within=10)
    await eventually(lambda: bool(_children() - before), within=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _children() - before == set()


async def test_a_child_that_dies_is_a_reload_error(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx.source.initial_load()
    monkeypatch.setattr(manifest_worker, "_WORKER_CODE", "import os; os.kill(os.getpid(), 9)")
    big_manifest(fx.dir / "bulk.yaml", 500)
    await fx.source.poll()
    assert [str(e) for e in fx.errors] == [
        f"reading {fx.dir / 'bulk.yaml'} failed: the reader process was killed by SIGKILL"
    ]


async def test_a_child_that_hangs_is_killed_after_the_timeout(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx.source.initial_load()
    monkeypatch.setattr(manifest_worker, "_WORKER_CODE", "import time; time.sleep(60)")
    monkeypatch.setattr(manifest_worker, "WORKER_TIMEOUT", 0.5)
    big_manifest(fx.dir / "bulk.yaml", 500)
    before = _children()
    await fx.source.poll()
    assert [str(e) for e in fx.errors] == [f"reading {fx.dir / 'bulk.yaml'} took more than 0.5s"]
    assert _children() <= before


def test_a_pipe_is_refused_without_blocking() -> None:
    # Opening a FIFO for reading blocks until a writer comes; it must never be opened.
    fd_read, fd_write = os.pipe()
    try:
        started = time.monotonic()
        with pytest.raises(ManifestError, match=r"not a regular file \(a FIFO\)"):
            read_manifest_file(Path(f"/proc/self/fd/{fd_read}"))
        assert time.monotonic() - started < 1
    finally:
        os.close(fd_read)
        os.close(fd_write)


async def test_a_child_that_sends_garbage_is_a_reload_error(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx.source.initial_load()
    garbage = "import sys; sys.stdout.buffer.write(bytes([0, 0, 0, 5]) + b'hello')"
    monkeypatch.setattr(manifest_worker, "_WORKER_CODE", garbage)
    big_manifest(fx.dir / "bulk.yaml", 500)
    await fx.source.poll()
    assert [str(e) for e in fx.errors] == [
        f"reading {fx.dir / 'bulk.yaml'} failed: unreadable result (UnpicklingError)"
    ]


@pytest.mark.both_loops
async def test_cancelling_a_reload_whose_output_is_backed_up_ends_promptly(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the parent has stopped reading and the child's output fills the
    pipe (stdout paused): the read ends at once, the child is gone and no pipe is left open
    (asyncio's wait() waited for the pipes forever; uvloop failed at loop close)."""
    fx.source.initial_load()
    stalled = asyncio.Event()

    class Stalling:
        def __init__(self, **_: object) -> None:
            pass

        async def check(self) -> None:  # after the first frame: the parent stops reading
            stalled.set()
            await asyncio.Event().wait()

    monkeypatch.setattr(manifest_worker, "Slicer", Stalling)
    before = _children()
    big_manifest(fx.dir / "bulk.yaml", 5000)
    task = asyncio.create_task(fx.source.poll())
    async with asyncio.timeout(20):
        await stalled.wait()
    await asyncio.sleep(0.5)  # the child writes on until the pipe and the buffer are full
    task.cancel()
    async with asyncio.timeout(10):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert _children() - before == set()
