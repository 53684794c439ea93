"""The whole exporter's memory at 1,000 and 10,000 Services, against the issue's 80 MB, per mode.

A fresh ``python -m exporter`` (the real ``serve``, every default collector on,
``--proxy-mode`` told) lists and watches the API stand-in (tests/apiserver.py)
serving N Services with one EndpointSlice of 5 endpoints each (10,000 Services
are 50,000 endpoints), and reads a live table its drift collector diffs in full:

- IPVS: /proc/net/ip_vs from a fixture procfs (``--path.procfs``), the desired
  table of the same objects written as the kernel's text, as bench_drift does;
- nftables: kube-proxy's rules (tests/nft_rulesets.py) loaded into a network
  namespace of its own; the exporter runs inside it (``nsenter --net``, so /sys
  stays the host's), and so does the API stand-in (the namespace has its own
  loopback), and the bench scrapes from a thread that joined it;
- iptables: kube-proxy's iptables rules (tests/ipt_rulesets.py) restored into a
  namespace as the nftables node's, with iptables-legacy (``iptables``) and
  iptables-nft (``iptables-nft``; replayed from a snapshot of one restore, which at
  10,000 Services takes minutes here: tests/nft_snapshot.py).

Once its drift collector reports success with the table synced and no drift (a
full read of a healthy table), the exporter is scraped a few times more, then
its own /proc/PID/status is read:

- peak RSS (VmHWM): the list, the build and every scrape's read included;
- steady RSS (VmRSS) after those scrapes.

Both are printed against 80 MB (10^6 bytes: stricter than MiB), the issue's limit
for the whole exporter synced at 10,000 Services / 50,000 endpoints with the live
table read, in any mode. The 1,000-Service rows show how the cost grows.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from bench.bench_kube import _populate
from bench.common import Row, main

LIMIT_MB = 80.0
NODE_NAME, NODE_IP = "bench-node", "192.0.2.10"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Objects:
    """Stands in for the API server in ``_populate`` to keep the raw objects."""

    def __init__(self) -> None:
        self.items: dict[str, list[dict]] = {}

    def create(self, resource: str, obj: dict) -> None:
        self.items.setdefault(resource, []).append(obj)


def _desired_ip_vs(items: dict[str, list[dict]]) -> str:
    """What a healthy node's /proc/net/ip_vs shows for these objects (the exporter's own model)."""
    from exporter.kube import desired, objects
    from exporter.readers.ipvs import kernel_hz
    from tests.ipvs_text import format_ip_vs

    services = [objects.parse_service(o) for o in items["services"]]
    slices = [objects.parse_endpoint_slice(o) for o in items["endpointslices"]]
    node = objects.parse_node(items["nodes"][0])
    facts = desired.node_facts(NODE_NAME, node, (NODE_IP,))
    table = desired.desired_table(services, desired.slices_by_service(slices), facts)
    return format_ip_vs(table, kernel_hz())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {field}")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def _value(page: str, pattern: str) -> float | None:
    match = re.search(r"^" + pattern + r" (\S+)$", page, re.M)
    return float(match.group(1)) if match else None


class _Node:
    """Where one mode's exporter runs and what live table it reads; a context manager.

    ``items``: the API objects to serve. ``command``: the prefix that puts the exporter
    in the node (a namespace) and its mode's flags. ``run(fn)``: ``fn()`` from inside
    the node's network (the API stand-in is made there, the scrapes go there).
    """

    mode = ""

    def __enter__(self) -> "_Node":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, fn):
        return fn()

    def command(self, tmp: str) -> list[str]:
        raise NotImplementedError


class _IPVSNode(_Node):
    """IPVS: the desired table of the objects as a fixture /proc/net/ip_vs."""

    mode = "ipvs"
    live_metric = "kubenode_ipvs_virtual_servers"

    def __init__(self, services: int) -> None:
        objects = _Objects()
        _populate(objects, services)
        self.items = objects.items

    def command(self, tmp: str) -> list[str]:
        procfs = os.path.join(tmp, "proc")
        os.makedirs(os.path.join(procfs, "net"))
        with open(os.path.join(procfs, "net", "ip_vs"), "w") as fh:
            fh.write(_desired_ip_vs(self.items))
        return [sys.executable, "-m", "exporter", "serve", "--path.procfs", procfs, "--proxy-mode", "ipvs"]


class _NamespaceNode(_Node):
    """A network namespace of its own holding kube-proxy's rules (``load_rules``), with the
    exporter run inside it in this node's mode (``--proxy-mode``)."""

    live_metric = None  # the drift collector's zero drift says the rules were read whole
    ns = None

    def __enter__(self) -> "_NamespaceNode":
        self.ns.__enter__()
        subprocess.run(["nsenter", f"--net={self.ns.path}", "ip", "link", "set", "lo", "up"], check=True)
        self.load_rules()
        return self

    def load_rules(self) -> None:
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        self.ns.__exit__(*exc)

    def run(self, fn):
        return self.ns.run(fn)

    def command(self, tmp: str) -> list[str]:
        return ["nsenter", f"--net={self.ns.path}", sys.executable, "-m", "exporter", "serve",
                "--proxy-mode", self.mode]


