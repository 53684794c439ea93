"""IPVS over generic netlink, and the kernel's HZ: what /proc/net/ip_vs does not say.

/proc prints persistence timeouts in jiffies (HZ is needed to turn them into
seconds) and shows only "ops" of the scheduler flags; netlink gives both, one
virtual server at a time (``read_virtual_server``) or as one dump of the
services without their real servers (``dump_service_flags``). Reads only: the
exporter never writes to IPVS. Nothing is kept between calls.
"""

from __future__ import annotations

import errno
import gzip
import os
import socket
import struct

from exporter.dataplane import RealServer, VirtualServer, VirtualServerKey
from exporter.readers.ipvs.table import FALLBACK_HZ, IPVSTable, IPVSUnavailable


# --- the kernel's HZ ---------------------------------------------------------

def kernel_hz() -> int:
    """This machine's CONFIG_HZ from the kernel config, else FALLBACK_HZ.

    Reads the config on every call (a one-shot parse, a tool): a reader keeps what
    it learned. Exact only when the config is readable; ``IPVSReader`` does better,
    from one netlink read of a persistent service (``hz_from_netlink``).
    """
    return _hz_from_config() or FALLBACK_HZ


def _hz_from_config() -> int | None:
    sources = [("/proc/config.gz", gzip.open), (f"/boot/config-{os.uname().release}", open)]
    for path, opener in sources:
        try:
            with opener(path, "rt") as fh:
                for line in fh:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1])
        except (OSError, ValueError):
            continue
    return None


# --- netlink (generic netlink family "IPVS") -----------------------------------

_NETLINK_GENERIC = 16
_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_ID = 1
_CTRL_ATTR_FAMILY_NAME = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3

_IPVS_CMD_GET_SERVICE = 4
_IPVS_CMD_GET_DEST = 8
_IPVS_CMD_ATTR_SERVICE = 1
_SVC_AF, _SVC_PROTOCOL, _SVC_ADDR, _SVC_PORT, _SVC_FWMARK = 1, 2, 3, 4, 5
_SVC_SCHED_NAME, _SVC_FLAGS, _SVC_TIMEOUT, _SVC_NETMASK = 6, 7, 8, 9
_DEST_ADDR, _DEST_PORT, _DEST_FWD_METHOD, _DEST_WEIGHT = 1, 2, 3, 4
_DEST_ADDR_FAMILY = 11

_IP_VS_SVC_F_PERSISTENT = 0x1
_IP_VS_SVC_F_ONEPACKET = 0x4
_SCHED_FLAG_BITS = (0x8, 0x10, 0x20)
# ipvsadm's names for the three scheduler flags, by scheduler.
_SCHED_FLAG_NAMES = {
    "sh": ("sh-fallback", "sh-port", "flag-3"),
    "mh": ("mh-fallback", "mh-port", "flag-3"),
}
_FORWARD_NAMES = {0: "Masq", 1: "Local", 2: "Tunnel", 3: "Route", 4: "Bypass"}
_PROTOCOL_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
_PROTOCOL_NAMES = {v: k for k, v in _PROTOCOL_NUMBERS.items()}


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    out = {}
    end = len(data)
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def scheduler_flag_names(scheduler: str, flags: int) -> tuple[str, ...]:
    names = _SCHED_FLAG_NAMES.get(scheduler, ("flag-1", "flag-2", "flag-3"))
    out = tuple(name for bit, name in zip(_SCHED_FLAG_BITS, names) if flags & bit)
    if flags & _IP_VS_SVC_F_ONEPACKET:
        out = ("ops",) + out
    return out


