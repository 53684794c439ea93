"""The compact shapes the desired side keeps (issue 13, memory): same answers, fewer bytes.

At 10,000 Services / 50,000 endpoints what is kept per virtual server, real server
and endpoint decides the exporter's footprint: these tests pin the shapes (shared,
flat) and what they must still answer exactly as the plain dicts and tuples did.
"""

from __future__ import annotations

import pytest

from exporter.dataplane import RealServer, RealServers, VirtualServer, VirtualServerKey
from exporter.kube import desired, diff
from tests.kube_builders import NODE, endpoint, endpoint_slice, service


def test_real_servers_read_as_the_mapping_a_live_table_holds():
    rs = RealServers([("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.1", 80)])  # a duplicate: kept once
    plain = {("10.0.0.1", 80): RealServer("10.0.0.1", 80), ("10.0.0.2", 80): RealServer("10.0.0.2", 80)}
    assert len(rs) == 2 and list(rs) == list(plain) and list(rs.keys()) == list(plain)
    assert list(rs.values()) == list(plain.values()) and list(rs.items()) == list(plain.items())
    assert rs == plain and plain == rs and not rs != plain
    assert rs[("10.0.0.2", 80)] == RealServer("10.0.0.2", 80, 1, "Masq")
    assert ("10.0.0.2", 80) in rs and ("10.0.0.2", 81) not in rs and "10.0.0.2" not in rs
    assert rs.get(("10.0.0.3", 80)) is None
    with pytest.raises(KeyError):
        rs[("10.0.0.3", 80)]
    assert dict(rs) == plain and {**rs} == plain
    assert rs != {("10.0.0.1", 80): RealServer("10.0.0.1", 80)}
    assert rs != {**plain, ("10.0.0.2", 80): RealServer("10.0.0.2", 80, 0)}  # another weight
    assert RealServers([("10.0.0.2", 80), ("10.0.0.1", 80)]) == rs  # order is not identity
    assert RealServers([("10.0.0.1", 80)], forward="Tunnel") != RealServers([("10.0.0.1", 80)])
    assert "RealServer(address='10.0.0.1', port=80, weight=1, forward='Masq')" in repr(rs)
    assert not RealServers() and RealServers() == {}


def test_real_servers_lookups_in_a_large_one_are_by_hash():
    pairs = [(f"10.1.{i // 256}.{i % 256}", 8080) for i in range(2000)]
    rs = RealServers(pairs)
    assert all(rs[p].address == p[0] for p in pairs[::97]) and ("10.1.0.0", 8081) not in rs
    assert rs._index is not None and len(rs._index) == 2000  # indexed once, when first asked


def test_virtual_servers_of_one_service_share_one_real_servers():
    # ClusterIP, externalIP and NodePort frontends of the same endpoints: one container,
    # not a dict copy each (1,000 NodePort Services at 10k: thousands of dicts).
    svc = service(type="NodePort", ports=(("p80", "TCP", 80, 30080),), externalIPs=["192.0.2.1"])
    es = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint("10.180.0.2", "node-b"))
    out = desired.virtual_servers_for_service(svc, [es], NODE)
    assert len(out) == 3
    assert all(type(vs.real_servers) is RealServers for vs in out)
    assert out[1].real_servers is out[0].real_servers and out[2].real_servers is out[0].real_servers
    assert out[0].real_servers == {("10.180.0.1", 80): RealServer("10.180.0.1", 80),
                                   ("10.180.0.2", 80): RealServer("10.180.0.2", 80)}


