"""Offline tools: ``desired`` and ``diff`` (the command an on-call engineer runs).

    kubenode-exporter desired --objects FILE [--proxy-mode M] [--node-name N] [--node-ip IP ...] [--proxy P] [--output json|text]
    kubenode-exporter diff    --objects FILE [--ipvs FILE | --rules FILE ...] [--proxy-mode M] [...] [--output json|text]

They read files and touch nothing live, except ``diff`` without ``--ipvs`` or
``--rules`` (reads this host's dataplane: the mode found as ``detect_live_mode``
says, or ``--proxy-mode``) and, with no ``--objects`` but a kubeconfig, a list
of the live cluster (``_cluster_objects``).

Every kube-proxy mode gives the same JSON (the contract's "Every kube-proxy
mode"): a frontend is a virtual server, an endpoint a real server of weight 1 in
nftables and iptables modes, plus ``rejected_virtual_servers``: in ``diff`` (every
mode; always empty for IPVS), frontends whose Service has usable endpoints but
that the rules reject or drop; in ``desired`` (nftables/iptables only, the IPVS
output stays the contract's example), the frontends the rules should reject or
drop, with the verdict.
Mode on files: ``--ipvs`` is IPVS, ``--rules`` the mode its text is from (`nft -j`
JSON: nftables; `iptables-save` / `ip6tables-save` text, either backend: iptables);
``desired`` defaults to ipvs.

Exit status: 0 fine (``diff``: no drift), 1 drift found (any list but
``draining_real_servers`` non-empty), 2 bad input: one line on stderr, never a
traceback. An IPVS table with a line the reader does not understand is bad input
(the line is named): a diff of part of it would be no answer. Malformed objects inside ``--objects`` are reported on stderr and
skipped; they are not bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from typing import Any, NoReturn

from exporter.config import PROXIES
from exporter.dataplane import MODES, Table, VirtualServerKey, sorted_real_servers, sorted_virtual_servers
from exporter.kube import desired as model
from exporter.kube import desired_rules
from exporter.kube.diff import KINDS, REJECTED_VS, Diff, diff_tables
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
    what = {"desired": "print the table (IPVS, or nftables/iptables frontends) the proxy should have "
                       "programmed on this node",
            "diff": "compare that table with the live one (an IPVS table or kube-proxy's rules) and list each "
                    "difference by kind"}[command]
    epilog = None
    if command == "diff":
        epilog = ("kinds: missing/stale virtual servers; missing real servers; stale real servers (not desired, "
                  "weight > 0); zero-weight real servers (desired, weight 0); draining real servers (not "
                  "desired, weight 0: graceful termination); mismatched virtual servers (scheduler or "
                  "persistence differs); rejected virtual servers (nftables/iptables: the Service has usable endpoints "
                  "but the rules reject or drop its traffic). No grace period here. Exit status: 0 no drift, "
                  "1 drift (any kind but draining), 2 bad input (a table or rules not read whole: the first "
                  "thing not read is named).")
    parser = _Parser(prog=f"{PROG} {command}", description=what + ".", epilog=epilog)
    parser.add_argument("--objects", metavar="FILE",
                        help="YAML or JSON as `kubectl get services,endpointslices,nodes -A -o yaml` prints it "
                             "(a List; Nodes optional). Without it, the live cluster is listed when a kubeconfig "
                             "is available (--kubeconfig, $KUBECONFIG, or in-cluster)")
    parser.add_argument("--proxy-mode", dest="proxy_mode", choices=("auto", *MODES), default=None,
                        help="the proxy's dataplane: auto finds this node's as the exporter does (kube-proxy's "
                             "GET /proxyMode on 127.0.0.1:10249, else the tables present: IPVS virtual servers, "
                             "the kube-proxy nftables table, iptables' KUBE-SERVICES chain). Default: ipvs for "
                             "desired and diff --ipvs, the rules' own mode for diff --rules, auto for a live diff")
    if command == "diff":
        parser.add_argument("--ipvs", metavar="FILE",
                            help="the text of /proc/net/ip_vs; default: this host's live table")
        parser.add_argument("--rules", metavar="FILE", action="append", default=[],
                            help="the rules as the node's tools print them (repeatable, one file per family): "
                                 "nftables mode, `nft -j list ruleset` (or `nft -j list table ip kube-proxy` and "
                                 "`... ip6 kube-proxy`); iptables mode, `iptables-save` and `ip6tables-save` (either backend)")
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
    # kube-router's own flags, when it runs without their defaults (exporter/config.py has the same keys).
    parser.add_argument("--kube-router.strict-external-ip-validation", dest="kube-router.strict-external-ip-validation",
                        action=argparse.BooleanOptionalAction, default=True,
                        help="as kube-router's flag (default on, its default since 2.8): only externalIPs and "
                             "LoadBalancer IPs inside the ranges below are expected; with no range, none")
    for flag, default in (("service-external-ip-range", []), ("loadbalancer-ip-range", []),
                          ("service-cluster-ip-range", None)):
        parser.add_argument(f"--kube-router.{flag}", dest=f"kube-router.{flag}", metavar="CIDR", action="append",
                            default=default, help=f"kube-router's --{flag} (repeatable)")
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
        if text and not text.endswith("\n"):
            text += "\n"  # a file is whole: its last line is not a cut one (an editor's or a paste's)
        table = reader.parse_ip_vs(text)
        if not table and not table.first_unread and not text.lstrip().startswith("IP Virtual Server"):
            raise BadInput(f"{args.ipvs} is not the text of /proc/net/ip_vs (no virtual server, no header)")
        return _read_whole(table, args.ipvs)
    from exporter.paths import Paths

    procfs = Paths(procfs=args.procfs)
    try:
        return _read_whole(reader.read_ip_vs(procfs), procfs.proc(*reader.PROC_IP_VS))
    except reader.IPVSUnavailable as err:
        raise BadInput(f"cannot read the live IPVS table: {err}") from None
    except OSError as err:
        raise BadInput(f"cannot read the live IPVS table: {err.strerror or err}") from None


def _read_whole(table, source: str) -> Table:
    """The table, if every line of it was read: a diff of part of a table would call
    what it did not read missing (exit 1) or, worse, say nothing of it (exit 0)."""
    reason = table.unread_reason()
    if reason is None:
        return table
    raise BadInput(f"{source}: {reason}; nothing compared")


# --- the proxy mode and kube-proxy's rules -----------------------------------

# iptables-save's first line or a table header (`*nat`): text of iptables mode, not `nft -j` JSON.
_IPTABLES_SAVE = re.compile(rb"^(?:# Generated by ip6?tables(?:-nft|-legacy)?-save|"
                            rb"\*(?:nat|filter|mangle|raw|security)\s*$)", re.M)


def rules_file_mode(raw: bytes) -> str:
    """The mode a ``--rules`` file is from: iptables for `iptables-save` text, else
    nftables (whose parser says why a file is not `nft -j` JSON)."""
    return "iptables" if _IPTABLES_SAVE.search(raw[:4096]) else "nftables"


def _read_rules_files(paths: list[str]) -> list[tuple[str, bytes]]:
    from exporter.readers.nftables_json import MAX_JSON_BYTES

    files = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_JSON_BYTES + 1)  # the parser says when a file is larger
        except OSError as err:
            raise BadInput(f"cannot read {path}: {err.strerror or err}") from None
        files.append((path, raw))
    return files


# How long `diff` waits for kube-proxy's /proxyMode before it looks at the tables.
DETECT_TIMEOUT = 2.0


def detect_live_mode(proxy: str, procfs: str) -> tuple[str, str]:
    """This node's proxy mode and how it was found, as the running exporter's ``auto``
    finds it (``exporter.proxymode.find_mode``: kube-proxy's ``/proxyMode`` on its default
    metrics address, else the kube-proxy tables present)."""
    from exporter.paths import Paths
    from exporter.proxymode import find_mode

    found = find_mode({"proxy": proxy, "proxy.metrics-url": None, "proxy.timeout": DETECT_TIMEOUT},
                      Paths(procfs=procfs))
    if found.mode is None:
        raise BadInput(f"cannot tell this node's proxy mode ({found.how}): pass --proxy-mode")
    return found.mode, found.how


def _proxy_mode(args: argparse.Namespace, command: str, rules_files: list[tuple[str, bytes]]
                ) -> tuple[str, str | None]:
    """The mode to model and read, and how auto found it (None when not detected)."""
    mode = args.proxy_mode
    procfs = getattr(args, "procfs", "/proc")
    if command == "desired":
        return detect_live_mode(args.proxy, procfs) if mode == "auto" else (mode or "ipvs", None)
    if args.ipvs and rules_files:
        raise BadInput("--ipvs and --rules are two dataplanes: give one")
    if args.ipvs:
        if mode not in (None, "auto", "ipvs"):
            raise BadInput(f"--ipvs is an IPVS table; in --proxy-mode {mode} give the rules with --rules")
        return "ipvs", None
    if rules_files:
        found = {rules_file_mode(raw) for _, raw in rules_files}
        if mode in (None, "auto"):
            if len(found) > 1:
                raise BadInput("--rules files of two modes (nft -j JSON and iptables-save text): give one mode's")
            return found.pop(), None
        if mode == "ipvs":
            raise BadInput("--rules takes nftables or iptables rules; an IPVS table is given with --ipvs")
        return mode, None
    if mode in (None, "auto"):
        return detect_live_mode(args.proxy, procfs)
    return mode, None


def _iptables_rules(rules_files: list[tuple[str, bytes]], services) -> Any:
    """kube-proxy's iptables rules (an ``IptablesRead``) from `iptables-save` /
    `ip6tables-save` texts, one family per file (or both saves in one)."""
    from exporter.readers.iptables import NoKubeProxyRules, chain_services_for, resolve_rulesets
    from exporter.readers.iptables_save import IptablesSaveError, parse_save
    from exporter.readers.nftables_json import MAX_JSON_BYTES

    rulesets, seen_in = [], {}
    for path, raw in rules_files:
        if len(raw) > MAX_JSON_BYTES:
            raise BadInput(f"{path} is larger than {MAX_JSON_BYTES // 2**20} MiB: not one node's iptables-save output")
        try:
            found = parse_save(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise BadInput(f"{path}: not iptables-save output: not UTF-8 text (byte {err.start})") from None
        except IptablesSaveError as err:
            raise BadInput(f"{path}: {err}") from None
        if not found:
            raise BadInput(f"{path}: no table in it: not iptables-save output, or an empty one")
        for ruleset in found:
            missing = [t for t in ("nat", "filter") if t not in ruleset.tables]
            if missing:
                # A save of one table (`iptables-save -t nat`) would show every frontend its
                # rules reject as missing, or every frontend as missing: not the node's rules.
                raise BadInput(f"{path}: the IPv{ruleset.family} rules have no {' and no '.join(missing)} table: "
                               "save them whole (`iptables-save`, not `-t TABLE`)")
            if ruleset.family in seen_in:
                raise BadInput(f"IPv{ruleset.family} rules are in both {seen_in[ruleset.family]} and {path}")
            seen_in[ruleset.family] = path
            rulesets.append(ruleset)
    try:
        return resolve_rulesets(rulesets, chain_services_for(services))
    except NoKubeProxyRules as err:
        names = ", ".join(path for path, _ in rules_files)
        raise BadInput(f"{names}: {err}: this node's proxy is not in iptables mode, "
                       "or the save is of another table") from None


def _live_rules(mode: str, rules_files: list[tuple[str, bytes]], services=(), procfs: str = "/proc"):
    """kube-proxy's rules (an ``NftablesRead`` or ``IptablesRead``) from the files, or from
    this host; every frontend read, or bad input naming the first thing not read.
    ``services``: the Services, whose hashes name iptables mode's chains."""
    if mode == "iptables":
        if rules_files:
            read = _iptables_rules(rules_files, services)
            source = ", ".join(path for path, _ in rules_files)
        else:
            read, source = _live_iptables_rules(services, procfs)
        _check_read_whole(read, source)
        return read
    from exporter.readers.nftables_netlink import NftReadError

    if rules_files:
        from exporter.readers.nftables_json import read_rules_json

        source = ", ".join(path for path, _ in rules_files)
        try:
            read = read_rules_json(rules_files)
        except NftReadError as err:
            raise BadInput(str(err)) from None
    else:
        from exporter.readers.nftables import NftablesReader

        source = "the live nftables rules"
        try:
            read = NftablesReader().read()
        except NftReadError as err:
            raise BadInput(f"cannot read {source}: {err}") from None
    _check_read_whole(read, source)
    return read