class IPVSNetlink:
    """A small generic-netlink client for the IPVS family: reads only, never writes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self.seq = 0
        try:
            reply = self._request(_GENL_ID_CTRL, _CTRL_CMD_GETFAMILY,
                                  _attr(_CTRL_ATTR_FAMILY_NAME, b"IPVS\0"), dump=False)
        except OSError as err:
            self.close()
            if err.errno == errno.ENOENT:
                raise IPVSUnavailable("ip_vs module not loaded (no IPVS netlink family)") from None
            raise
        self.family = struct.unpack("=H", _attrs(reply[0])[_CTRL_ATTR_FAMILY_ID][:2])[0]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "IPVSNetlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, family: int, cmd: int, payload: bytes, dump: bool) -> list[bytes]:
        """Send one request; return the attribute area of each reply message."""
        self.seq += 1
        flags = _NLM_F_REQUEST | (_NLM_F_DUMP if dump else _NLM_F_ACK)
        body = struct.pack("=BBH", cmd, 1, 0) + payload
        self.sock.send(struct.pack("=IHHII", 16 + len(body), family, flags, self.seq, 0) + body)
        out = []
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                if length < 16:
                    raise OSError(errno.EPROTO, "bad netlink message")
                if seq == self.seq:
                    if kind == _NLMSG_DONE:
                        return out
                    if kind == _NLMSG_ERROR:
                        code = struct.unpack_from("=i", data, offset + 16)[0]
                        if code:
                            raise OSError(-code, os.strerror(-code))
                        return out  # the ACK of a non-dump request
                    out.append(data[offset + 20:offset + length])  # after nlmsghdr + genlmsghdr
                offset += (length + 3) & ~3

    def _service_key_attrs(self, key: VirtualServerKey, af: int | None = None) -> bytes:
        if key.fwmark is not None:
            # A fwmark service is looked up by (family, mark).
            inner = _attr(_SVC_AF, struct.pack("=H", af or socket.AF_INET)) + \
                _attr(_SVC_FWMARK, struct.pack("=I", key.fwmark))
        else:
            ipv6 = ":" in key.address
            af = socket.AF_INET6 if ipv6 else socket.AF_INET
            raw = socket.inet_pton(af, key.address)
            inner = (_attr(_SVC_AF, struct.pack("=H", af))
                     + _attr(_SVC_PROTOCOL, struct.pack("=H", _PROTOCOL_NUMBERS[key.protocol]))
                     + _attr(_SVC_ADDR, raw.ljust(16, b"\0"))
                     + _attr(_SVC_PORT, struct.pack("!H", key.port)))
        return _attr(_IPVS_CMD_ATTR_SERVICE, inner)

    def get_service(self, key: VirtualServerKey) -> dict[int, bytes] | None:
        """The raw service attributes of one virtual server, or None when absent."""
        families = (socket.AF_INET, socket.AF_INET6) if key.fwmark is not None else (None,)
        for af in families:
            try:
                replies = self._request(self.family, _IPVS_CMD_GET_SERVICE,
                                        self._service_key_attrs(key, af), dump=False)
            except OSError as err:
                if err.errno in (errno.ESRCH, errno.ENOENT):
                    continue
                raise
            if replies:
                return _attrs(_attrs(replies[0]).get(_IPVS_CMD_ATTR_SERVICE, b""))
        return None

    def dump_services(self) -> list[dict[int, bytes]]:
        return [_attrs(_attrs(r).get(_IPVS_CMD_ATTR_SERVICE, b""))
                for r in self._request(self.family, _IPVS_CMD_GET_SERVICE, b"", dump=True)]

    def dump_dests(self, key: VirtualServerKey, af: int | None = None) -> list[dict[int, bytes]]:
        replies = self._request(self.family, _IPVS_CMD_GET_DEST,
                                self._service_key_attrs(key, af), dump=True)
        return [_attrs(_attrs(r).get(2, b"")) for r in replies]  # IPVS_CMD_ATTR_DEST

    def read_virtual_server(self, key: VirtualServerKey) -> VirtualServer | None:
        svc = self.get_service(key)
        if svc is None:
            return None
        af = struct.unpack("=H", svc[_SVC_AF][:2])[0]
        try:
            dests = self.dump_dests(key, af)
        except OSError as err:
            if err.errno in (errno.ESRCH, errno.ENOENT):
                return None  # deleted between the two requests
            raise
        return _virtual_server_from_attrs(key, svc, dests)


def _address(af: int, raw: bytes) -> str:
    if af == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[:16])
    return socket.inet_ntoa(raw[:4])


def _virtual_server_from_attrs(key: VirtualServerKey, svc: dict[int, bytes],
                               dests: list[dict[int, bytes]]) -> VirtualServer:
    af = struct.unpack("=H", svc[_SVC_AF][:2])[0]
    scheduler = svc[_SVC_SCHED_NAME].rstrip(b"\0").decode()
    flags = struct.unpack("=I", svc[_SVC_FLAGS][:4])[0] if _SVC_FLAGS in svc else 0
    timeout = netmask = None
    if flags & _IP_VS_SVC_F_PERSISTENT:
        timeout = struct.unpack("=I", svc[_SVC_TIMEOUT][:4])[0]
        raw_mask = svc.get(_SVC_NETMASK, b"\xff\xff\xff\xff")[:4]
        if af == socket.AF_INET6:
            netmask = str(struct.unpack("=I", raw_mask)[0])
        else:
            netmask = socket.inet_ntoa(raw_mask)
    reals = {}
    for d in dests:
        d_af = struct.unpack("=H", d[_DEST_ADDR_FAMILY][:2])[0] if _DEST_ADDR_FAMILY in d else af
        address = _address(d_af, d[_DEST_ADDR])
        port = struct.unpack("!H", d[_DEST_PORT][:2])[0]
        fwd = struct.unpack("=I", d[_DEST_FWD_METHOD][:4])[0] & 0x7
        reals[(address, port)] = RealServer(
            address, port,
            struct.unpack("=i", d[_DEST_WEIGHT][:4])[0],
            _FORWARD_NAMES.get(fwd, str(fwd)))
    return VirtualServer(key, scheduler, timeout, reals, None,
                         scheduler_flag_names(scheduler, flags), netmask)


def read_virtual_server(key: VirtualServerKey) -> VirtualServer | None:
    """One virtual server and its real servers over netlink (two requests), or None.

    For following one service closely (programming latency) without reading the
    whole table. Raises IPVSUnavailable when ip_vs is not loaded.
    """
    with IPVSNetlink() as nl:
        return nl.read_virtual_server(key)


def dump_service_flags() -> dict[VirtualServerKey, tuple[tuple[str, ...], int | None]]:
    """Every service's (flags as ipvsadm names them, persistence timeout in seconds).

    One netlink dump of services only (no real servers): what /proc does not print.
    """
    out = {}
    with IPVSNetlink() as nl:
        for svc in nl.dump_services():
            af = struct.unpack("=H", svc[_SVC_AF][:2])[0]
            if _SVC_FWMARK in svc and struct.unpack("=I", svc[_SVC_FWMARK][:4])[0]:
                key = VirtualServerKey.for_fwmark(struct.unpack("=I", svc[_SVC_FWMARK][:4])[0])
            else:
                proto = _PROTOCOL_NAMES.get(struct.unpack("=H", svc[_SVC_PROTOCOL][:2])[0], "?")
                key = VirtualServerKey(proto, _address(af, svc[_SVC_ADDR]),
                                       struct.unpack("!H", svc[_SVC_PORT][:2])[0])
            scheduler = svc[_SVC_SCHED_NAME].rstrip(b"\0").decode()
            flags = struct.unpack("=I", svc[_SVC_FLAGS][:4])[0]
            timeout = (struct.unpack("=I", svc[_SVC_TIMEOUT][:4])[0]
                       if flags & _IP_VS_SVC_F_PERSISTENT else None)
            out[key] = (scheduler_flag_names(scheduler, flags), timeout)
    return out


def merge_service_flags(table: IPVSTable,
                        flags_by_key: dict[VirtualServerKey, tuple[tuple[str, ...], int | None]]) -> IPVSTable:
    """Put netlink's flags and exact timeouts into a table parsed from /proc."""
    for key, (flags, timeout) in flags_by_key.items():
        vs = table.get(key)
        if vs is not None and (vs.flags != flags or vs.persistent_timeout != timeout):
            table[key] = vs._replace(flags=flags, persistent_timeout=timeout)
    return table


def hz_from_netlink(persistent_jiffies: dict[VirtualServerKey, int]) -> int | None:
    """HZ = a persistence timeout in jiffies (/proc) / the same in seconds (netlink).

    ``persistent_jiffies`` as a parsed table holds them; None when no service of it
    can be read over netlink. This host's kernel only.
    """
    for key, jiffies in persistent_jiffies.items():
        try:
            vs = read_virtual_server(key)
        except (IPVSUnavailable, OSError):
            return None
        if vs is not None and vs.persistent_timeout:
            return round(jiffies / vs.persistent_timeout)
    return None