def _own_namespace(make):
    try:
        return make()
    except RuntimeError as err:  # a missing tool, named
        raise SystemExit(str(err)) from None


class _NftablesNode(_NamespaceNode):
    """nftables: kube-proxy's rules of the same Services in a namespace the exporter runs in."""

    mode = "nftables"

    def __init__(self, services: int) -> None:
        from tests.nft_rulesets import NftNS, bench_services

        self.ports = bench_services(services, 5)
        self.items = _nft_objects(self.ports)
        self.ns = _own_namespace(NftNS)

    def load_rules(self) -> None:
        from tests.nft_rulesets import ruleset

        self.ns.nft(ruleset(self.ports))


class _IptablesNode(_NamespaceNode):
    """iptables: kube-proxy's iptables rules of the same Services, restored into a namespace the
    exporter runs in (its drift collector finds the backend that holds them, as on a node).

    ``backend``: legacy by default (a restore of 10,000 Services takes seconds); iptables-nft's
    restore of 10,000 takes minutes on this machine, so its tables are replayed from a snapshot
    of one such restore kept in .cache/ (tests/nft_snapshot.py: the same kernel objects).
    """

    mode = "iptables"

    def __init__(self, services: int, backend: str = "legacy") -> None:
        from tests.ipt_rulesets import IptNS, bench_services

        self.backend = backend
        self.ports = bench_services(services, 5)
        self.items = _nft_objects(self.ports)  # the same Services and slices as the nftables node's
        self.ns = _own_namespace(IptNS)

    def load_rules(self) -> None:
        if self.backend == "nft":
            from tests.ipt_rulesets import ruleset
            from tests.nft_snapshot import cached_table

            cached_table(self.ns, ruleset(self.ports, 4))
        else:
            self.ns.load(self.ports, backend=self.backend)


def _iptables_nft_node(services: int) -> _Node:
    return _IptablesNode(services, backend="nft")


NODES = {"ipvs": _IPVSNode, "nftables": _NftablesNode, "iptables": _IptablesNode,
         "iptables-nft": _iptables_nft_node}


