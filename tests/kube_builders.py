"""Small builders of API objects (as dicts, through the real parsers) for model and diff tests."""

from __future__ import annotations

from exporter.dataplane import RealServer, VirtualServer, VirtualServerKey
from exporter.kube import desired
from exporter.kube.objects import parse_endpoint_slice, parse_service

NODE = desired.NodeFacts(name="node-a", zone="zone-a", addresses=("100.101.102.103",))


def service(name: str = "svc1", namespace: str = "ns1", *, cluster_ip: str | list[str] = "10.20.30.41",
            ports=(("p80", "TCP", 80, None),), type: str = "ClusterIP", labels=None, annotations=None,
            status=None, **spec) -> object:
    ips = [cluster_ip] if isinstance(cluster_ip, str) else list(cluster_ip)
    body = {"type": type, "clusterIP": ips[0] if ips else None, "clusterIPs": ips,
            "ports": [{"name": n, "protocol": p, "port": port, **({"nodePort": np} if np else {})}
                      for n, p, port, np in ports]}
    body.update(spec)
    return parse_service({"kind": "Service",
                          "metadata": {"name": name, "namespace": namespace, "labels": labels or {},
                                       "annotations": annotations or {}},
                          "spec": body, "status": status or {}})


def endpoint(ip: str | list[str], node: str | None = None, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None, zones=None, nodes=None) -> dict:
    ep: dict = {"addresses": [ip] if isinstance(ip, str) else list(ip), "conditions": {}}
    for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            ep["conditions"][key] = value
    if node:
        ep["nodeName"] = node
    hints = {}
    if zones is not None:
        hints["forZones"] = [{"name": z} for z in zones]
    if nodes is not None:
        hints["forNodes"] = [{"name": n} for n in nodes]
    if hints:
        ep["hints"] = hints
    return ep


def endpoint_slice(service_name: str = "svc1", *endpoints: dict, namespace: str = "ns1", name: str | None = None,
                   ports=(("p80", "TCP", 80),), address_type: str = "IPv4") -> object:
    return parse_endpoint_slice({
        "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-{address_type.lower()}", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
        "endpoints": list(endpoints),
    })


def table_of(vss) -> dict:
    """{str(key): sorted real server 'ip:port' list} for compact assertions."""
    out = {}
    for vs in vss:
        out[str(vs.key)] = sorted(f"{a}:{p}" if ":" not in a else f"[{a}]:{p}" for a, p in vs.real_servers)
    return out


class _RealServers(dict):
    """Real servers by key, remembering the counters a test gave them (for ``live``)."""

    counters: dict


def vs(proto: str, address: str, port: int, reals=(), *, weight: int = 1, scheduler: str = "rr",
       timeout: int | None = None, service: str | None = "ns1/svc1", conns=(0, 0)) -> VirtualServer:
    """A virtual server; each real server (ip, port[, weight[, active, inactive]])."""
    real_servers = _RealServers()
    real_servers.counters = {}
    for r in reals:
        ip, rport, *rest = r
        w = rest[0] if rest else weight
        real_servers[(ip, rport)] = RealServer(ip, rport, w, "Masq")
        real_servers.counters[(ip, rport)] = tuple(rest[1:3]) if len(rest) >= 3 else conns
    return VirtualServer(VirtualServerKey(proto, address, port), scheduler, timeout, real_servers, service)


def live(*vss: VirtualServer):
    """A live table (``IPVSTable``) of these virtual servers, with the counters ``vs`` was given."""
    from exporter.readers.ipvs import IPVSTable

    counters = {(v.key, rkey): c for v in vss
                for rkey, c in getattr(v.real_servers, "counters", {}).items()}
    return IPVSTable.of({v.key: v for v in vss}, counters)
