"""YAML parsing that input cannot crash: no recursion with the nesting, bounded size.

PyYAML's composers (its Python one and libyaml's Cython one) recurse once per nesting
level, so a document nested 5 000 deep exhausts the stack, and an alias "bomb" expands
without limit in later walks.  :func:`parse_yaml` composes nodes from the parser's event
stream with an explicit stack instead, enforcing :data:`MAX_DEPTH` levels and
:data:`MAX_NODES` nodes (an alias counting as the size of what it repeats), refusing
recursive aliases, and bounding integers (:data:`MAX_INT_CHARS`) before ``int()``.  Any
failure, a limit, a syntax error or an exception inside a constructor, is one
:class:`YamlProblem` naming the file (and the document and line when known).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from yaml._yaml import CParser
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    ScalarEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.nodes import Node as YamlNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from userproxy.sources.decode import shorten
from userproxy.sources.json_limits import MAX_DEPTH, MAX_INT_CHARS

__all__ = ["MAX_NODES", "YamlProblem", "exception_text", "parse_yaml"]

#: Most YAML nodes in one file, each alias counting as the size of the node it repeats
#: (so a "billion laughs" document is refused instead of expanded by later walks).
MAX_NODES = 4_000_000


class YamlProblem(Exception):
    """A file's YAML cannot be used; ``problem`` is the one line that says why."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def exception_text(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, MemoryError):
        return "out of memory"
    return shorten(f"{type(exc).__name__}: {exc}", 200)


class _LimitError(Exception):
    """A document exceeds a limit; ``mark`` is where (None when unknown)."""

    def __init__(self, message: str, mark: object = None) -> None:
        super().__init__(message)
        self.mark = mark


class _BoundedLoader(SafeConstructor, Resolver):
    """A safe YAML loader with bounded composition (see the module), over any event parser.

    Both parsers keep an explicit stack, and SafeConstructor builds the objects without
    recursion (its generators run from a work list).  Timestamps stay strings, as
    Kubernetes' YAML decoding keeps them.
    """

    if TYPE_CHECKING:  # provided by the parser class mixed in first

        def check_event(self, *choices: object) -> bool: ...
        def get_event(self) -> yaml.Event | None: ...
        def dispose(self) -> None: ...

    def _init_loader(self) -> None:
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.nodes = 0  # in this file so far, aliases counted as the size they repeat

    def check_node(self) -> bool:
        if self.check_event(StreamStartEvent):
            self.get_event()
        return not self.check_event(StreamEndEvent)

    def get_node(self) -> YamlNode | None:
        if self.check_event(StreamEndEvent):
            return None
        return self._compose_document()

    def _compose_document(self) -> YamlNode:
        start = self.get_event()
        assert isinstance(start, DocumentStartEvent)
        anchors: dict[str, tuple[YamlNode, int, int]] = {}  # anchor: (node, size, height)
        stack: list[_Open] = []
        root: YamlNode | None = None
        while True:
            event = self.get_event()
            node: YamlNode
            # Ordered by frequency: most events are scalars.
            if isinstance(event, ScalarEvent):
                tag = event.tag
                if tag is None or tag == "!":
                    tag = self.resolve(ScalarNode, event.value, event.implicit)  # type: ignore[no-untyped-call]
                # libyaml's marks are another class with yaml.Mark's fields (see _mark).
                first_mark, last_mark = event.start_mark, event.end_mark
                node = ScalarNode(tag, event.value, first_mark, last_mark, event.style)  # type: ignore[arg-type]
                size, height = 1, 0
                if event.anchor is not None:
                    anchors[event.anchor] = (node, size, height)
                self._count(1, event.start_mark)
            elif isinstance(event, CollectionStartEvent):
                if len(stack) >= MAX_DEPTH:
                    raise _LimitError(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
                kind = SequenceNode if isinstance(event, SequenceStartEvent) else MappingNode
                tag = event.tag
                if tag is None or tag == "!":
                    tag = self.resolve(kind, None, event.implicit)  # type: ignore[no-untyped-call]
                collection = kind(tag, [], None, None, event.flow_style)
                collection.start_mark = event.start_mark
                self._count(1, event.start_mark)
                stack.append(_Open(collection, event.anchor))
                continue
            elif isinstance(event, CollectionEndEvent):
                closed = stack.pop()
                node, size, height = closed.node, closed.size, closed.height + 1
                node.end_mark = event.end_mark
                if closed.anchor is not None:
                    anchors[closed.anchor] = (node, size, height)
            elif isinstance(event, AliasEvent):
                anchor = event.anchor or ""
                if anchor not in anchors:
                    inside = any(entry.anchor == anchor for entry in stack)
                    raise _LimitError(
                        f"alias *{shorten(anchor, 60)} refers to a node that contains it"
                        if inside
                        else f"found undefined alias *{shorten(anchor, 60)}",
                        event.start_mark,
                    )
                node, size, height = anchors[anchor]
                if len(stack) + height > MAX_DEPTH:
                    raise _LimitError(
                        f"nested more than {MAX_DEPTH} levels deep (through an alias)",
                        event.start_mark,
                    )
                self._count(size, event.start_mark)
            elif isinstance(event, DocumentEndEvent):
                assert root is not None
                return root
            else:  # pragma: no cover - libyaml's grammar allows nothing else here
                raise _LimitError(f"unexpected {type(event).__name__}")
            if not stack:
                root = node
                continue
            top = stack[-1]
            top.size += size
            top.height = max(top.height, height)
            if top.key is not None:
                top.node.value.append((top.key, node))
                top.key = None
            elif isinstance(top.node, MappingNode):
                top.key = node
            else:
                top.node.value.append(node)

    def _count(self, nodes: int, where: object) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            raise _LimitError(
                f"more than {MAX_NODES} nodes (counting each alias as what it repeats)", where
            )

    def construct_bounded_int(self, node: ScalarNode) -> int:
        text = str(self.construct_scalar(node))
        if len(text) > MAX_INT_CHARS:
            raise _LimitError(
                f"integer of {len(text)} characters (at most {MAX_INT_CHARS} are allowed)",
                node.start_mark,
            )
        value = SafeConstructor.construct_yaml_int(self, node)
        assert isinstance(value, int)
        return value


class _Open:
    """A collection being composed: its node, a mapping key awaiting its value, the size
    (nodes, aliases counted as what they repeat) and height of what it holds so far, and
    its anchor (registered when it closes, so an alias inside it is refused)."""

    __slots__ = ("anchor", "height", "key", "node", "size")

    def __init__(self, node: SequenceNode | MappingNode, anchor: str | None) -> None:
        self.node = node
        self.anchor = anchor
        self.key: YamlNode | None = None
        self.size = 1
        self.height = 0


class _FastLoader(_BoundedLoader, CParser):
    """libyaml's scanner and parser (fast: C) with the bounded composer."""

    def __init__(self, stream: str) -> None:
        CParser.__init__(self, stream)
        self._init_loader()


class _PyLoader(_BoundedLoader, Reader, Scanner, Parser):
    """PyYAML's own scanner and parser (slow: Python) with the bounded composer.

    Used to describe a syntax error: its messages are PyYAML's familiar ones, and it
    reports nesting beyond :data:`MAX_DEPTH` where libyaml stops at its own limit.
    """

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        self._init_loader()


_BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in Resolver.yaml_implicit_resolvers.items()
}
_BoundedLoader.yaml_constructors = {
    **SafeConstructor.yaml_constructors,
    "tag:yaml.org,2002:int": _BoundedLoader.construct_bounded_int,
}


