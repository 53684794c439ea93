"""Offline tools: ``desired`` and ``diff`` (the command an on-call engineer runs).

    kubenode-exporter desired --objects FILE [--node-name N] [--node-ip IP ...] [--proxy P] [--output json|text]
    kubenode-exporter diff    --objects FILE [--ipvs FILE] [--node-name N] [--node-ip IP ...] [--proxy P] [--output json|text]

They read files and touch nothing live, except ``diff`` without ``--ipvs``
(reads this host's /proc/net/ip_vs) and, with no ``--objects`` but a
kubeconfig, a list of the live cluster (``_cluster_objects``).

Exit status: 0 fine (``diff``: no drift), 1 drift found (any list but
``draining_real_servers`` non-empty), 2 bad input: one line on stderr, never a
traceback. Malformed objects inside ``--objects`` are reported on stderr and
skipped; they are not bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any, NoReturn

from exporter.config import PROXIES
from exporter.dataplane import Table, sorted_real_servers, sorted_virtual_servers
from exporter.kube import desired as model
from exporter.kube.diff import KINDS, Diff, diff_tables
from exporter.kube.objects import ObjectSet, canonical_ip, MalformedObject, parse_objects
from exporter.yamlload import YAMLInputError, decode_utf8, load_all, paused_gc

PROG = "kubenode-exporter"


class BadInput(Exception):
    """Input the command cannot use; the message is the one line shown."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every other bad input (argparse would print usage first).
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _parser(command: str) -> argparse.ArgumentParser:
    what = {"desired": "print the IPVS table the proxy should have programmed on this node",
            "diff": "compare that table with an IPVS table and list each difference by kind"}[command]
    epilog = None
    if command == "diff":
        epilog = ("kinds: missing/stale virtual servers; missing real servers; stale real servers (not desired, "
                  "weight > 0); zero-weight real servers (desired, weight 0); draining real servers (not "
                  "desired, weight 0: graceful termination); mismatched virtual servers (scheduler or "
                  "persistence differs). No grace period here. Exit status: 0 no drift, 1 drift (any kind "
                  "but draining), 2 bad input.")
    parser = _Parser(prog=f"{PROG} {command}", description=what + ".", epilog=epilog)
    parser.add_argument("--objects", metavar="FILE",
                        help="YAML or JSON as `kubectl get services,endpointslices,nodes -A -o yaml` prints it "
                             "(a List; Nodes optional). Without it, the live cluster is listed when a kubeconfig "
                             "is available (--kubeconfig, $KUBECONFIG, or in-cluster)")
    if command == "diff":
        parser.add_argument("--ipvs", metavar="FILE",
                            help="the text of /proc/net/ip_vs; default: this host's live table")
        parser.add_argument("--path.procfs", dest="procfs", metavar="PATH", default="/proc",
                            help="procfs root for the live table (default /proc)")
    parser.add_argument("--node-name", metavar="NAME",
                        help="this node's name, for Local traffic policies and topology "
                             "(default $NODE_NAME, then the host name)")
    parser.add_argument("--node-ip", metavar="IP", action="append", default=[],
                        help="an address NodePort virtual servers are expected on (repeatable). "
                             "Default: the InternalIP/ExternalIP addresses of the Node named --node-name "
                             "in --objects (kube-router: its primary IP only, as it binds NodePorts by default)")
    parser.add_argument("--proxy", choices=PROXIES, default="kube-proxy",
                        help="whose rules to expect; models the newest release with default flags "
                             "(default kube-proxy)")
    parser.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig for listing the live cluster")
    parser.add_argument("--output", choices=("json", "text"), default="text",
                        help="json (the contract's shape) or a readable table (default text)")
    return parser


# --- input --------------------------------------------------------------------


