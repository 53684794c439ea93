"""YAML read safely and fast: one loader for the config file, the web config and ``--objects``.

PyYAML's own loaders are the wrong tool for input we do not control:

- Aliases are not copied, so a few hundred bytes of nested aliases ("billion
  laughs") build a small graph that anything walking it sees as billions of
  nodes, and an alias to a collection that is still open builds a cycle.
- Even with libyaml (``CSafeLoader``), composing goes through a Python node
  tree (a node and two marks per scalar) and a Python resolver with regular
  expressions for each scalar: a 56 MB ``kubectl get -o yaml`` took 82 s and
  3.6 GB.

So the objects are built here straight from the parser's events (libyaml's
when the wheel has it), with SafeLoader's meaning of every scalar (the same
resolver and constructors, asked only when a plain scalar could be something
other than a string), and with bounds: every alias adds the size of what it
points to, and the sum may not pass ``ALIAS_EXPANSION_LIMIT`` nodes; an alias to
a collection still open (a cycle) is refused; nesting may not pass
``DEPTH_LIMIT``. Every refusal and every syntax error is a ``YAMLInputError``
whose text is one line naming the line of the input.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterator

import yaml
from yaml import events
from yaml.nodes import ScalarNode

# Aliases may add this many nodes in all: far above a config that reuses a block
# with an anchor, far below what makes a walk of the result cost seconds.
ALIAS_EXPANSION_LIMIT = 10_000
# Kubernetes objects nest about 10 deep; anything near this is hostile, and
# consumers that walk the result recursively stay far from Python's limit.
DEPTH_LIMIT = 100
# Plain scalars whose meaning was looked up, kept per load (IPs, ports, booleans repeat).
_RESOLVED_CACHE_LIMIT = 4096

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
STR_TAG = "tag:yaml.org,2002:str"
MERGE_TAG = "tag:yaml.org,2002:merge"
MAP_TAGS = (None, "!", "tag:yaml.org,2002:map")
SEQ_TAGS = (None, "!", "tag:yaml.org,2002:seq")
_MERGE = object()  # the key ``<<``


class YAMLInputError(ValueError):
    """Input that is not YAML, or that this loader refuses; ``str()`` is one line."""

    def __init__(self, reason: str, line: int | None = None, detail: str = "") -> None:
        self.reason, self.line = reason, line
        super().__init__(reason + (f" at line {line}" if line else "") + (f" ({detail})" if detail else ""))


def decode_utf8(raw: bytes) -> str:
    """The text of a file that must be UTF-8 (a BOM is dropped, as YAML allows)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise YAMLInputError(f"not UTF-8 text (byte {err.start} is not UTF-8)", line) from None


def load_all(text: str | bytes) -> list[Any]:
    """Every document of ``text``, as ``yaml.safe_load_all`` would give them."""
    with paused_gc():
        return _Builder(LOADER(text)).documents()


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while building many objects that form no cycle.

    The collector runs every few hundred new containers and, as the heap grows,
    walks all of them again: a third of loading a 56 MB dump, two thirds of
    parsing its objects. What is built here has no cycle (a cyclic alias is
    refused), so those passes can find nothing.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_NO_KEY = object()  # the mapping being built waits for a key


