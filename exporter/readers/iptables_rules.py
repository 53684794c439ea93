"""kube-proxy's iptables rules as plain data, whatever source they were read from.

Three sources fill these shapes, and one resolver says what they mean for
Services (frontends and their endpoints, reject/drop verdicts):

- the text of ``iptables-save`` / ``ip6tables-save`` (``diff --rules``, and the
  tests' reference for the live sources);
- the kernel's x_tables blobs for the iptables-legacy backend (``iptables_blob``:
  ``ipt_entry`` records, decoded in-process);
- nf_tables over netlink for the iptables-nft backend (the rules live in tables
  ``ip nat`` / ``ip6 nat`` / ``ip filter`` ..., with xtables "compat" match and
  target expressions beside native payload/cmp ones).

Every source parses options, never positions (``iptables-save`` reorders matches),
and names what it did not understand in ``IptablesRule.unknown`` rather than
dropping it: a rule with an unknown match in a KUBE- chain is not one a reader may
claim to understand.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple


class IptablesRule(NamedTuple):
    """One rule of one chain, as kube-proxy writes them (pkg/proxy/iptables/proxier.go).

    Addresses are text as ``ipaddress`` prints them: a network with its prefix
    (``10.0.0.1/32``); ``to_destination`` is ``addr:port`` or ``[v6addr]:port``.
    """

    target: str  # a chain name, or DNAT, REJECT, DROP, ACCEPT, RETURN, MARK, MASQUERADE, ...
    goto: bool = False  # -g rather than -j
    source: str | None = None  # -s
    source_negated: bool = False
    destination: str | None = None  # -d
    destination_negated: bool = False
    protocol: str | None = None  # -p: "tcp", "udp", "sctp"
    dport: int | None = None  # -m tcp/udp/sctp --dport
    src_type: str | None = None  # -m addrtype --src-type (LOCAL, ...)
    src_type_negated: bool = False
    dst_type: str | None = None  # -m addrtype --dst-type
    dst_type_negated: bool = False
    probability: float | None = None  # -m statistic --mode random --probability
    recent_name: str | None = None  # -m recent --name (session affinity)
    recent_mode: str | None = None  # "set" or "rcheck"
    recent_seconds: int | None = None  # --seconds (the affinity timeout)
    comment: str | None = None  # -m comment (kube-proxy drops them past 1,000 endpoints)
    to_destination: str | None = None  # -j DNAT --to-destination
    unknown: tuple[str, ...] = ()  # matches/options not understood, named ("-m foo", "-i eth0")
    set_xmark: str | None = None  # -j MARK, as the kernel applies it: "value/mask" (--or-mark 0x4000 is 0x4000/0x4000)
    reject_with: str | None = None  # -j REJECT --reject-with (icmp-port-unreachable, ...)


# chain name -> its rules in order. Built-in chains are present too (with their rules). A source
# may give a Mapping that decodes a chain when asked for (iptables_blob.LazyChains, with lengths()).
Chains = dict[str, tuple[IptablesRule, ...]]


def chain_lengths(chains) -> Iterable[tuple[str, int]]:
    """(chain, number of rules) of every chain, decoding none where the source can tell."""
    lengths = getattr(chains, "lengths", None)
    if lengths is not None:
        return lengths()
    return ((name, len(rules)) for name, rules in chains.items())


class IptablesRuleset(NamedTuple):
    """The rules of one address family: table name ("nat", "filter") -> chains."""

    family: int  # 4 or 6
    tables: dict[str, Chains]
