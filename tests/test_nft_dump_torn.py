"""Rule dumps that a transaction tore, told from the dump itself (nftables_netlink).

The kernel dumps a chain's (or a table's) rules in messages of ~32 KB and resumes each
by counting rules from the start, the rules a transaction being prepared has added
counted too: when that transaction adds more meanwhile, or is aborted, the count lands
elsewhere and the dump repeats or skips rules. An aborted transaction moves no
generation and announces nothing, so only the dump can say: each rule carries its
position (the handle of the rule before it), and a boundary between messages that no
position vouches for (the next message begins a chain, or holds no rule) is checked by
dumping again the chains it could have skipped.

These tests script the kernel's datagrams (a boundary falls where the test puts it);
tests/test_nftables_reader.py and tests/test_iptables_nft.py meet real tears beside
aborted transactions on the real kernel.
"""

from __future__ import annotations

import struct

import pytest

from exporter.readers.ipset import NLM_F_MULTI, NLMSG_DONE, _NLMSGHDR, _nla
from exporter.readers.nftables_netlink import (NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4, NFTA_RULE_CHAIN,
                                               NFTA_RULE_HANDLE, NFTA_RULE_POSITION, NFTA_RULE_TABLE,
                                               NFTA_RULE_USERDATA, _SMALL_ROOM, NftDumpTorn, NftNetlink)

NFT_MSG_NEWRULE = 6


def _rule(chain: str, handle: int, position: int, pad: int = 0) -> bytes:
    attrs = (_nla(NFTA_RULE_TABLE, b"t\0") + _nla(NFTA_RULE_CHAIN, chain.encode() + b"\0")
             + _nla(NFTA_RULE_HANDLE, struct.pack(">Q", handle)))
    if position:  # the kernel leaves it out for a chain's first rule
        attrs += _nla(NFTA_RULE_POSITION, struct.pack(">Q", position))
    if pad:
        attrs += _nla(NFTA_RULE_USERDATA, bytes(pad))
    return struct.pack("=BBH", NFPROTO_IPV4, 0, 0) + attrs


class ScriptedKernel:
    """A netlink socket answering each rule dump with scripted datagrams: ``dumps[chain]``
    (None: the whole table) is a list of datagrams, each a list of (chain, handle,
    position) rules; the last datagram also carries NLMSG_DONE unless ``done_alone``. A
    datagram followed by another is as the kernel makes one: full, its last rule padded
    (a long comment) to the room a dump has, unless ``roomy`` (short: a rule may have been
    left out of it only if larger than any kube-proxy writes)."""

    def __init__(self, dumps: dict, done_alone: tuple = (), roomy: bool = False) -> None:
        self.dumps, self.done_alone, self.roomy = dumps, set(done_alone), roomy
        self.asked: list = []
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        seq = _NLMSGHDR.unpack_from(data, 0)[3]
        chain = None
        at = 20
        while at + 4 <= len(data):
            length, kind = struct.unpack_from("=HH", data, at)
            if kind == NFTA_RULE_CHAIN:
                chain = data[at + 4:at + length].rstrip(b"\0").decode()
            at += (length + 3) & ~3
        self.asked.append(chain)
        done = _NLMSGHDR.pack(20, NLMSG_DONE, NLM_F_MULTI, seq, 0) + b"\0\0\0\0"
        datagrams = []
        scripted = self.dumps.get(chain, [[]])
        for n, rules in enumerate(scripted):
            body = b""
            cut = not self.roomy and (n + 1 < len(scripted) or chain in self.done_alone)
            for k, (rule_chain, handle, position) in enumerate(rules):
                pad = _SMALL_ROOM[0] - 600 if cut and k + 1 == len(rules) else 0
                payload = _rule(rule_chain, handle, position, pad)
                body += _NLMSGHDR.pack(16 + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
                                       NLM_F_MULTI, seq, 0) + payload
            datagrams.append(body)
        if chain in self.done_alone:
            datagrams.append(done)
        else:
            datagrams[-1] += done
        self.pending = datagrams
        return len(data)

    def recv_into(self, buf, nbytes: int = 0, flags: int = 0) -> int:
        data = self.pending.pop(0)
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def _netlink(kernel: ScriptedKernel) -> NftNetlink:
    nl = NftNetlink.__new__(NftNetlink)
    nl.sock, nl.seq, nl.buf, nl.timeout = kernel, 0, bytearray(1 << 16), 1.0
    return nl


