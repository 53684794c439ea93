"""Reading /proc/net/ip_vs again: what changed since the last parse, and only that.

A running exporter reads the same table every scrape, and what changes between
two reads is mostly connection counters, sometimes a record or two. So the
parser remembers the last text's hash and its shape (the text with its counters
as NULs, bytes, once): the same text is the same table; the same shape is the
same virtual servers with new counters; another shape re-parses only the records
between the unchanged ones before and after, found through where each record
starts (a compact array), not through copies of the records. Counters live beside
the virtual servers (``IPVSTable.connections``), so a virtual server stays the
same object while only its counters move.

What is remembered belongs to one ``IncrementalParser``: two readers never share
it (nor a one-shot parse, which starts from nothing).
"""

from __future__ import annotations

import gc
from array import array
from bisect import bisect_left, bisect_right

from exporter.readers.ipvs.table import IPVSTable, Layout
from exporter.readers.ipvs.text import (_MASK_BYTES, _RECORD_BOUNDARY, NO_RECORDS, Conversions, KnownRecords, Shape,
                                        _marked, counter_chars, counters_of, known_or_parsed, parse_whole,
                                        with_counters)


class IncrementalParser:
    """Parses the text of one table again and again, reusing what the last parse learned.

    ``parse(text, hz)`` equals ``parse_ip_vs(text, hz)`` (tests prove it over random
    changes) at a fraction of its cost when little changed. A virtual server whose
    record has the same shape as at the previous parse is the same object as then:
    never mutate what it returns. Not thread-safe: its owner serialises calls.
    """

    def __init__(self) -> None:
        self.conversions = Conversions()
        self._hz: int | None = None
        self._last: Shape | None = None  # what the last parse learned, at ``_hz``
        # The last parse's records, by hash: only those, so this never outgrows one table.
        self._known: KnownRecords = NO_RECORDS

    def forget(self) -> None:
        """Parse the next text from nothing (conversions aside: they never go stale)."""
        self._last, self._known = None, NO_RECORDS

    def parse(self, text: str, hz: int) -> IPVSTable:
        # The cyclic collector off, inline, as parse_ip_vs does (and why).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._parse(text, hz)
        finally:
            self.conversions.after_parse()
            if gc_was_enabled:
                gc.enable()

    def _parse(self, text: str, hz: int) -> IPVSTable:
        if hz != self._hz:
            self.forget()  # timeouts were converted with another HZ
            self._hz = hz
        last = self._last
        text_hash = hash(text)
        if last is not None and text_hash == last.text_hash and len(text) == last.length:
            return with_counters(last.skeleton, last.active, last.inactive)
        if last is not None and last.marked is not None and text.isascii() and "\0" not in text:
            # The text as one int: one C-level XOR with the last shape tells whether only
            # counters moved, and gives them all in place.
            value = int.from_bytes(text.encode("ascii"), "little")
            state = None
            chars = counter_chars(value, last.marked, last.marked_counters) if len(text) == last.length else None
            if chars is not None:
                counters = counters_of(chars, last.layout, self.conversions.numbers)
                if counters is not None:
                    state = last._replace(text_hash=text_hash, active=counters[0], inactive=counters[1])
            else:
                del chars
                patched = _patch_text(last, self._known, text, value, hz, self.conversions)
                if patched is not None:
                    state, self._known = patched
                    state = state._replace(text_hash=text_hash)
            if state is not None:
                self._last = state
                return with_counters(state.skeleton, state.active, state.inactive)
        # Dropped first: the last shape is not needed beside the new one.
        known, self._last, self._known = self._known, None, NO_RECORDS
        table, self._last, self._known = parse_whole(text, hz, self.conversions, known, text_hash)
        return table


