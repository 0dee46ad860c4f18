"""Incremental manifest reloads: unchanged files are not read again, and inotify makes an
edit visible at once even when the fallback poll is slow."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.support.manifest_cases import (
    RecordingHandlers,
    age,
    endpoint_slice,
    service,
    write_yaml,
)
from tests.support.proxyrun import eventually
from userproxy.sources.manifests import (
    ManifestCache,
    ManifestError,
    ManifestSource,
    load_manifests,
)


def test_only_changed_files_are_read_again(tmp_path: Path) -> None:
    files = [
        write_yaml(tmp_path / f"svc-{i}.yaml", service(f"s{i}", cluster_ip=f"10.96.0.{i + 1}"))
        for i in range(20)
    ]
    age(*files)
    cache = ManifestCache()
    first = load_manifests([tmp_path], cache=cache)
    assert cache.reads == 20
    again = load_manifests([tmp_path], cache=cache)
    assert cache.reads == 20  # nothing changed, nothing read
    assert again.services[next(iter(first.services))] is first.services[next(iter(first.services))]
    write_yaml(files[3], service("s3", cluster_ip="10.96.1.4"))
    changed = load_manifests([tmp_path], cache=cache)
    assert cache.reads == 21
    assert len(changed.services) == 20
    files[5].unlink()
    assert len(load_manifests([tmp_path], cache=cache).services) == 19


def test_duplicates_across_cached_files_are_still_errors(tmp_path: Path) -> None:
    a = write_yaml(tmp_path / "a.yaml", service("web"))
    age(a)
    cache = ManifestCache()
    load_manifests([tmp_path], cache=cache)
    write_yaml(tmp_path / "b.yaml", service("web"))
    with pytest.raises(ManifestError, match="duplicate object"):
        load_manifests([tmp_path], cache=cache)


async def test_inotify_sees_an_edit_before_the_slow_poll(tmp_path: Path) -> None:
    manifests = tmp_path / "m"
    manifests.mkdir()
    write_yaml(manifests / "web.yaml", service("web"), endpoint_slice("web-1", "web"))
    handlers = RecordingHandlers()
    # A 30 s poll: only inotify can make the change visible within the test's 1 s.
    source = ManifestSource([manifests], handlers, node_name="n", poll_interval=30.0)
    source.initial_load()
    handlers.take()
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(0.1)  # the watch is set up
        started = time.monotonic()
        write_yaml(manifests / "api.yaml", service("api", cluster_ip="10.96.0.2"))
        await eventually(lambda: bool(handlers.calls), within=1.0, what="the new Service")
        assert time.monotonic() - started < 1.0
        assert [call[0] for call in handlers.calls] == ["service_add"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_requested_reload_reads_a_file_whose_stat_did_not_change(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "web.yaml", service("web", port=80))
    age(path)
    handlers = RecordingHandlers()
    source = ManifestSource([tmp_path], handlers, node_name="n")
    source.initial_load()
    handlers.take()
    before = path.stat()
    write_yaml(path, service("web", port=81))  # same size, same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime: cp -p
    await source.poll()
    assert handlers.calls == []  # stat says nothing changed: nothing is read
    source.request_reload()  # SIGHUP
    await source.poll()
    assert [call[0] for call in handlers.take()] == ["service_update"]
