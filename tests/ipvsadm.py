"""What ipvsadm says a table is: parsers of `ipvsadm -Sn` and `ipvsadm -Ln --exact`.

The reference the IPVS reader is checked against, field by field (in the VM on a
live kernel, on the host on texts captured from one). Independent of the reader:
ipvsadm gets its table over netlink and prints dotted/compressed addresses itself.
"""

from __future__ import annotations

import ipaddress

from exporter.dataplane import RealServer, Table, VirtualServer, VirtualServerKey

_PROTO_FLAGS = {"-t": "TCP", "-u": "UDP", "--sctp-service": "SCTP"}
_FORWARD_FLAGS = {"-m": "Masq", "-g": "Route", "-i": "Tunnel"}


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host.startswith("["):
        host = host[1:-1]
    return ipaddress.ip_address(host).compressed, int(port)


def _key(tokens: list[str]) -> tuple[VirtualServerKey, list[str]]:
    flag, value, rest = tokens[0], tokens[1], tokens[2:]
    if flag == "-f":
        if rest and rest[0] == "-6":
            rest = rest[1:]
        return VirtualServerKey.for_fwmark(int(value)), rest
    address, port = _host_port(value)
    return VirtualServerKey(_PROTO_FLAGS[flag], address, port), rest


def _options(tokens: list[str]) -> tuple[dict[str, str], tuple[str, ...]]:
    opts: dict[str, str] = {}
    flags: tuple[str, ...] = ()
    it = iter(tokens)
    for token in it:
        if token == "-o":
            flags = ("ops",)
        elif token.startswith("-"):
            opts[token] = next(it)
    return opts, flags


def parse_save(text: str) -> Table:
    """`ipvsadm -Sn` -> Table (no connection counters: -S does not print them)."""
    table: Table = {}
    for line in text.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0] == "-A":
            key, rest = _key(tokens[1:])
            opts, flags = _options(rest)
            if "-b" in opts:
                flags += tuple(opts["-b"].split(","))
            persistent = "-p" in opts
            netmask = None
            if persistent:
                is_v6 = (key.address and ":" in key.address) or "-6" in tokens
                netmask = opts.get("-M", "128" if is_v6 else "255.255.255.255")
            table[key] = VirtualServer(key, opts["-s"], int(opts["-p"]) if persistent else None,
                                       {}, None, flags, netmask)
        elif tokens[0] == "-a":
            key, rest = _key(tokens[1:])
            i = rest.index("-r")
            address, port = _host_port(rest[i + 1])
            forward = next((_FORWARD_FLAGS[t] for t in rest if t in _FORWARD_FLAGS), "Masq")
            weight = int(rest[rest.index("-w") + 1]) if "-w" in rest else 1
            table[key].real_servers[(address, port)] = RealServer(address, port, weight, forward)
    return table


def parse_list_counters(text: str) -> dict[tuple[VirtualServerKey, tuple[str, int]], tuple[int, int]]:
    """`ipvsadm -Ln --exact` -> {(virtual server key, real server key): (active, inactive)}."""
    out = {}
    key = None
    for line in text.splitlines():
        tokens = line.split()
        if not tokens or tokens[0] in ("IP", "Prot") or tokens[1] == "RemoteAddress:Port":
            continue
        if tokens[0] == "->":
            real = _host_port(tokens[1])
            out[(key, real)] = (int(tokens[4]), int(tokens[5]))
        elif tokens[0] == "FWM":
            key = VirtualServerKey.for_fwmark(int(tokens[1]))
        else:
            address, port = _host_port(tokens[1])
            key = VirtualServerKey(tokens[0], address, port)
    return out


def comparable(table: Table, sched_flags: bool = True) -> dict:
    """A table as plain nested data, for equality with a readable diff on failure.

    Counters are not in it: a live table keeps them apart (``IPVSTable.connections``).
    """
    out = {}
    for key, vs in table.items():
        flags = vs.flags if sched_flags else tuple(f for f in vs.flags if f == "ops")
        reals = {rkey: (rs.weight, rs.forward) for rkey, rs in vs.real_servers.items()}
        out[key] = (vs.scheduler, vs.persistent_timeout, vs.persistent_netmask, flags, reals)
    return out