def load_documents(path: str) -> list[Any]:
    """The documents of a YAML or JSON file. BadInput when unreadable, not YAML, or refused."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise BadInput(f"cannot read {path}: {err.strerror or err}") from None
    try:
        text = decode_utf8(raw)
        del raw  # the text alone from here: a dump can be tens of megabytes
        if text.lstrip().startswith(("{", "[")):
            try:
                return [json.loads(text)]
            except ValueError:
                pass  # YAML flow style also starts with { or [: let YAML decide
            except RecursionError:
                raise YAMLInputError("nested too deep") from None
        return [doc for doc in load_all(text) if doc is not None]
    except YAMLInputError as err:
        raise BadInput(f"{path}: {err}") from None


def load_objects(path: str) -> ObjectSet:
    docs = load_documents(path)
    if not docs:
        raise BadInput(f"{path} is empty: expected a List of Services and EndpointSlices")
    for doc in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
            kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
            raise BadInput(f"{path} is not a List (found {kind or 'an object without items'}); "
                           "use `kubectl get services,endpointslices -A -o yaml`")
    return parse_objects(docs)


def _kubeconfig_available(flag: str | None) -> bool:
    return bool(flag or os.environ.get("KUBECONFIG") or os.environ.get("KUBERNETES_SERVICE_HOST"))


def _cluster_objects(kubeconfig: str | None, node_name: str) -> ObjectSet:
    """Hook: list Services, EndpointSlices and this Node from the live cluster.

    Provided by the Kubernetes client (``exporter.kube.listing.list_objects(kubeconfig,
    node_name) -> ObjectSet``); absent from builds without it.
    """
    try:
        from exporter.kube.listing import list_objects
    except ImportError:
        raise BadInput("--objects FILE is required (listing the live cluster is not available in this build)") \
            from None
    try:
        return list_objects(kubeconfig, node_name)
    except Exception as err:  # noqa: BLE001 - any API/config failure is one line for the user
        raise BadInput(f"cannot list the cluster: {err}") from None


def _objects(args: argparse.Namespace, node_name: str) -> ObjectSet:
    if args.objects:
        return load_objects(args.objects)
    if _kubeconfig_available(args.kubeconfig):
        return _cluster_objects(args.kubeconfig, node_name)
    raise BadInput("--objects FILE is required (or a kubeconfig to list the live cluster)")


def _node_name(flag: str | None) -> str:
    return flag or os.environ.get("NODE_NAME") or socket.gethostname()


def _node_facts(args: argparse.Namespace, objects: ObjectSet, node_name: str) -> model.NodeFacts:
    ips = []
    for ip in args.node_ip:
        try:
            ips.append(canonical_ip(ip.strip(), "--node-ip"))
        except MalformedObject as err:
            raise BadInput(str(err)) from None
    return model.node_facts(node_name, objects.nodes.get(node_name), ips, args.proxy)


def _live_table(args: argparse.Namespace) -> Table:
    try:
        from exporter.readers import ipvs as reader
    except ImportError:
        raise BadInput("the IPVS reader is not available in this build") from None
    if args.ipvs:
        try:
            with open(args.ipvs, encoding="ascii", errors="replace") as fh:
                text = fh.read()
        except OSError as err:
            raise BadInput(f"cannot read {args.ipvs}: {err.strerror or err}") from None
        table = reader.parse_ip_vs(text)
        if not table and not text.startswith("IP Virtual Server"):
            raise BadInput(f"{args.ipvs} is not the text of /proc/net/ip_vs (no virtual server, no header)")
        return table
    from exporter.paths import Paths

    try:
        return reader.read_ip_vs(Paths(procfs=args.procfs))
    except reader.IPVSUnavailable as err:
        raise BadInput(f"cannot read the live IPVS table: {err}") from None
    except OSError as err:
        raise BadInput(f"cannot read the live IPVS table: {err.strerror or err}") from None


# --- output -------------------------------------------------------------------


def table_json(table: Table) -> dict:
    return {"virtual_servers": [
        {"protocol": vs.key.protocol, "address": vs.key.address, "port": vs.key.port, "fwmark": vs.key.fwmark,
         "scheduler": vs.scheduler, "persistent_timeout": vs.persistent_timeout, "service": vs.service,
         "real_servers": [{"address": rs.address, "port": rs.port, "weight": rs.weight}
                          for rs in sorted_real_servers(vs)]}
        for vs in sorted_virtual_servers(table)]}


def _endpoint_text(address: str | None, port: int | None) -> str:
    if address is None:
        return "-"
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def table_text(table: Table) -> str:
    lines = []
    real_total = 0
    for vs in sorted_virtual_servers(table):
        persist = f"persistent {vs.persistent_timeout}" if vs.persistent_timeout is not None else ""
        head = f"{str(vs.key):<48} {vs.scheduler:<4} {persist:<17} {vs.service or ''}"
        lines.append(head.rstrip())
        if not vs.real_servers:
            lines.append("  (no real servers)")
        for rs in sorted_real_servers(vs):
            lines.append(f"  -> {_endpoint_text(rs.address, rs.port):<44} {rs.forward:<7} weight {rs.weight}")
        real_total += len(vs.real_servers)
    lines.append(f"{len(table)} virtual servers, {real_total} real servers")
    return "\n".join(lines) + "\n"


def diff_text(diff: Diff) -> str:
    lines = []
    ordered = diff.sorted()
    for kind in KINDS:
        items = ordered.of(kind)
        title = kind.replace("_", " ")
        lines.append(f"{title}: {len(items)}")
        for item in items:
            row = f"  {str(item.vs):<44}"
            if item.real is not None:
                row += f" -> {_endpoint_text(*item.real):<44} weight {item.weight}"
                if item.active_connections is not None:
                    row += f" conns {item.active_connections}/{item.inactive_connections}"
            extra = dict(item.details)
            if "live_scheduler" in extra:
                row += (f" scheduler {extra['live_scheduler']} (want {extra['scheduler']})"
                        f" persistent {extra['live_persistent_timeout']} (want {extra['persistent_timeout']})")
            row += f"  {item.service or ''}"
            lines.append(row.rstrip())
    lines.append("drift found" if diff.has_drift else "no drift")
    return "\n".join(lines) + "\n"


# --- commands -----------------------------------------------------------------


def run(command: str, argv: list[str]) -> int:
    args = _parser(command).parse_args(argv)
    # Every input is read and checked before anything is printed, so bad input
    # is exactly one line on stderr.
    node_name = _node_name(args.node_name)
    objects = _objects(args, node_name)
    node = _node_facts(args, objects, node_name)
    live = _live_table(args) if command == "diff" else None

    for reason in objects.errors:
        print(f"{PROG}: skipped {reason}", file=sys.stderr)
    if not node.addresses and any(p.node_port for s in objects.services.values() for p in s.ports):
        print(f"{PROG}: no NodePort addresses: no --node-ip and no Node {node_name!r} with addresses "
              "in the objects; NodePort virtual servers are left out", file=sys.stderr)
    desired = model.desired_table(objects.services.values(), model.slices_by_service(objects.slices.values()),
                                  node, args.proxy)
    if live is None:
        out = json.dumps(table_json(desired), indent=1) + "\n" if args.output == "json" else table_text(desired)
        sys.stdout.write(out)
        return 0
    result = diff_tables(desired, live)
    if args.output == "json":
        sys.stdout.write(json.dumps(result.to_json(), indent=1) + "\n")
    else:
        sys.stdout.write(diff_text(result))
    return 1 if result.has_drift else 0


def main(command: str, argv: list[str]) -> int:
    try:
        # One pass that builds millions of objects, then exits: the cyclic GC's passes
        # over them cost a fifth of a 56 MB dump's run and would find nothing (the
        # loader refuses cyclic aliases; any other cyclic garbage goes at exit).
        with paused_gc():
            return run(command, argv)
    except BadInput as err:
        print(f"{PROG} {command}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `... | head`: not an error of ours.
        try:
            sys.stdout.close()
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        return 130