def test_diff_of_compact_desired_against_a_live_dict_finds_every_kind():
    key = VirtualServerKey("TCP", "10.96.0.1", 80)
    pairs = [(f"10.2.0.{i}", 8080) for i in range(1, 21)]  # past the small-scan size
    want = {key: VirtualServer(key, real_servers=RealServers(pairs), service="ns/a")}
    live_rs = {p: RealServer(*p) for p in pairs[1:]}  # the first is missing
    live_rs[pairs[2]] = RealServer(*pairs[2], 0)  # zero weight
    live_rs[("10.2.9.9", 8080)] = RealServer("10.2.9.9", 8080, 1)  # stale
    live_rs[("10.2.9.8", 8080)] = RealServer("10.2.9.8", 8080, 0)  # draining
    live = {key: VirtualServer(key, real_servers=live_rs)}
    for found in (diff.diff_tables(want, live), diff.TableDiffer().diff(want, live)):
        assert [i.real for i in found.missing_real_servers] == [pairs[0]]
        assert found.missing_real_servers[0].weight == 1
        assert [i.real for i in found.zero_weight_real_servers] == [pairs[2]]
        assert [i.real for i in found.stale_real_servers] == [("10.2.9.9", 8080)]
        assert [i.real for i in found.draining_real_servers] == [("10.2.9.8", 8080)]
    same = {key: VirtualServer(key, real_servers={p: RealServer(*p) for p in pairs})}
    assert not diff.diff_tables(want, same).has_drift


def test_a_parsed_slice_keeps_its_endpoints_flat_and_reads_them_as_before():
    from exporter.kube.objects import Endpoint, EndpointList, EndpointState

    es = endpoint_slice("svc1", endpoint("10.180.0.1", "node-a"), endpoint(["10.180.0.2", "10.180.0.3"], "node-b"),
                        endpoint("10.180.0.4", "node-a", ready=False, serving=True, terminating=True))
    flat = tuple.__iter__(es.endpoints)
    assert type(es.endpoints) is EndpointList
    # One state, then that endpoint's addresses; no tuple per endpoint.
    assert [type(x).__name__ for x in flat] == ["EndpointState", "str", "EndpointState", "str", "str",
                                               "EndpointState", "str"]
    eps = list(es.endpoints)
    assert len(es.endpoints) == 3 and all(type(ep) is Endpoint for ep in eps)
    assert [ep.addresses for ep in eps] == [("10.180.0.1",), ("10.180.0.2", "10.180.0.3"), ("10.180.0.4",)]
    assert [ep.node_name for ep in eps] == ["node-a", "node-b", "node-a"]
    assert (eps[2].ready, eps[2].serving, eps[2].terminating) == (False, True, True)
    assert es.endpoints[1] == eps[1] and es.endpoints[-1] == eps[2] and es.endpoints[1:] == tuple(eps[1:])
    assert eps[0] in es.endpoints and es.endpoints == tuple(eps) and es.endpoints == EndpointList.of(eps)
    assert EndpointList.of(()) == () and not EndpointList.of(()) and len(EndpointList.of(())) == 0
    assert isinstance(eps[1].state, EndpointState)


def test_equal_port_lists_are_one_tuple():
    from exporter.dataplane import Interner
    from exporter.kube.objects import parse_endpoint_slice, parse_service

    intern = Interner()
    raw = {"metadata": {"name": "x", "namespace": "n"},
           "spec": {"clusterIP": "10.0.0.1", "ports": [{"name": "http", "port": 80}]}}
    one, two = parse_service(raw, intern), parse_service({**raw, "metadata": {"name": "y", "namespace": "n"}}, intern)
    assert one.ports is two.ports and one.ports == (("http", "TCP", 80, None),)
    raw = {"metadata": {"name": "x-1", "namespace": "n"}, "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": ["10.0.0.1"]}]}
    one = parse_endpoint_slice(raw, intern)
    two = parse_endpoint_slice({**raw, "metadata": {"name": "x-2", "namespace": "n"}}, intern)
    assert one.ports is two.ports


def _state_of(n: int, model):
    from exporter.kube import objects
    from exporter.kube.store import ClusterState
    from tests.apiserver import endpoint_slice as raw_slice, service as raw_service

    def slice_of(i: int, rv: str, address: str | None = None):
        raw = raw_slice("ns", f"s{i}-x", f"s{i}", [address or f"10.244.0.{i + 1}"], ports=(("http", "TCP", 8080),))
        raw["metadata"]["resourceVersion"] = rv
        return objects.parse_endpoint_slice(raw)

    st = ClusterState("node-a", "kube-proxy", ("192.0.2.1",), model=model)
    # Keyed as the reflectors key them: by each object's own key.
    services = [objects.parse_service(raw_service("ns", f"s{i}", f"10.96.0.{i + 1}")) for i in range(n)]
    st.replace("services", {s.key: s for s in services})
    st.replace("endpointslices", {es.key: es for es in (slice_of(i, "1") for i in range(n))})
    st.replace("nodes", {"node-a": objects.Node("node-a", "zone-1")})
    return st, slice_of


