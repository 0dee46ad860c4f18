"""The child process that reads large manifests off the proxy's event loop, and the
parent's side of its pipe.

For a reload of more than a few KiB ``ManifestSource`` (``manifests.py``) calls
:func:`read_in_worker`, which starts ``python -c "...worker_main()"``: the child reads a
pickled :data:`Request` on stdin, reads, parses and validates each file
(``manifest_files.collect_file``) and writes the results to stdout as length-prefixed
pickle frames of model objects and strings, a few hundred objects each, so that the parent
unpickles them one small frame at a time (:class:`FrameReader`) and its loop is never held
for long.  A process, not a thread: a thread parsing pure Python holds the GIL and starves
the loop thread (the convoy effect); a process cannot.

Invariants: only this trusted parent-child pipe carries pickles; the child is killed when
the read is cancelled (shutdown) or runs longer than :data:`WORKER_TIMEOUT`; whatever the
child does (dies, hangs, writes garbage), the parent gets per-file results or one
:class:`~userproxy.sources.manifest_read.ManifestError`, never another exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from userproxy.model import EndpointSlice, Node, Service
from userproxy.slices import Slicer
from userproxy.sources.decode import shorten
from userproxy.sources.manifest_files import FileContents, collect_file
from userproxy.sources.manifest_read import ManifestError
from userproxy.sources.yaml_limits import exception_text

__all__ = ["read_in_worker", "worker_main"]

#: How much the child lowers its scheduling priority (``nice``).
WORKER_NICENESS = 10
#: Objects per result frame: small frames keep each unpickling step in the parent short.
FRAME_OBJECTS = 200
FRAME_LENGTH = struct.Struct(">I")
#: Largest result frame accepted from the child (its frames hold 200 objects each).
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: Longest a child reading the manifests may take before it is killed (seconds).
WORKER_TIMEOUT = 120.0

_WORKER_CODE = "from userproxy.sources.manifest_worker import worker_main; worker_main()"
#: The directory holding the ``userproxy`` package, put on the child's PYTHONPATH so it
#: imports this very copy (also when running from a source tree).
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

#: A request: (proxy name, paths to read).
Request = tuple[str | None, tuple[str, ...]]


def _frames_for(path: str, collector: FileContents) -> Iterator[tuple[object, ...]]:
    """A file's result as frames: ("file", path, problems, warnings, digest) then
    ("objects", ...) chunks."""
    yield ("file", path, tuple(collector.problems), tuple(collector.warnings), collector.digest)
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
    """The child process: a pickled :data:`Request` on stdin, result frames on stdout (each
    file's, then ("done",); ("failed", text) when the worker itself fails).

    It lowers its own CPU priority: on a busy node the proxy's event loop must get the CPU.
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
                self.proxy_name, problems=list(frame[2]), warnings=list(frame[3]), digest=frame[4]
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


async def read_in_worker(files: Sequence[Path], proxy_name: str | None) -> dict[str, FileContents]:
    """Read, parse and validate ``files`` in a child process; per path, what it holds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    what = str(files[0]) if len(files) == 1 else f"{files[0]} and {len(files) - 1} more files"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER_CODE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
    except OSError as exc:  # EMFILE, EAGAIN, ENOMEM ...: a failed reload, retried later
        raise ManifestError(
            [f"reading {what}: cannot start the reader process: {exc.strerror or exc}"]
        ) from None
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        reader = FrameReader(proxy_name)
        slicer = Slicer(bulk=True)  # only large reloads come through the child
        async with asyncio.timeout(WORKER_TIMEOUT):
            try:
                proc.stdin.write(pickle.dumps((proxy_name, tuple(str(path) for path in files))))
                await proc.stdin.drain()
                proc.stdin.close()
                while not reader.done:
                    header = await proc.stdout.readexactly(FRAME_LENGTH.size)
                    (length,) = FRAME_LENGTH.unpack(header)
                    if length > MAX_FRAME_BYTES:
                        raise ValueError(f"a frame of {length} bytes")
                    reader.feed(await proc.stdout.readexactly(length))
                    await slicer.check()
            except (asyncio.IncompleteReadError, ConnectionError):
                status = await proc.wait()
                raise ManifestError(
                    [f"reading {what} failed: the reader {_exit(status)}"]
                ) from None
            except ManifestError:
                raise
            except Exception as exc:  # an unreadable frame: never a traceback, never a crash
                raise ManifestError(
                    [f"reading {what} failed: unreadable result ({type(exc).__name__})"]
                ) from None
        await proc.wait()
    except TimeoutError:
        raise ManifestError([f"reading {what} took more than {WORKER_TIMEOUT:g}s"]) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            # The process is only done when its pipes are too: asyncio's wait() waits for
            # them, and uvloop reports a pipe still open when the loop closes.  A read
            # stopped mid-stream (cancelled at shutdown) may have left stdout paused with
            # its buffer full, so it would never see EOF: close stdin, read stdout out.
            if proc.stdin is not None:
                proc.stdin.close()
            if proc.stdout is not None:
                with contextlib.suppress(Exception):
                    await proc.stdout.read()
            await proc.wait()
    return reader.results


def _exit(status: int) -> str:
    if status < 0:
        try:
            return f"process was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"process was killed by signal {-status}"
    return f"process exited with status {status}"
