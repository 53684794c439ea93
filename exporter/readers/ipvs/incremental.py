"""Reading /proc/net/ip_vs again: what changed since the last parse, and only that.

A running exporter reads the same table every scrape, and what changes between
two reads is mostly connection counters, sometimes a record or two. So the
parser remembers the last text: the same text is the same table; the same shape
(the text without its fixed-width counters) is the same virtual servers with new
counters; another shape re-parses only the records between the unchanged ones
before and after. Counters live beside the virtual servers
(``IPVSTable.connections``), so a virtual server stays the same object while only
its counters move.

What is remembered belongs to one ``IncrementalParser``: two readers never share
it (nor a one-shot parse, which starts from nothing).
"""

from __future__ import annotations

import gc

from exporter.readers.ipvs.table import IPVSTable, Layout
from exporter.readers.ipvs.text import (_MASK_BYTES, _RECORD_BOUNDARY, Conversions, Shape, _marked,
                                        counters_of, known_or_parsed, parse_whole,
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
        # The last parse's records (record text -> parsed): only those, so this
        # never outgrows one table.
        self._records: dict[str, tuple] = {}

    def forget(self) -> None:
        """Parse the next text from nothing (conversions aside: they never go stale)."""
        self._last, self._records = None, {}

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
        if last is not None and text == last.text:
            return with_counters(last.skeleton, last.active, last.inactive)
        if last is not None and last.mask is not None and text.isascii() and "\0" not in text:
            # The text as one int: one C-level pass compares its shape with the last one
            # (XOR, then the mask hides the counters), another takes all its counters.
            value = int.from_bytes(text.encode("ascii"), "little")
            state = None
            if len(text) == len(last.text) and (value ^ last.blank_value) & last.mask == 0:
                counters = counters_of(value, last.blank_value, last.mask, len(text), last.layout,
                                       self.conversions.numbers)
                if counters is not None:
                    state = last._replace(text=text, active=counters[0], inactive=counters[1])
            else:
                patched = _patch_text(last, text, value, hz, self.conversions, self._records)
                if patched is not None:
                    state, self._records = patched
            if state is not None:
                self._last = state
                return with_counters(state.skeleton, state.active, state.inactive)
        table, self._last, self._records = parse_whole(text, hz, self.conversions, self._records)
        return table


def _patch_text(last: Shape, text: str, value: int, hz: int, conv: Conversions,
                previous: dict[str, tuple]) -> tuple[Shape, dict[str, tuple]] | None:
    """The last parse with the records that changed replaced; None if it cannot be.

    The shape before the first change and after the last one is the last text's:
    found with two C-level passes over the text as an int. Only the lines in
    between are blanked and masked one by one, and only the records that changed
    are parsed again (``_patch_shape``). None when the text is cut or the change
    is not a clean one: the caller parses the whole text. Else the new shape and
    its records (record text -> parsed).
    """
    if not text.endswith("\n"):
        return None
    old_length, new_length = len(last.text), len(text)
    common = min(old_length, new_length)
    shift = new_length - old_length
    # Shape differences (byte i of the int is text position i): the lowest set bit is
    # the first one. (The mask is as long as the last text: beyond it, nothing counts.)
    differ = (value ^ last.blank_value) & last.mask
    first = min(common, ((differ & -differ).bit_length() - 1) // 8) if differ else common
    # Then the ends aligned (new[i + shift] against old[i]): the highest set bit is
    # the last difference, and what follows it is the same at the end of both.
    if shift > 0:
        differ = ((value >> 8 * shift) ^ last.blank_value) & last.mask
    elif shift < 0:
        differ = (value ^ (last.blank_value >> -8 * shift)) & (last.mask >> -8 * shift)
    same_end = common - 1 - (differ.bit_length() - 1) // 8 if differ else common
    same_end = min(same_end, old_length - first, new_length - first)
    # Widen to whole lines (blanks and marks are made line by line).
    start = text.rfind("\n", 0, first) + 1
    stop = new_length - same_end
    if stop > 0 and text[stop - 1] != "\n":
        stop = text.find("\n", stop) + 1
    old_stop = stop - shift
    marked = _marked(text[start:stop].split("\n"))
    old_blank = "\n".join(last.records) + "\n"
    blank = old_blank[:start] + marked.replace("\0", " ") + old_blank[old_stop:]
    records = _RECORD_BOUNDARY.split(blank)
    if records[-1] != "":
        return None
    patched = _patch_shape(last, records[:-1], hz, conv, previous)
    if patched is None:
        return None
    parsed, current = patched
    old_mask = last.mask.to_bytes(old_length, "little")
    mask = int.from_bytes(old_mask[:start] + marked.encode("ascii").translate(_MASK_BYTES) + old_mask[old_stop:],
                          "little")
    blank_value = int.from_bytes(blank.encode("ascii"), "little")
    counters = counters_of(value, blank_value, mask, new_length, parsed[4], conv.numbers)
    if counters is None:
        return None
    return Shape(text, *parsed, *counters, blank_value, mask), current


def _patch_shape(last: Shape, records: list[str], hz: int, conv: Conversions, previous: dict[str, tuple],
                 ) -> tuple[tuple[list[str], int, bool, IPVSTable, Layout], dict[str, tuple]] | None:
    """The last parse with the records that changed since replaced; None if it cannot be.

    A Service or an endpoint changes one record or a few, somewhere in the text:
    the records before and after the change are the last parse's, so only the
    middle is parsed and only the middle's entries are replaced (the rest of the
    layout is shifted, not rebuilt). Anything unusual (garbage, a header, a record
    printed twice) gives None, and the whole text is parsed record by record.
    ``previous`` is the last parse's records; the new ones are returned beside.
    """
    old = last.records
    same = list(map(str.__eq__, old, records))  # C-level: one comparison per record
    head = same.index(False) if False in same else len(same)
    same = list(map(str.__eq__, reversed(old), reversed(records)))
    tail = same.index(False) if False in same else len(same)
    tail = min(tail, len(old) - head, len(records) - head)
    if head < last.lead:
        return None
    old_middle = old[head:len(old) - tail]
    new_middle = records[head:len(records) - tail]
    try:
        added = [known_or_parsed(previous, record, hz, conv) for record in new_middle]
    except (ValueError, IndexError, KeyError):
        return None  # garbage: the full parse says what to drop
    skeleton = last.skeleton
    gone = {previous[record][0].key for record in old_middle}
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
    current = dict(previous)
    for record in old_middle:
        del current[record]
    current.update(zip(new_middle, added))

    # The layout: entries [start, stop) of the last one make way for the middle's.
    layout = last.layout
    start, stop = head - last.lead, len(old) - tail - last.lead
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
        return (records, last.lead, True, table, layout), current
    table._layout = Layout.build(
        layout.keys[:start] + new_keys + layout.keys[stop:],
        layout.first_lines[:start] + first_lines + list(map(line_shift.__add__, layout.first_lines[stop:])),
        layout.starts[:start] + starts + list(map(counter_shift.__add__, layout.starts[stop:])),
        None, layout.lines + line_shift)
    return (records, last.lead, True, table, table._layout), current
