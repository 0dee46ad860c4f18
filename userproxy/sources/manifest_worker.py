"""The child process that reads large manifests off the proxy's event loop, and the
parent's side of its pipe.

``ManifestSource`` (``manifests.py``) starts ``python -c "...worker_main()"`` for a reload
of more than a few KiB: the child reads a pickled :data:`Request` on stdin, reads, parses
and validates each file (``manifest_files.collect_file``) and writes the results to stdout
as length-prefixed pickle frames of model objects and strings, a few hundred objects each,
so that the parent unpickles them one small frame at a time (:class:`FrameReader`) and its
loop is never held for long.  Only this trusted parent-child pipe carries pickles.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from userproxy.model import EndpointSlice, Node, Service
from userproxy.sources.decode import shorten
from userproxy.sources.manifest_files import FileContents, ManifestError, collect_file
from userproxy.sources.yaml_limits import exception_text

__all__ = ["FRAME_LENGTH", "FrameReader", "Request", "worker_main", "write_frame"]

#: How much the child lowers its scheduling priority (``nice``).
WORKER_NICENESS = 10
#: Objects per result frame: small frames keep each unpickling step in the parent short.
FRAME_OBJECTS = 200
FRAME_LENGTH = struct.Struct(">I")

#: A request: (proxy name, paths to read).
Request = tuple[str | None, tuple[str, ...]]


def _frames_for(path: str, collector: FileContents) -> Iterator[tuple[object, ...]]:
    """A file's result as frames: ("file", path, problems, warnings) then ("objects", ...)
    chunks."""
    yield ("file", path, tuple(collector.problems), tuple(collector.warnings))
    seen = list(collector.seen.items())
    objects: list[Service | EndpointSlice | Node] = [
        *collector.services.values(),
        *collector.slices.values(),
        *collector.nodes.values(),
    ]
    for start in range(0, max(len(seen), len(objects)), FRAME_OBJECTS):
        yield (
            "objects",
            tuple(objects[start : start + FRAME_OBJECTS]),
            tuple(seen[start : start + FRAME_OBJECTS]),
        )


def write_frame(out: BinaryIO, frame: tuple[object, ...]) -> None:
    data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(FRAME_LENGTH.pack(len(data)) + data)


def worker_main() -> None:
    """The child process: read a pickled :data:`Request` on stdin, write result frames.

    Frames go to stdout: per file ("file", path, problems, warnings) and ("objects", objects,
    seen-items) chunks, then ("done",); a failure of the worker itself is ("failed", text).
    Only this trusted parent-child pipe carries pickles.  The child lowers its own CPU
    priority: on a busy node the proxy's event loop, not the parser, must get the CPU.
    """
    out = sys.stdout.buffer
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    try:
        proxy_name, paths = pickle.load(sys.stdin.buffer)
        for path in paths:
            for frame in _frames_for(path, collect_file(Path(path), proxy_name)):
                write_frame(out, frame)
        write_frame(out, ("done",))
    except BaseException as exc:  # report anything, then exit non-zero
        write_frame(out, ("failed", exception_text(exc)))
        out.flush()
        raise SystemExit(1) from None
    out.flush()


@dataclass
class FrameReader:
    """Rebuilds per-file collectors from the worker's frames, one frame at a time."""

    proxy_name: str | None
    results: dict[str, FileContents] = field(default_factory=dict)
    done: bool = False
    _current: FileContents | None = None

    def feed(self, data: bytes) -> None:
        """Apply one frame (raises ManifestError for a worker failure)."""
        frame = pickle.loads(data)
        tag = frame[0]
        if tag == "file":
            self._current = FileContents(
                self.proxy_name, problems=list(frame[2]), warnings=list(frame[3])
            )
            self.results[frame[1]] = self._current
        elif tag == "objects":
            collector = self._current
            assert collector is not None
            for obj in frame[1]:
                if isinstance(obj, Service):
                    collector.services[obj.key] = obj
                elif isinstance(obj, EndpointSlice):
                    collector.slices[(obj.namespace, obj.name)] = obj
                else:
                    assert isinstance(obj, Node)
                    collector.nodes[obj.name] = obj
            collector.seen.update(frame[2])
        elif tag == "done":
            self.done = True
        else:
            raise ManifestError([f"reading the manifests failed: {shorten(str(frame[1]), 200)}"])