def _handles(nl: NftNetlink, order: list[str] | None = None):
    rules, _ = nl.each_rule(NFPROTO_IPV4, "t", lambda buf, chain, handle, exprs, udata: (chain, handle),
                            order=order)
    return rules


ORDER = ["a", "b", "c"]


def test_a_whole_dump_whose_positions_follow_is_served_with_no_dump_again():
    kernel = ScriptedKernel({None: [[("a", 1, 0), ("a", 2, 1)], [("a", 3, 2), ("b", 4, 0), ("c", 5, 0)]]})
    assert _handles(_netlink(kernel), ORDER) == [("a", 1), ("a", 2), ("a", 3), ("b", 4), ("c", 5)]
    assert kernel.asked == [None]  # each boundary vouched for by a position


def test_a_rule_after_one_other_than_its_position_tears_the_dump_read_to_its_end():
    # Resumed two rules on: rule 4 says rule 3 is before it, the dump gave 2.
    kernel = ScriptedKernel({None: [[("a", 1, 0), ("a", 2, 1)], [("a", 4, 3), ("b", 5, 0)]]})
    nl = _netlink(kernel)
    with pytest.raises(NftDumpTorn, match=r"chain a was torn by a transaction \(rule 4 follows rule 3 in the "
                                          r"kernel, rule 2 in the dump\)"):
        _handles(nl, ORDER)
    assert kernel.pending == []  # read to its end: the socket's next request is not refused busy


def test_a_chain_whose_first_rules_were_skipped_tears_the_dump():
    kernel = ScriptedKernel({None: [[("a", 1, 0)], [("b", 5, 4)]]})
    with pytest.raises(NftDumpTorn, match=r"rule 5 follows rule 4 in the kernel, nothing in the dump"):
        _handles(_netlink(kernel), ORDER)


def test_a_dump_resumed_at_a_chains_start_is_vouched_for_by_dumping_the_chain_before_again():
    # The second message begins chain c: chain a's tail, or all of b, may have been skipped.
    whole = {None: [[("a", 1, 0), ("a", 2, 1)], [("c", 5, 0)]], "a": [[("a", 1, 0), ("a", 2, 1)]], "b": [[]]}
    kernel = ScriptedKernel(whole)
    assert _handles(_netlink(kernel), ORDER) == [("a", 1), ("a", 2), ("c", 5)]
    assert kernel.asked == [None, "a", "b"]

    skipped_tail = dict(whole, a=[[("a", 1, 0), ("a", 2, 1), ("a", 3, 2)]])
    with pytest.raises(NftDumpTorn, match=r"chain a was torn by a transaction \(resumed at chain c, "
                                          r"rules of chain a unseen\)"):
        _handles(_netlink(ScriptedKernel(skipped_tail)), ORDER)

    skipped_chain = dict(whole, b=[[("b", 4, 0)]])
    with pytest.raises(NftDumpTorn, match=r"rules of chain b unseen"):
        _handles(_netlink(ScriptedKernel(skipped_chain)), ORDER)


def test_a_dump_whose_last_message_holds_no_rule_is_vouched_for_to_the_tables_end():
    # The last message holds the end alone: chain b's tail, or chain c, may have been skipped.
    whole = {None: [[("a", 1, 0), ("b", 4, 0)]], "b": [[("b", 4, 0)]], "c": [[]]}
    kernel = ScriptedKernel(whole, done_alone=(None,))
    assert _handles(_netlink(kernel), ORDER) == [("a", 1), ("b", 4)]
    assert kernel.asked == [None, "b", "c"]
    with pytest.raises(NftDumpTorn, match=r"resumed at its end, rules of chain c unseen"):
        _handles(_netlink(ScriptedKernel(dict(whole, c=[[("c", 6, 0)]]), done_alone=(None,))), ORDER)


