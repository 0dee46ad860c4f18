"""A file removed between the directory listing and its read is absent, not an error.

Found by the soak: manifests rewritten by delete-and-create made whole reloads fail with
"cannot read: No such file or directory" (logged at ERROR), and the deletion itself was
applied only at the next change.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.manifests import service, write
from userproxy.sources.manifest_files import collect_file, merge
from userproxy.sources.manifest_read import list_manifest_files


def test_file_removed_after_the_listing_contributes_nothing(tmp_path: Path) -> None:
    write(tmp_path / "a.json", service("a", "127.1.0.1", 80))
    write(tmp_path / "b.json", service("b", "127.1.0.2", 80))
    listing = list_manifest_files([tmp_path])
    (tmp_path / "b.json").unlink()
    state = merge(listing, [collect_file(path, None) for path in listing.files])
    assert [key.name for key in state.services] == ["a"]