def _mark(mark: object) -> str:
    """ "line L, column C: " for a PyYAML or libyaml mark (either has 0-based line, column)."""
    line = getattr(mark, "line", None)
    column = getattr(mark, "column", None)
    if isinstance(line, int) and isinstance(column, int):
        return f"line {line + 1}, column {column + 1}: "
    return ""


def parse_yaml(path: Path, text: str) -> list[object]:
    """The documents of one YAML file; raises only :class:`YamlProblem`."""
    try:
        return _load_all(_FastLoader(text), path)
    except _SyntaxError as fast_error:
        # Parse again with PyYAML's own parser for its message (and the depth limit where
        # libyaml stopped at its own): errors are rare, and a large file is parsed off the
        # loop.  Should it accept the text, libyaml's error stands.
        try:
            _load_all(_PyLoader(text), path)
        except _SyntaxError as exc:
            raise YamlProblem(exc.problem) from None
        raise YamlProblem(fast_error.problem) from None


class _SyntaxError(YamlProblem):
    """A YAML syntax error: :func:`parse_yaml` asks PyYAML's parser for its message."""


def _load_all(loader: _BoundedLoader, path: Path) -> list[object]:
    """Every document ``loader`` gives; YamlProblem, or _SyntaxError for a syntax error."""
    documents: list[object] = []
    try:
        while loader.check_data():  # type: ignore[no-untyped-call]
            documents.append(loader.get_data())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise _SyntaxError(f"{path}: {_mark(mark)}YAML syntax error: {problem}") from None
    except _LimitError as exc:
        raise YamlProblem(
            f"{path}: document {len(documents) + 1}: {_mark(exc.mark)}{exc}"
        ) from None
    except yaml.YAMLError as exc:
        raise _SyntaxError(f"{path}: YAML syntax error: {exc}") from None
    except Exception as exc:  # anything a constructor raises (ValueError, ...): a problem
        raise YamlProblem(
            f"{path}: document {len(documents) + 1}: cannot parse: {exception_text(exc)}"
        ) from None
    finally:
        loader.dispose()
    return documents