def test_a_chains_met_out_of_the_kernels_order_tear_the_dump():
    kernel = ScriptedKernel({None: [[("b", 4, 0)], [("a", 1, 0)]]})
    with pytest.raises(NftDumpTorn, match=r"met chain b, then a, not in the order the kernel lists them"):
        _handles(_netlink(kernel), ORDER)


def test_one_chains_dump_ending_in_a_message_of_its_own_is_dumped_again_and_compared():
    nl = _netlink(ScriptedKernel({"a": [[("a", 1, 0)], [("a", 2, 1)]]}, done_alone=("a",)))
    [(_, rules, _)] = nl.each_chain_rules(NFPROTO_IPV4, "t", ["a"], lambda buf, c, handle, e, u: handle)
    assert rules == [1, 2] and nl.sock.asked == ["a", "a"]


def test_a_boundary_after_a_message_with_room_left_is_not_vouched_for():
    # The kernel cuts a message only for want of room: after one far from full, no rule of
    # kube-proxy's size can be missing, and the per-chain reads (tens of thousands of
    # small chains, each ending in a message of its own) are not made twice.
    nl = _netlink(ScriptedKernel({"a": [[("a", 1, 0), ("a", 2, 1)]]}, done_alone=("a",), roomy=True))
    [(_, rules, _)] = nl.each_chain_rules(NFPROTO_IPV4, "t", ["a"], lambda buf, c, handle, e, u: handle)
    assert rules == [1, 2] and nl.sock.asked == ["a"]
    kernel = ScriptedKernel({None: [[("a", 1, 0), ("a", 2, 1)], [("c", 5, 0)]]}, roomy=True)
    assert _handles(_netlink(kernel), ORDER) == [("a", 1), ("a", 2), ("c", 5)] and kernel.asked == [None]


def test_the_order_is_asked_of_the_kernel_when_the_caller_has_none():
    from exporter.readers import nftables_netlink

    kernel = ScriptedKernel({None: [[("a", 1, 0)], [("c", 5, 0)]], "a": [[("a", 1, 0)]], "b": [[]]})
    nl = _netlink(kernel)
    asked = []

    def chains(family, table):
        asked.append(table)
        return [nftables_netlink.Chain(name, i, False) for i, name in enumerate(ORDER)]

    nl.chains = chains
    assert _handles(nl) == [("a", 1), ("c", 5)] and asked == ["t"]


def test_replies_say_when_a_dumps_end_came_apart_after_a_message_cut_for_room():
    # iptables-nft's digested chains (KUBE-SERVICES: thousands of rules) are dumped through
    # _replies; its caller vouches for the end only when a rule after the last could be missing.
    from exporter.readers.nftables_netlink import NFT_MSG_GETRULE, NLM_F_DUMP

    attrs = _nla(NFTA_RULE_TABLE, b"t\0") + _nla(NFTA_RULE_CHAIN, b"a\0")
    for roomy, done_alone, apart in [(False, ("a",), True), (True, ("a",), False), (False, (), False)]:
        nl = _netlink(ScriptedKernel({"a": [[("a", 1, 0)], [("a", 2, 1)]]}, done_alone=done_alone, roomy=roomy))
        assert len(list(nl._replies(NFT_MSG_GETRULE, NFPROTO_IPV4, NLM_F_DUMP, attrs, "x"))) == 2
        assert nl.ended_apart is apart, (roomy, done_alone)


@pytest.mark.parametrize("size, cut", [
    (1200, False), (2200, False),  # a KUBE-SEP's, a KUBE-SVC of five endpoints' whole dump
    (3076, True),  # the first message of a fresh socket (no receive yet: a page's room), cut on 6.18
    (26792, False),  # the last message of KUBE-SERVICES at 1,000 Services on 6.18: its end
    (31688, True), (32424, True),  # full messages of a table's dump on 6.18 (32 KB's room)
])
def test_a_message_could_be_cut_for_room_only_near_a_room_the_kernel_gives(size, cut):
    from exporter.readers.nftables_netlink import could_be_cut

    assert could_be_cut(size) is cut