def _live_iptables_rules(services, procfs: str):
    """This host's iptables rules, from the backend that holds kube-proxy's (the exporter's own reader)."""
    from exporter.paths import Paths
    from exporter.readers.dataplanes import BACKEND_NAMES, IptablesDataplane, ReadFailed
    from exporter.readers.iptables import chain_services_for

    dataplane = IptablesDataplane(Paths(procfs=procfs))
    names = chain_services_for(services)
    dataplane.chain_services = lambda: names
    try:
        live = dataplane.read_rules(0)
    except ReadFailed as err:
        raise BadInput(f"cannot read this host's iptables rules: {err}") from None
    except OSError as err:
        raise BadInput(f"cannot read this host's iptables rules: {err.strerror or err}") from None
    finally:
        dataplane.close()
    if not live.read.sizes:
        # The exporter reads this as every frontend missing; a one-off diff says what it found.
        raise BadInput("no kube-proxy iptables rules on this host (no KUBE- chain in iptables-nft or "
                       "iptables-legacy): give --proxy-mode, or --rules with saved rules")
    return live.read, f"the live iptables rules ({BACKEND_NAMES[live.backend]})"


def _check_read_whole(read, source: str) -> None:
    if read.unread:
        more = f" (and {len(read.unread) - 1} more)" if len(read.unread) > 1 else ""
        raise BadInput(f"{source}: not read whole: {read.unread[0]}{more}; nothing compared")


