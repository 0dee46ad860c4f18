"""A reload works in proportion to what changed: a file re-written with the same bytes is not
parsed, a slice edit compares, merges and checks only its file's keys, and the result is
the state a full load gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.manifest_cases import RecordingHandlers, age, endpoint_slice, service, write_yaml
from userproxy.sources.manifest_changes import CrossChecks, changed_keys
from userproxy.sources.manifest_files import ManifestCache, collect_file, load_manifests
from userproxy.sources.manifest_read import list_manifest_files
from userproxy.sources.manifest_warnings import Category, cross_check
from userproxy.sources.manifests import ManifestError, ManifestSource

pytestmark = pytest.mark.both_loops  # the slices and reloads yield to whichever loop runs


def _many(directory: Path, files: int = 4, per_file: int = 5) -> list[Path]:
    """``files`` Service files and as many slice files, ``per_file`` objects each."""
    paths = []
    for f in range(files):
        names = [f"s{f}-{i}" for i in range(per_file)]
        paths.append(
            write_yaml(
                directory / f"svc-{f}.yaml",
                *(service(n, cluster_ip=f"10.96.{f}.{i + 1}") for i, n in enumerate(names)),
            )
        )
        paths.append(
            write_yaml(directory / f"eps-{f}.yaml", *(endpoint_slice(f"{n}-1", n) for n in names))
        )
    age(*paths)
    return paths


def test_a_stale_file_with_the_same_bytes_keeps_its_contents(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "web.yaml", service("web"))
    cache = ManifestCache()
    listing = list_manifest_files([tmp_path])
    for file, stamp in cache.to_read(listing):
        cache.store(file, stamp, collect_file(file, None))
    before = cache.contents(listing)[path]
    path.write_bytes(path.read_bytes())  # a fresh mtime, the same bytes
    listing = list_manifest_files([tmp_path])
    [(stale, stamp)] = cache.to_read(listing)
    assert cache.keep_unchanged(stale, stamp)
    assert cache.contents(listing)[path] is before
    assert (cache.reads, cache.rechecks) == (1, 1)
    write_yaml(path, service("web", port=81))
    listing = list_manifest_files([tmp_path])
    [(stale, stamp)] = cache.to_read(listing)
    assert not cache.keep_unchanged(stale, stamp)  # other bytes: parse it again


async def test_rewriting_the_same_bytes_delivers_nothing(tmp_path: Path) -> None:
    paths = _many(tmp_path)
    handlers = RecordingHandlers()
    source = ManifestSource([tmp_path], handlers, node_name="n")
    before = source.initial_load()
    handlers.take()
    for path in paths:
        path.write_bytes(path.read_bytes())
    await source.poll()
    await source.poll()  # modified within the last second: read again, found the same
    assert handlers.calls == []
    assert source.state is before  # not even merged again


async def test_a_slice_edit_is_merged_from_the_last_state(tmp_path: Path) -> None:
    _many(tmp_path)
    handlers = RecordingHandlers()
    source = ManifestSource([tmp_path], handlers, node_name="n")
    before = source.initial_load()
    handlers.take()
    write_yaml(
        tmp_path / "eps-2.yaml",
        *(endpoint_slice(f"s2-{i}-1", f"s2-{i}") for i in range(4)),  # s2-4-1 gone
        endpoint_slice("s2-0-2", "s2-0", addresses=("10.1.0.9",)),
    )
    await source.poll()
    calls = sorted((call[0], str(call[-1].name)) for call in handlers.take())  # type: ignore[attr-defined]
    assert calls == [("endpointslice_add", "s2-0-2"), ("endpointslice_delete", "s2-4-1")]
    after = source.state
    assert after is not None
    assert after.services is before.services  # no Service changed: the same map
    full = load_manifests([tmp_path])
    assert dict(after.slices) == dict(full.slices)
    assert dict(after.locations) == dict(full.locations)
    assert set(after.warnings) == set(full.warnings)


async def test_a_duplicate_in_an_unchanged_file_still_fails_the_reload(tmp_path: Path) -> None:
    _many(tmp_path)
    errors: list[ManifestError] = []
    handlers = RecordingHandlers()
    source = ManifestSource([tmp_path], handlers, node_name="n", on_reload_error=errors.append)
    source.initial_load()
    handlers.take()
    write_yaml(tmp_path / "eps-3.yaml", endpoint_slice("s0-0-1", "s0-0"))  # eps-0.yaml has it
    await source.poll()
    assert handlers.calls == []
    assert errors
    assert "duplicate object" in str(errors[-1])


def test_cross_checks_after_a_slice_change_check_only_the_changed_slices(tmp_path: Path) -> None:
    _many(tmp_path)
    cache = ManifestCache()
    state = load_manifests([tmp_path], cache=cache)
    old_files = cache.contents(list_manifest_files([tmp_path]))
    checks = CrossChecks()
    for _ in checks.steps(state, None):
        pass
    assert checks.checked == 40  # 20 Services, 20 slices
    write_yaml(tmp_path / "eps-1.yaml", endpoint_slice("orphan-1", "nobody"))
    new_state = load_manifests([tmp_path], cache=cache)
    keys = changed_keys(old_files, cache.contents(list_manifest_files([tmp_path])))
    assert not keys.services
    assert len(keys.slices) == 6
    for _ in checks.steps(new_state, keys):
        pass
    assert checks.checked == 46
    full = [w for w in cross_check(new_state.services, new_state.slices, new_state.locations) if w]
    assert set(checks.warnings()) == set(full)
    assert [w.category for w in full] == [Category.NO_SERVICE]
