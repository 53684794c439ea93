"""Write a Table as the kernel prints /proc/net/ip_vs (net/netfilter/ipvs/ip_vs_ctl.c,
ip_vs_info_seq_show), for tests and benches that need the text of a given table."""

from __future__ import annotations

import ipaddress

from exporter.dataplane import Table, sorted_real_servers, sorted_virtual_servers

HEADER = ("IP Virtual Server version 1.2.1 (size=4096)\n"
          "Prot LocalAddress:Port Scheduler Flags\n"
          "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n")


def _hex(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return f"{int(ip):08X}:{port:04X}"
    return f"[{ip.exploded}]:{port:04X}"


def format_ip_vs(table: Table, hz: int, connections: dict | None = None) -> str:
    """The kernel's text of ``table``; counters from ``connections``
    ({(virtual server key, real server key): (active, inactive)}), else from the
    table's own (an IPVSTable), else 0."""
    own = getattr(table, "connections", None)
    out = [HEADER]
    for vs in sorted_virtual_servers(table):
        key = vs.key
        if key.fwmark is not None:
            line = f"FWM  {key.fwmark:08X} {vs.scheduler} "
        else:
            line = f"{key.protocol}  {_hex(key.address, key.port)} {vs.scheduler} "
        if vs.persistent_timeout is not None:
            mask = "FFFFFFFF" if key.address is None or ":" not in key.address else "00000080"
            line += f"persistent {vs.persistent_timeout * hz} {mask}"
        out.append(line + "\n")
        counts = own(key) if own is not None and connections is None else {}
        for rs in sorted_real_servers(vs):
            active, inactive = (connections or {}).get((key, rs.key)) or counts.get(rs.key) or (0, 0)
            out.append(f"  -> {_hex(rs.address, rs.port)}      {rs.forward:<7} {rs.weight:<6} "
                       f"{active:<10} {inactive:<10}\n")
    return "".join(out)
