"""Copy iptables-nft's nf_tables tables from one network namespace into another, in seconds.

`iptables-nft-restore` of kube-proxy's rules for 10,000 Services takes 5-10 minutes of
its own CPU here (the kernel's part is under a second), which kept the 10,000 rows of the
iptables-nft benches from being run often. The kernel dumps tables, chains and rules as
NEWTABLE / NEWCHAIN / NEWRULE messages, nearly the requests that made them: ``snapshot``
dumps them (the tables iptables-nft uses: ``nat`` and ``filter`` of both families) and
keeps each message's attributes minus what the kernel assigns (handles, use counts);
``replay`` sends them back in a few batched transactions, in another namespace. The rules
that arrive are byte for byte the expressions iptables-nft wrote (compat matches and
targets included), which the tests check by comparing `iptables-nft-save` of both
namespaces. ``cached_table`` keeps a snapshot in a file under ``.cache/`` so that a
table is built with iptables-nft-restore once per machine.

Only for tests and benches: the exporter never writes to nf_tables.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import struct
import threading
from pathlib import Path

from exporter.readers.ipset import NETLINK_NETFILTER, NFNETLINK_V0, NLM_F_DUMP, NLM_F_REQUEST, _NLA, _NLMSGHDR, _nla
from exporter.readers.nftables_netlink import NftNetlink

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN, NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 0, 1, 3, 4, 6, 7
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x4, 0x400, 0x800
NLMSG_ERROR = 2
# Attributes the kernel fills in and a NEW request must not carry.
DROPPED = {
    NFT_MSG_NEWTABLE: {3, 4, 5},  # NFTA_TABLE_USE, _HANDLE, _PAD
    NFT_MSG_NEWCHAIN: {2, 6, 8, 9, 10, 11},  # _HANDLE, _USE, _COUNTERS, _PAD, _FLAGS, _ID
    NFT_MSG_NEWRULE: {3, 6, 8, 9, 10},  # NFTA_RULE_HANDLE, _POSITION, _ID, _POSITION_ID, _CHAIN_ID
}
NAME_ATTR = {NFT_MSG_NEWTABLE: 1, NFT_MSG_NEWCHAIN: 1, NFT_MSG_NEWRULE: 1}  # the table's name in each
FAMILIES = (socket.AF_INET, socket.AF_INET6)  # NFPROTO_IPV4 = 2, NFPROTO_IPV6 = 10
TABLES = (b"nat", b"filter")
BATCH_BYTES = 8 << 20  # a transaction's messages; the send buffer is raised to fit


def _strip(kind: int, buf, start: int, end: int) -> bytes | None:
    """The message's attributes minus the kernel's own; None if not of a table iptables-nft uses."""
    out = []
    at = start
    table = None
    while at + 4 <= end:
        alen, t = _NLA.unpack_from(buf, at)
        kind_of = t & 0x3FFF
        chunk = bytes(buf[at:at + ((alen + 3) & ~3)])
        if kind_of == NAME_ATTR[kind]:
            table = bytes(buf[at + 4:at + alen]).rstrip(b"\0")
        if kind_of not in DROPPED[kind]:
            out.append(chunk)
        at += (alen + 3) & ~3
    return b"".join(out) if table in TABLES else None


def _nested(data: bytes):
    at = 0
    while at + 4 <= len(data):
        alen, t = _NLA.unpack_from(data, at)
        yield t & 0x3FFF, data[at + 4:at + alen]
        at += (alen + 3) & ~3


def _with_compat(rule: bytes) -> bytes:
    """The rule plus NFTA_RULE_COMPAT (the protocol its xt matches may require, as
    iptables-nft sends it): the kernel takes it from the request and never dumps it."""
    attrs = dict(_nested(rule))
    proto_register = None
    for kind, expression in _nested(attrs.get(4, b"")):  # NFTA_RULE_EXPRESSIONS: NFTA_LIST_ELEMs
        fields = dict(_nested(expression))
        name, data = fields.get(1, b"").rstrip(b"\0"), dict(_nested(fields.get(2, b"")))
        if name == b"meta" and data.get(2) == struct.pack(">I", 16):  # NFT_META_L4PROTO into a register
            proto_register = data.get(1)
        elif name == b"cmp" and proto_register is not None and data.get(1) == proto_register:
            value = dict(_nested(data.get(3, b""))).get(1, b"")  # NFTA_CMP_DATA: NFTA_DATA_VALUE
            inverted = data.get(2) == struct.pack(">I", 1)
            if len(value) == 1:
                compat = _nla(1, struct.pack(">I", value[0])) + _nla(2, struct.pack(">I", 2 if inverted else 0))
                return rule + _NLA.pack(4 + len(compat), 5 | 0x8000) + compat  # NLA_F_NESTED
            break
    return rule


def snapshot() -> list[tuple[int, int, bytes]]:
    """(message type, family, attributes) of every table, chain and rule of iptables-nft's
    tables in this thread's network namespace, in an order that can be replayed."""
    messages: list[tuple[int, int, bytes]] = []
    with NftNetlink(30.0) as nl:
        for family in FAMILIES:
            for buf, start, end in nl._replies(NFT_MSG_GETTABLE, family, NLM_F_DUMP, b"", "tables"):
                attrs = _strip(NFT_MSG_NEWTABLE, buf, start, end)
                if attrs is not None:
                    messages.append((NFT_MSG_NEWTABLE, family, attrs))
            chains = []
            for buf, start, end in nl._replies(NFT_MSG_GETCHAIN, family, NLM_F_DUMP, b"", "chains"):
                attrs = _strip(NFT_MSG_NEWCHAIN, buf, start, end)
                if attrs is not None:
                    messages.append((NFT_MSG_NEWCHAIN, family, attrs))
                    chains.append(attrs)
            for attrs in chains:  # one dump per chain: a whole-table dump is quadratic in the kernel
                table = name = None
                at = 0
                while at + 4 <= len(attrs):
                    alen, t = _NLA.unpack_from(attrs, at)
                    if t & 0x3FFF == 1:
                        table = attrs[at + 4:at + alen]
                    elif t & 0x3FFF == 3:
                        name = attrs[at + 4:at + alen]
                    at += (alen + 3) & ~3
                request = _nla(1, table) + _nla(2, name)
                for buf, start, end in nl._replies(NFT_MSG_GETRULE, family, NLM_F_DUMP, request, "rules"):
                    rule = _strip(NFT_MSG_NEWRULE, buf, start, end)
                    if rule is not None:
                        messages.append((NFT_MSG_NEWRULE, family, _with_compat(rule)))
    return messages