# Until diff.py has the ``rejected_virtual_server`` kind (t-drift), the offline diff
# computes it here, in one pure function that can move there unchanged.


class _Desired:
    """The desired side in any mode: the table, and (nftables/iptables) what the rules
    should reject or drop, with the Service of each frontend."""

    def __init__(self, table: Table, rules: desired_rules.DesiredRules | None = None,
                 services: dict[VirtualServerKey, str | None] | None = None) -> None:
        self.table, self.rules, self.services = table, rules, services or {}

    def rejected_json(self) -> list[dict]:
        if self.rules is None:
            return []
        return [{"protocol": key.protocol, "address": key.address, "port": key.port, "fwmark": key.fwmark,
                 "service": self.services.get(key), "verdict": verdict}
                for key, verdict in sorted(self.rules.rejected.items(), key=lambda kv: kv[0].sort_key())]


def _desired(mode: str, objects: ObjectSet, node: model.NodeFacts, proxy: str, kube_router_flags) -> _Desired:
    slices = model.slices_by_service(objects.slices.values())
    try:
        per_service = desired_rules.model_for(proxy, mode, kube_router_flags)  # kube-router: IPVS only
    except ValueError as err:
        raise BadInput(str(err)) from None
    if mode == "ipvs":
        return _Desired(model.desired_table(objects.services.values(), slices, node, proxy,
                                            kube_router_flags=kube_router_flags))
    frontends = model.desired_table(objects.services.values(), slices, node, model=per_service)
    rules = desired_rules.rules_view(frontends.values())
    return _Desired(rules.table, rules, {key: vs.service for key, vs in frontends.items()})


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