def test_a_relist_recomputes_a_service_only_when_what_is_kept_changed():
    # No resourceVersion is kept (a string per object): a relist whose objects moved on in
    # resourceVersion but not in what the model reads recomputes nothing.
    from tests.kube_helpers import CountingModel

    model = CountingModel()
    st, slice_of = _state_of(10, model)
    assert model.total() == 10
    st.replace("endpointslices", {f"ns/s{i}-x": slice_of(i, "2") for i in range(10)})
    assert model.total() == 10
    relisted = {f"ns/s{i}-x": slice_of(i, "3") for i in range(10)}
    relisted["ns/s4-x"] = slice_of(4, "3", "10.244.9.9")
    st.replace("endpointslices", relisted)
    assert model.calls["ns/s4"] == 2 and model.total() == 11
    vs = st.snapshot().table[VirtualServerKey("TCP", "10.96.0.5", 80)]
    assert set(vs.real_servers) == {("10.244.9.9", 8080)}


def test_one_key_string_per_service_in_the_store_and_its_table():
    from tests.kube_helpers import CountingModel

    st, _ = _state_of(5, CountingModel())
    (service_key,) = [k for k in st._services if k == "ns/s2"]
    vs = st.snapshot().table[VirtualServerKey("TCP", "10.96.0.3", 80)]
    assert vs.service is service_key
    assert next(k for k in st._vs_keys if k == "ns/s2") is service_key
    assert next(k for k in st._slices_by_service if k == "ns/s2") is service_key
    assert st._slices["ns/s2-x"].service_key is service_key


def test_the_rules_view_of_a_table_without_rule_flags_is_that_table_not_a_copy():
    from types import MappingProxyType, SimpleNamespace

    from exporter.kube.desired_rules import REJECT, RulesViews

    plain = VirtualServer(VirtualServerKey("TCP", "10.96.0.1", 80), "random",
                          real_servers=RealServers([("10.1.0.1", 80)]))
    table = MappingProxyType({plain.key: plain})
    views = RulesViews()
    view = views.of(SimpleNamespace(table=table, generation=1))
    assert view.table is table and view.rejected == {} and view.firewalled == frozenset()
    refused = VirtualServer(VirtualServerKey("TCP", "10.96.0.2", 80), "random", flags=(REJECT,))
    flagged = MappingProxyType({plain.key: plain, refused.key: refused})
    view = views.of(SimpleNamespace(table=flagged, generation=2))
    assert view.table is not flagged and view.rejected == {refused.key: REJECT}
    assert view.table[refused.key].flags == () and view.table[plain.key] is plain


def test_names_are_read_from_the_one_key_string_each_object_keeps():
    svc = service("web", "shop")
    es = endpoint_slice("web", endpoint("10.180.0.1"), namespace="shop", name="web-abcde")
    assert (svc.namespace, svc.name, svc.key) == ("shop", "web", "shop/web")
    assert (es.namespace, es.name, es.key, es.service_name) == ("shop", "web-abcde", "shop/web-abcde", "web")
    assert es.service_key is svc.key
    assert "name" not in svc._fields and "name" not in es._fields and "service_name" not in es._fields


# --- The live side: the IPVS and nftables readers keep the same compact shape -------------

_LIVE_TEXT = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600001:0050 rr
  -> 0AF40105:1F90      Masq    1      0          0
  -> 0AF40106:1F90      Masq    1      3          1
TCP  0A600002:01BB rr
  -> 0AF40107:1F90      Masq    1      0          0
  -> 0AF40108:1F90      Masq    0      0          2
  -> 0AF40109:1F90      Route   1      0          0