def _message(kind: int, family: int, flags: int, seq: int, attrs: bytes, subsys: int = NFNL_SUBSYS_NFTABLES) -> bytes:
    body = struct.pack("=BBH", family, NFNETLINK_V0, 0) + attrs
    return _NLMSGHDR.pack(16 + len(body), (subsys << 8) | kind, flags, seq, 0) + body


def _describe(message: tuple | None) -> str:
    if message is None:
        return "the batch"
    kind, family, attrs = message
    return f"type {kind}, family {family}, {attrs[:80]!r}"


def replay(messages: list[tuple[int, int, bytes]]) -> None:
    """Create what ``snapshot`` read in this thread's network namespace (which must not
    have those tables yet), in transactions of about ``BATCH_BYTES``; raises OSError on
    the first message the kernel refuses."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as sock:
        sock.setsockopt(socket.SOL_SOCKET, 32, BATCH_BYTES * 2)  # SO_SNDBUFFORCE
        sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE: an error echoes its message
        sock.setsockopt(270, 10, 1)  # SOL_NETLINK, NETLINK_CAP_ACK: errors without the message
        sock.settimeout(60)
        sock.bind((0, 0))
        seq = 0
        batch: list[bytes] = []
        size = 0

        def flush() -> None:
            nonlocal seq, batch, size
            if not batch:
                return
            seq += 1
            begin = struct.pack("=BBH", socket.AF_UNSPEC, NFNETLINK_V0, socket.htons(NFNL_SUBSYS_NFTABLES))
            head = _NLMSGHDR.pack(16 + len(begin), NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0) + begin
            seq += 1
            tail = _NLMSGHDR.pack(16 + len(begin), NFNL_MSG_BATCH_END, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + begin
            sock.sendall(head + b"".join(batch) + tail)
            end_seq = seq
            while True:  # errors of the batch's messages, then the END's acknowledgement
                data = sock.recv(1 << 16)
                at = 0
                while at + 16 <= len(data):
                    length, kind, _, msg_seq, _ = _NLMSGHDR.unpack_from(data, at)
                    if kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, at + 16)
                        if code:
                            raise OSError(-code, f"nf_tables refused message {msg_seq} of a replay "
                                                 f"({_describe(messages_by_seq.get(msg_seq))}): {os.strerror(-code)}")
                        if msg_seq == end_seq:
                            batch, size = [], 0
                            return
                    at += (length + 3) & ~3

        messages_by_seq: dict[int, tuple] = {}
        for kind, family, attrs in messages:
            seq += 1
            messages_by_seq[seq] = (kind, family, attrs)
            flags = NLM_F_REQUEST | NLM_F_CREATE | (NLM_F_APPEND if kind == NFT_MSG_NEWRULE else 0)
            message = _message(kind, family, flags, seq, attrs)
            if size + len(message) > BATCH_BYTES:
                flush()
            batch.append(message)
            size += len(message)
        flush()


def cached_table(ns, text: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Load ``text`` (iptables-restore input) into ``ns`` (an ``IptNS`` of the nft backend, with
    no rules yet): from a snapshot kept in ``.cache/`` when one of the same text and kernel
    exists, else with ``ns.restore`` (then snapshotted). Returns "replayed" or "restored"."""
    cache = Path(cache_dir) if cache_dir else Path(__file__).resolve().parent.parent / ".cache" / "nft-snapshots"
    key = hashlib.sha256(text.encode() + os.uname().release.encode()).hexdigest()[:24]
    path = cache / f"{key}.pickle"
    if path.exists():
        with open(path, "rb") as fh:
            messages = pickle.load(fh)
        ns.run(lambda: replay(messages))
        return "replayed"
    ns.restore(text)
    messages = ns.run(snapshot)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    with open(partial, "wb") as fh:
        pickle.dump(messages, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(partial, path)
    return "restored"