def _rejected_text(title: str, rows: list[dict]) -> list[str]:
    lines = [f"{title}: {len(rows)}"]
    for row in rows:
        key = VirtualServerKey(row["protocol"], row["address"], row["port"], row["fwmark"])
        lines.append(f"  {str(key):<44} {row['verdict']:<6}  {row.get('service') or ''}".rstrip())
    return lines


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
    parser = _parser(command)
    args = parser.parse_args(argv)
    try:
        kube_router_flags = model.kube_router_flags_from(vars(args).get)
    except ValueError as err:
        parser.error(str(err))
    # Every input is read and checked before anything is printed, so bad input
    # is exactly one line on stderr.
    node_name = _node_name(args.node_name)
    rules_files = _read_rules_files(vars(args).get("rules") or [])
    mode, found_by = _proxy_mode(args, command, rules_files)
    objects = _objects(args, node_name)
    node = _node_facts(args, objects, node_name)
    want = _desired(mode, objects, node, args.proxy, kube_router_flags)
    live = live_rules = None
    if command == "diff":
        if mode == "ipvs":
            live = _live_table(args)
        else:
            live_rules = _live_rules(mode, rules_files, objects.services.values(), getattr(args, "procfs", "/proc"))
            live = live_rules.table

    for reason in objects.errors:
        print(f"{PROG}: skipped {reason}", file=sys.stderr)
    if found_by:
        print(f"{PROG}: proxy mode {mode} ({found_by})", file=sys.stderr)
    if (mode == "ipvs" and not node.addresses
            and any(p.node_port for s in objects.services.values() for p in s.ports)):
        print(f"{PROG}: no NodePort addresses: no --node-ip and no Node {node_name!r} with addresses "
              "in the objects; NodePort virtual servers are left out", file=sys.stderr)
    if live is None:
        if args.output == "json":
            doc = table_json(want.table)
            if want.rules is not None:  # IPVS has no verdicts: its output stays the contract's own
                doc[REJECTED_VS] = want.rejected_json()
            out = json.dumps(doc, indent=1) + "\n"
        else:
            out = table_text(want.table)
            if want.rules is not None:
                out += "\n".join(_rejected_text("frontends the rules should reject or drop",
                                                 want.rejected_json())) + "\n"
        sys.stdout.write(out)
        return 0
    result = diff_tables(want.table, live, want.rules.rejected if want.rules is not None else {},
                         live_rules.rejected if live_rules is not None else {})
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