class _Builder:
    """Objects from events: one loop, locals for the collection being built (6 million events in 56 MB)."""

    def __init__(self, loader) -> None:
        self.loader = loader  # its parser gives the events; its resolver and constructors give scalars meaning
        self.resolved: dict[str, Any] = {}
        self.first_chars = frozenset(c for c in loader.yaml_implicit_resolvers if c)

    def documents(self) -> list[Any]:
        try:
            return self._documents()
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            raise YAMLInputError("not valid YAML", mark.line + 1 if mark else None, err.problem or "") from None
        except yaml.YAMLError as err:
            raise YAMLInputError("not valid YAML", None, str(err).splitlines()[0]) from None
        finally:
            self.loader.dispose()

    def _documents(self) -> list[Any]:  # noqa: C901 - one loop on purpose: it runs once per event
        get_event = self.loader.get_event
        scalar_event, alias_event = events.ScalarEvent, events.AliasEvent
        mapping_start, sequence_start = events.MappingStartEvent, events.SequenceStartEvent
        collection_end = (events.MappingEndEvent, events.SequenceEndEvent)
        first_chars, resolve_plain = self.first_chars, self._resolve_plain
        docs: list[Any] = []
        anchors: dict[str, tuple[Any, int]] = {}  # anchor -> (value, size in nodes)
        open_anchors: set[str] = set()
        nodes = 0  # nodes built so far, an alias counting as every node it stands for
        expanded = 0  # of which through aliases
        # The collection being built: ``cur`` (the document's own list at the top),
        # whether it is a mapping, its pending key, its merge sources; outer ones on ``frames``.
        root: list[Any] = []
        cur, is_map, key, merges = root, False, _NO_KEY, None
        frames: list[tuple] = []
        while True:
            event = get_event()
            if event is None:
                break
            kind = event.__class__
            if kind is scalar_event:
                nodes += 1
                tag, value = event.tag, event.value
                if (tag is None or tag == "!") and event.implicit[0]:  # plain: an int, a bool, null...?
                    if not value or value[0] in first_chars:
                        value = resolve_plain(value, event, is_map and key is _NO_KEY)
                elif not (tag is None or tag == "!" or tag == STR_TAG):
                    value = self._construct(tag, event)
                if event.anchor is not None:
                    anchors[event.anchor] = (value, 1)
            elif kind is mapping_start or kind is sequence_start:
                nodes += 1
                if event.tag not in (MAP_TAGS if kind is mapping_start else SEQ_TAGS):
                    raise YAMLInputError(f"tag {event.tag} is not supported", _line(event))
                if len(frames) >= DEPTH_LIMIT:
                    raise YAMLInputError(f"nested deeper than {DEPTH_LIMIT} levels", _line(event))
                if is_map and key is _NO_KEY:
                    raise YAMLInputError("a mapping key is a mapping or a list", _line(event))
                if event.anchor is not None:
                    open_anchors.add(event.anchor)
                frames.append((cur, is_map, key, merges, event.anchor, nodes))
                is_map = kind is mapping_start
                cur, key, merges = ({} if is_map else []), _NO_KEY, None
                continue
            elif kind in collection_end:
                value = _merged(merges, cur) if merges else cur
                cur, is_map, key, merges, anchor, first = frames.pop()
                if anchor is not None:
                    open_anchors.discard(anchor)
                    anchors[anchor] = (value, nodes - first + 1)
            elif kind is alias_event:
                name = event.anchor
                if name in open_anchors:
                    raise YAMLInputError(f"alias *{name} refers to a collection that contains it (a cycle)",
                                         _line(event))
                if name not in anchors:
                    raise YAMLInputError(f"alias *{name} has no anchor &{name} before it", _line(event))
                value, size = anchors[name]
                nodes += size
                expanded += size
                if expanded > ALIAS_EXPANSION_LIMIT:
                    raise YAMLInputError(f"aliases expand to more than {ALIAS_EXPANSION_LIMIT} nodes "
                                         "(an alias bomb?)", _line(event))
                if is_map and key is _NO_KEY and isinstance(value, (dict, list)):
                    raise YAMLInputError("a mapping key is a mapping or a list", _line(event))
            elif kind is events.DocumentEndEvent:
                docs.append(root[0] if root else None)
                root.clear()
                anchors.clear()  # anchors are per document
                continue
            else:
                continue  # stream and document starts
            # A value is complete: it goes into the collection being built.
            if not is_map:
                cur.append(value)
            elif key is _NO_KEY:
                key = value
            elif key is _MERGE:
                merges = (merges or []) + _merge_sources(value, event)
                key = _NO_KEY
            else:
                cur[key] = value
                key = _NO_KEY
        return docs

    def _resolve_plain(self, value: str, event: events.ScalarEvent, is_key: bool) -> Any:
        """A plain scalar that may not be a string, as SafeLoader reads it (cached per load)."""
        try:
            return self.resolved[value]
        except KeyError:
            pass
        tag = self.loader.resolve(ScalarNode, value, (True, False))
        if tag == MERGE_TAG and is_key:
            return _MERGE
        result = value if tag == STR_TAG else self._construct(tag, event)
        if len(self.resolved) >= _RESOLVED_CACHE_LIMIT:
            self.resolved.clear()
        self.resolved[value] = result
        return result

    def _construct(self, tag: str, event: events.ScalarEvent) -> Any:
        construct = self.loader.yaml_constructors.get(tag)
        if construct is None or tag in (MERGE_TAG, "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"):
            raise YAMLInputError(f"tag {tag} is not supported here", _line(event))
        try:
            return construct(self.loader, ScalarNode(tag, event.value, event.start_mark, event.end_mark))
        except (ValueError, TypeError, OverflowError, yaml.YAMLError) as err:
            raise YAMLInputError(f"{event.value[:40]!r} is not a valid {tag.rsplit(':', 1)[-1]} ({err})"
                                 .replace("\n", " "), _line(event)) from None


def _merge_sources(value: Any, event) -> list[dict]:
    sources = value if isinstance(value, list) else [value]
    if not all(isinstance(m, dict) for m in sources):
        raise YAMLInputError("a merge key << needs a mapping or a list of mappings", _line(event))
    return sources


def _merged(sources: list[dict], own: dict) -> dict:
    """SafeLoader's merge: the first source wins over later ones, the mapping's own keys over all."""
    out: dict = {}
    for source in reversed(sources):
        out.update(source)
    out.update(own)
    return out


def _line(event) -> int | None:
    mark = event.start_mark
    return mark.line + 1 if mark is not None else None
