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


def format_ip_vs(table: Table, hz: int) -> str:
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
        for rs in sorted_real_servers(vs):
            out.append(f"  -> {_hex(rs.address, rs.port)}      {rs.forward:<7} {rs.weight:<6} "
                       f"{rs.active_connections:<10} {rs.inactive_connections:<10}\n")
    return "".join(out)
