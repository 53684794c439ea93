"""The live IPVS table: /proc/net/ip_vs for the whole table, netlink for one service.

Split by job:
- ``table``: the parsed table (``IPVSTable``, counters kept apart), plain data;
- ``text``: the text parse, one-shot and pure (``parse_ip_vs``);
- ``incremental``: parsing the same table again, only what changed (``IncrementalParser``);
- ``netlink``: the IPVS generic-netlink family (one virtual server, scheduler flags) and HZ;
- ``reader``: ``IPVSReader``, the ``DataplaneReader`` of mode "ipvs", which owns
  everything kept between reads (no module here keeps state).
"""

from exporter.readers.ipvs.incremental import IncrementalParser
from exporter.readers.ipvs.netlink import (IPVSNetlink, dump_service_flags, kernel_hz, merge_service_flags,
                                           read_virtual_server, scheduler_flag_names)
from exporter.readers.ipvs.reader import IPVSReader, read_ip_vs, read_ip_vs_text
from exporter.readers.ipvs.table import FALLBACK_HZ, PROC_IP_VS, IPVSTable, IPVSUnavailable, with_hz
from exporter.readers.ipvs.text import parse_ip_vs

__all__ = [
    "FALLBACK_HZ", "IPVSNetlink", "IPVSReader", "IPVSTable", "IPVSUnavailable", "IncrementalParser",
    "PROC_IP_VS", "dump_service_flags", "kernel_hz", "merge_service_flags", "parse_ip_vs",
    "read_ip_vs", "read_ip_vs_text", "read_virtual_server", "scheduler_flag_names", "with_hz",
]