class LogLines:
    """The exporter's stderr read on a thread of its own (a pipe nobody drains stops the exporter
    once it fills): every line kept with the monotonic time it arrived."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._drain, args=(stream,), name="exporter-stderr", daemon=True)
        self._thread.start()

    def _drain(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def tail(self, chars: int = 300) -> str:
        return "\n".join(line for _, line in self.lines[-20:])[-chars:]


@contextlib.contextmanager
def synced_exporter(node: _Node, tmp: str, timeout: float = 300.0):
    """The real ``serve`` started in ``node`` against the API stand-in holding ``node.items``, once its
    drift collector reports success with the table synced. Yields ``(server, proc, url, logs,
    synced_after)``; the exporter and the stand-in are stopped on exit."""
    from tests.apiserver import FakeApiServer

    proc = None
    server = node.run(FakeApiServer).start()  # listening inside the node's network
    try:
        for resource, objs in node.items.items():
            for obj in objs:
                server.create(resource, obj)
        kubeconfig = server.write_kubeconfig(os.path.join(tmp, "kubeconfig"))
        port = node.run(_free_port)
        cmd = node.command(tmp) + ["--kubeconfig", kubeconfig, "--node-name", NODE_NAME, "--node-ip", NODE_IP,
                                   "--web.listen-address", f"127.0.0.1:{port}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        logs = LogLines(proc.stderr)
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + timeout
        start = time.monotonic()
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                time.sleep(0.2)  # the last lines
                raise SystemExit(f"the exporter exited {proc.returncode}: {logs.tail()}")
            try:
                page = node.run(lambda: _scrape(url))
            except OSError:
                page = ""
            if (_value(page, r'kubenode_collector_success\{collector="drift"\}') == 1
                    and _value(page, "kubenode_dataplane_drift_synced") == 1):
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"the exporter did not sync {len(node.items['services'])} Services within "
                             f"{timeout:.0f} s")
        yield server, proc, url, logs, time.monotonic() - start
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()


def measure(services: int, mode: str = "ipvs", scrapes: int = 3, timeout: float = 300.0) -> dict:
    node = NODES[mode](services)
    with node, tempfile.TemporaryDirectory(prefix=f"bench-memory-{os.getpid()}-") as tmp, \
            synced_exporter(node, tmp, timeout) as (_server, proc, url, _logs, synced_after):
        pid = proc.pid  # nsenter execs the exporter: the same process
        for _ in range(scrapes):
            page = node.run(lambda: _scrape(url))
        desired_vs = _value(page, "kubenode_dataplane_desired_virtual_servers")
        live_vs = _value(page, node.live_metric) if node.live_metric else desired_vs
        drift = sum(float(v) for v in re.findall(r'^kubenode_dataplane_drift\{kind="[a-z_]+"\} (\S+)$', page,
                                                  re.M))
        if not desired_vs or desired_vs != live_vs or drift:
            raise SystemExit(f"the exporter's {mode} tables differ (desired {desired_vs}, live {live_vs}, "
                             f"drift {drift}): the bench would not measure a full read")
        return {"services": services, "virtual_servers": desired_vs, "synced_after": synced_after,
                "peak": _status_kib(pid, "VmHWM") * 1024, "steady": _status_kib(pid, "VmRSS") * 1024}


def _nft_objects(services) -> dict[str, list[dict]]:
    """The API objects of ``tests.nft_rulesets`` Services (one port, one slice each)."""
    from tests.apiserver import endpoint_slice, node, service

    items: dict[str, list[dict]] = {"nodes": [node(NODE_NAME, zone="zone-a", addresses=(NODE_IP,))],
                                    "services": [], "endpointslices": []}
    for svc in services:
        extra = {"type": "NodePort"} if svc.node_port else {}
        raw = service(svc.namespace, svc.name, svc.cluster_ip, ports=((svc.port_name, "TCP", svc.port),), **extra)
        if svc.node_port:
            raw["spec"]["ports"][0]["nodePort"] = svc.node_port
        items["services"].append(raw)
        items["endpointslices"].append(endpoint_slice(
            svc.namespace, f"{svc.name}-abcde", svc.name, [a for a, _ in svc.endpoints],
            ports=((svc.port_name, "TCP", svc.endpoints[0][1]),), node_name="node-1"))
    return items


def run(args) -> list[Row]:
    rows = []
    sizes = (300, 1000) if getattr(args, "quick", False) else (1000, 10_000)
    for mode in NODES:
        for n in sizes:
            m = measure(n, mode)
            label = f"{mode}, {n:,} svc / {n * 5:,} endpoints, {m['virtual_servers']:,.0f} VS"
            rows += [
                Row(f"{label}: whole exporter, peak RSS", m["peak"] / 1e6, LIMIT_MB, "limit", unit="MB", limit=1.0),
                Row(f"{label}: whole exporter, steady RSS", m["steady"] / 1e6, LIMIT_MB, "limit", unit="MB",
                    limit=1.0),
                Row(f"{label}: synced and drift served after", m["synced_after"]),
            ]
    return rows


if __name__ == "__main__":
    main(run)