"""


def test_a_live_ipvs_table_keeps_each_virtual_servers_real_servers_flat():
    """A parsed live table's real servers are one RealServers per virtual server (not a dict
    of RealServer tuples: 12 MiB at 68,000 real servers), weights and forwarding methods kept
    once when all agree and per real server when not, reading as the dict did."""
    from exporter.readers.ipvs import parse_ip_vs

    table = parse_ip_vs(_LIVE_TEXT, hz=250)
    same = table[VirtualServerKey("TCP", "10.96.0.1", 80)].real_servers
    mixed = table[VirtualServerKey("TCP", "10.96.0.2", 443)].real_servers
    assert type(same) is RealServers and type(mixed) is RealServers
    assert same.uniform_weight() == 1 and mixed.uniform_weight() is None
    assert same == {("10.244.1.5", 8080): RealServer("10.244.1.5", 8080, 1, "Masq"),
                    ("10.244.1.6", 8080): RealServer("10.244.1.6", 8080, 1, "Masq")}
    assert dict(mixed.items()) == {("10.244.1.7", 8080): RealServer("10.244.1.7", 8080, 1, "Masq"),
                                   ("10.244.1.8", 8080): RealServer("10.244.1.8", 8080, 0, "Masq"),
                                   ("10.244.1.9", 8080): RealServer("10.244.1.9", 8080, 1, "Route")}
    assert mixed[("10.244.1.8", 8080)].weight == 0 and mixed.get(("10.244.1.9", 8080)).forward == "Route"
    assert [rs.weight for rs in mixed.values()] == [1, 0, 1]
    assert mixed != RealServers(mixed) and RealServers(same) == same  # weights and methods count
    assert table.connections(VirtualServerKey("TCP", "10.96.0.1", 80))[("10.244.1.6", 8080)] == (3, 1)


def test_a_live_table_of_one_weight_reads_the_same_diff_as_a_dict():
    """The diff of a compact live table finds what it found in a dict-shaped one: a weight-0
    real server of a mixed RealServers, a stale one, a missing one."""
    from exporter.readers.ipvs import parse_ip_vs

    live = parse_ip_vs(_LIVE_TEXT, hz=250)
    assert all(type(vs.real_servers) is RealServers for vs in live.values())
    plain = live.copy()  # its counters too
    for key, vs in live.items():
        plain[key] = vs._replace(real_servers=dict(vs.real_servers.items()))
    key = VirtualServerKey("TCP", "10.96.0.2", 443)
    want = {key: VirtualServer(key, "rr", None, RealServers([("10.244.1.7", 8080), ("10.244.1.8", 8080),
                                                               ("10.244.1.10", 8080)]))}
    got, expected = diff.diff_tables(want, live), diff.diff_tables(want, plain)
    assert got == expected
    assert [i.real for i in got.zero_weight_real_servers] == [("10.244.1.8", 8080)]
    assert [i.real for i in got.missing_real_servers] == [("10.244.1.10", 8080)]
    assert [i.real for i in got.stale_real_servers if i.vs == key] == [("10.244.1.9", 8080)]


def test_a_live_table_keeps_one_object_per_address_and_per_port():
    """An address printed with other ports (a node's NodePorts, an endpoint of two Service
    ports) is one string in the parsed table, and a port one int (a copy each was 2.8 MiB at
    68,000 real servers)."""
    from exporter.readers.ipvs import parse_ip_vs

    text = _LIVE_TEXT + "TCP  C000020A:7918 rr\n  -> 0AF40105:1F91      Masq    1      0          0\n"
    table = parse_ip_vs(text, hz=250)
    first = list(table[VirtualServerKey("TCP", "10.96.0.1", 80)].real_servers)
    second = list(table[VirtualServerKey("TCP", "10.96.0.2", 443)].real_servers)
    node_port = list(table[VirtualServerKey("TCP", "192.0.2.10", 31000)].real_servers)
    assert first[0][1] == second[0][1] == 8080 and first[0][1] is second[0][1] and first[1][1] is first[0][1]
    assert node_port[0] == ("10.244.1.5", 8081) and node_port[0][0] is first[0][0]