def _patch_text(last: Shape, known: KnownRecords, text: str, value: int, hz: int, conv: Conversions,
                ) -> tuple[Shape, KnownRecords] | None:
    """The last parse with the records that changed replaced; None if it cannot be.

    The shape before the first change and after the last one is the last text's:
    found with two C-level passes over the text as an int against the last marked
    text. Only the lines in between are marked again, only the records around them
    are split out (``last.starts`` says where they are), and only those that changed
    are parsed again (``_patch_shape``). None when the text is cut or the change is
    not a clean one: the caller parses the whole text.
    """
    if not text.endswith("\n"):
        return None
    old_length, new_length = last.length, len(text)
    common = min(old_length, new_length)
    shift = new_length - old_length
    old_marked = last.marked
    old_value = int.from_bytes(old_marked, "little")
    # 0 on the counters, 0xFF elsewhere: made for this read only, never kept.
    mask = int.from_bytes(old_marked.translate(_MASK_BYTES), "little")
    # Shape differences (byte i of the int is text position i): the lowest set bit is
    # the first one. (The mask is as long as the last text: beyond it, nothing counts.)
    differ = (value ^ old_value) & mask
    first = min(common, ((differ & -differ).bit_length() - 1) // 8) if differ else common
    # Then the ends aligned (new[i + shift] against old[i]): the highest set bit is
    # the last difference, and what follows it is the same at the end of both.
    if shift > 0:
        differ = ((value >> 8 * shift) ^ old_value) & mask
    elif shift < 0:
        differ = (value ^ (old_value >> -8 * shift)) & (mask >> -8 * shift)
    del mask, old_value
    same_end = common - 1 - (differ.bit_length() - 1) // 8 if differ else common
    del differ
    same_end = min(same_end, old_length - first, new_length - first)
    # Widen to whole lines (marks are made line by line).
    start = text.rfind("\n", 0, first) + 1
    stop = new_length - same_end
    if stop > 0 and text[stop - 1] != "\n":
        stop = text.find("\n", stop) + 1
    old_stop = stop - shift
    middle = _marked(text[start:stop].split("\n")).encode("ascii")
    marked = old_marked[:start] + middle + old_marked[old_stop:]
    marked_counters = last.marked_counters - old_marked.count(0, start, old_stop) + middle.count(0)
    # The records touched: from the one before the first changed line (a real server
    # added at a record's end is that record's) to the first one wholly after the change.
    starts = last.starts
    head = max(0, bisect_right(starts, max(start - 1, 0)) - 1)
    tail = bisect_left(starts, old_stop, head)
    if tail >= len(starts):
        return None
    window = old_marked[starts[head]:starts[tail]].decode("ascii").replace("\0", " ")
    base = starts[head]
    old_window = [window[starts[i] - base:starts[i + 1] - base - 1] for i in range(head, tail)]
    del window
    pieces = _RECORD_BOUNDARY.split(marked[starts[head]:starts[tail] + shift].decode("ascii").replace("\0", " "))
    if pieces[-1] != "":
        return None
    new_window = pieces[:-1]
    patched = _patch_shape(last, known, old_window, new_window, head, hz, conv)
    if patched is None:
        return None
    table, window_servers = patched
    layout = table._layout
    chars = counter_chars(value, marked, marked_counters)
    if chars is None:
        return None
    counters = counters_of(chars, layout, conv.numbers)
    if counters is None:
        return None
    record_starts = []
    at = starts[head]
    for record in new_window:
        record_starts.append(at)
        at += len(record) + 1
    new_starts = starts[:head] + array("q", record_starts) + array("q", map(shift.__add__, starts[tail:]))
    kept = KnownRecords(known.hashes[:head] + array("q", map(hash, new_window)) + known.hashes[tail:],
                        known.virtual_servers[:head] + window_servers + known.virtual_servers[tail:],
                        table.persistent_jiffies)
    state = Shape(last.text_hash, new_length, last.lead, True, table, layout, *counters, marked, marked_counters,
                  new_starts)
    return state, kept


def _patch_shape(last: Shape, known: KnownRecords, old_window: list[str], new_window: list[str], head: int,
                 hz: int, conv: Conversions) -> tuple[IPVSTable, list] | None:
    """The last table with the records that changed replaced; None if it cannot be.

    A Service or an endpoint changes one record or a few, somewhere in the text:
    ``old_window`` (the last parse's records ``head`` on) became ``new_window``, and
    every record outside is the last parse's. The records equal at both ends of the
    window are kept as they are, only the middle is parsed and only the middle's
    entries are replaced (the rest of the layout is shifted, not rebuilt). Anything
    unusual (garbage, a header, a record printed twice) gives None, and the whole
    text is parsed record by record. Returns the table (its layout set) and the
    virtual server of each record of the new window.
    """
    same = list(map(str.__eq__, old_window, new_window))  # C-level: one comparison per record
    front = same.index(False) if False in same else len(same)
    same = list(map(str.__eq__, reversed(old_window), reversed(new_window)))
    back = same.index(False) if False in same else len(same)
    back = min(back, len(old_window) - front, len(new_window) - front)
    first, old_end = head + front, head + len(old_window) - back
    if first < last.lead:
        return None
    old_servers = known.virtual_servers[first:old_end]
    if None in old_servers:
        return None
    skeleton = last.skeleton
    # The old middle's records, for a new one equal to one of them (moved, say).
    previous = {record: (vs, skeleton.persistent_jiffies.get(vs.key))
                for record, vs in zip(old_window[front:len(old_window) - back], old_servers)}
    new_middle = new_window[front:len(new_window) - back]
    try:
        added = [known_or_parsed(previous, record, hz, conv) for record in new_middle]
    except (ValueError, IndexError, KeyError):
        return None  # garbage: the full parse says what to drop
    gone = {vs.key for vs in old_servers}
    new_keys = [vs.key for vs, _ in added]
    if len(set(new_keys)) != len(new_keys) or any(k in skeleton and k not in gone for k in new_keys):
        return None  # a record printed twice: the full parse says which counts
    table = skeleton.copy()
    jiffies_by_key = dict(skeleton.persistent_jiffies)
    for key in gone.difference(new_keys):
        del table[key]
        jiffies_by_key.pop(key, None)
    for vs, jiffies in added:
        table[vs.key] = vs
        if jiffies is None:
            jiffies_by_key.pop(vs.key, None)
        else:
            jiffies_by_key[vs.key] = jiffies
    table.persistent_jiffies = jiffies_by_key
    window_servers = (known.virtual_servers[head:first] + [vs for vs, _ in added]
                      + known.virtual_servers[old_end:old_end + back])

    # The layout: entries [start, stop) of the last one make way for the middle's.
    layout = last.layout
    start, stop = first - last.lead, old_end - last.lead
    line_no = layout.first_lines[start] if start < len(layout.keys) else layout.lines
    counter = layout.starts[start]
    first_lines, starts = [], []
    for vs, _ in added:
        first_lines.append(line_no)
        starts.append(counter)
        counter += len(vs.real_servers)
        line_no += 1 + len(vs.real_servers)
    old_end = layout.first_lines[stop] if stop < len(layout.keys) else layout.lines
    line_shift = line_no - old_end
    counter_shift = counter - layout.starts[stop]
    if not line_shift and not counter_shift and new_keys == layout.keys[start:stop] \
            and starts == layout.starts[start:stop] and first_lines == layout.first_lines[start:stop]:
        # The same virtual servers on the same lines (a weight changed, say): same layout.
        table._layout = layout
        return table, window_servers
    table._layout = Layout.build(
        layout.keys[:start] + new_keys + layout.keys[stop:],
        layout.first_lines[:start] + first_lines + list(map(line_shift.__add__, layout.first_lines[stop:])),
        layout.starts[:start] + starts + list(map(counter_shift.__add__, layout.starts[stop:])),
        None, layout.lines + line_shift)
    return table, window_servers
