"""Which dataplane this node's proxy programs: ``--proxy-mode``, or found on the node (``auto``).

``auto`` asks kube-proxy first: it answers ``GET /proxyMode`` on its metrics
address with its mode as plain text (cmd/kube-proxy/app/server.go). When it does
not answer (not running yet, a metrics address bound elsewhere), the tables on
the node say it: an IPVS table with virtual servers, an ``ip``/``ip6 kube-proxy``
nftables table, or a ``KUBE-SERVICES`` chain in the nat table of iptables-nft or
of iptables-legacy, the log line saying which backend (IPVS mode keeps one too, so
IPVS is looked for first). kube-router programs IPVS
only: nothing to find.

The mode is found once at start and again every ``recheck`` seconds on a thread of
its own (never on a scrape), logged once when first found and once per change, and
sooner when drift asks (``recheck_soon``): a proxy redeployed in another mode cleans up
the old mode's rules (or leaves them to go stale), which the old mode's reader shows as
every frontend missing; found only at the next 5-minute check, that was past the grace
period and an alert's ``for`` on every node of a migration. A re-check that finds no
evidence keeps the last mode: a table deleted behind the proxy's back (firewalld) is
drift to report, not another mode.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from typing import Callable, NamedTuple

from exporter.dataplane import MODES

log = logging.getLogger("exporter.proxymode")

SERVICE = "proxy-mode"
RECHECK_SECONDS = 300.0  # a proxy's mode changes only when it is redeployed
RECHECK_SOON_SECONDS = 30.0  # drift's asks, at most this often (a real outage asks on every scrape)
PROXY_MODE_MAX_BYTES = 256
KUBE_PROXY_METRICS_URL = "http://127.0.0.1:10249/metrics"  # as the proxy collector's default
KUBE_PROXY_TABLE = "kube-proxy"
IPTABLES_SERVICES_CHAIN = "KUBE-SERVICES"
IPTABLES_LEGACY = "iptables-legacy"  # found by rule_tables_found, reported as mode iptables


class Found(NamedTuple):
    mode: str | None  # None: no evidence of any mode
    how: str  # how it was found, or why not, for the log


def proxy_mode_url(metrics_url: str | None) -> str:
    """``/proxyMode`` on the host and port of the proxy's metrics page."""
    parts = urllib.parse.urlsplit(metrics_url or KUBE_PROXY_METRICS_URL)
    return urllib.parse.urlunsplit(("http", parts.netloc, "/proxyMode", "", ""))


def parse_proxy_mode(body: bytes) -> str | None:
    """kube-proxy's answer (``nftables``, with or without a newline); None if not a mode we know."""
    text = body.decode("ascii", "replace").strip().lower()
    return text if text in MODES else None


def ask_kube_proxy(metrics_url: str | None, timeout: float) -> Found:
    """One GET of /proxyMode under one deadline (the proxy reader's fetch)."""
    from exporter.readers.proxymetrics import PageUnusable, ProxyNotListening, fetch_page

    url = proxy_mode_url(metrics_url)
    try:
        body = fetch_page(url, timeout, PROXY_MODE_MAX_BYTES)
    except (ProxyNotListening, PageUnusable, ValueError) as err:
        return Found(None, f"kube-proxy did not say at {url}: {err}")
    mode = parse_proxy_mode(body)
    if mode is None:
        shown = body[:40].decode("ascii", "replace").strip()
        return Found(None, f"kube-proxy answered {url} with {shown!r}, not a mode this exporter reads")
    return Found(mode, f"kube-proxy answered {url}")


def ipvs_has_virtual_servers(paths) -> bool:
    """/proc/net/ip_vs lists at least one virtual server (the module alone proves nothing)."""
    try:
        with open(paths.proc("net", "ip_vs"), encoding="ascii", errors="replace") as fh:
            return any(line.startswith(("TCP ", "UDP ", "SCTP ", "FWM ")) for line in fh)
    except OSError:
        return False


def rule_tables_found(paths=None, legacy=None) -> list[str]:
    """``nftables`` when a kube-proxy nftables table exists, ``iptables`` when iptables-nft's
    nat table has KUBE-SERVICES (read over nf_tables netlink in this network namespace), and
    ``iptables-legacy`` when the legacy nat table has it (the kernel's x_tables blob, read
    by getsockopt: no exec, and no table created where there is none)."""
    from exporter.readers.nftables_netlink import NFPROTO_IPV4, NFPROTO_IPV6, NftNetlink, NftReadError

    found = []
    try:
        with NftNetlink() as nl:
            families = (NFPROTO_IPV4, NFPROTO_IPV6)
            if any(nl.table(f, KUBE_PROXY_TABLE) is not None for f in families):
                found.append("nftables")
            # One get of the chain, not a dump of the 61,000 chains of 10,000 Services
            # (0.3 s of CPU a look, and drift asks for a look every 30 s under churn).
            if any(nl.chain_exists(f, "nat", IPTABLES_SERVICES_CHAIN) for f in families):
                found.append("iptables")
    except (NftReadError, OSError) as err:
        log.debug("nf_tables not read for the proxy mode: %s", err)
    if paths is not None:
        from exporter.readers.iptables_legacy import IptablesLegacySource, LegacyReadError

        try:
            if (legacy or IptablesLegacySource(paths)).present():
                found.append(IPTABLES_LEGACY)
        except (LegacyReadError, OSError) as err:
            log.debug("iptables-legacy tables not read for the proxy mode: %s", err)
    return found


def find_mode(settings, paths, legacy=None) -> Found:
    """``auto``'s answer: kube-proxy's own word, else the tables on the node. ``legacy``: an
    ``IptablesLegacySource`` kept between calls (its answer is reused while the legacy
    tables' entry count and size stay; a new one copies the whole nat table to look)."""
    if settings.get("proxy") == "kube-router":
        return Found("ipvs", "kube-router programs IPVS only")
    asked = ask_kube_proxy(settings.get("proxy.metrics-url"), settings.get("proxy.timeout"))
    if asked.mode is not None:
        return asked
    found = (["ipvs"] if ipvs_has_virtual_servers(paths) else []) + rule_tables_found(paths, legacy)
    if "iptables" in found and IPTABLES_LEGACY in found:
        found.remove(IPTABLES_LEGACY)
        backend = "in both iptables backends, nft and legacy"
    elif IPTABLES_LEGACY in found:
        found[found.index(IPTABLES_LEGACY)] = "iptables"
        backend = "iptables-legacy"
    else:
        backend = "iptables-nft"
    if not found:
        return Found(None, f"{asked.how}; and no kube-proxy table on this node (no IPVS virtual server in "
                           f"{paths.proc('net', 'ip_vs')}, "
                           f"no {KUBE_PROXY_TABLE} nftables table, no iptables {IPTABLES_SERVICES_CHAIN} chain)")
    seen = {"ipvs": f"IPVS virtual servers in {paths.proc('net', 'ip_vs')}",
            "nftables": f"the {KUBE_PROXY_TABLE} nftables table",
            "iptables": f"iptables' {IPTABLES_SERVICES_CHAIN} chain ({backend})"}
    others = f" (also found: {', '.join(found[1:])})" if len(found) > 1 else ""
    return Found(found[0], f"{asked.how}; found {seen[found[0]]}{others}")


class ProxyMode:
    """The node's proxy mode, owned once per exporter (``shared_proxy_mode``)."""

    def __init__(self, settings, paths, find: Callable[[], Found] | None = None,
                 recheck: float = RECHECK_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        configured = settings.get("proxy-mode")
        self.auto = configured == "auto"
        self._legacy = None  # one legacy-table reader for every recheck (built on first use)
        self._find = find or (lambda: find_mode(settings, paths, self._legacy_source(paths)))
        self.recheck = recheck
        self._mode: str | None = None if self.auto else configured
        self.how = "set by --proxy-mode" if not self.auto else ""
        self._stop = threading.Event()
        self._wake = threading.Event()  # recheck_soon: look now
        self._clock = clock
        self._asked_at = float("-inf")
        self._thread: threading.Thread | None = None
        self._said_nothing = False
        if self.auto:
            self.check()
            if recheck > 0:
                self._thread = threading.Thread(target=self._run, name="proxy-mode", daemon=True)
                self._thread.start()

    def _legacy_source(self, paths):
        if self._legacy is None:
            from exporter.readers.iptables_legacy import IptablesLegacySource

            self._legacy = IptablesLegacySource(paths)
        return self._legacy

    def current(self) -> str | None:
        """The mode, or None when auto found none (mode-specific collectors stay off)."""
        return self._mode

    def check(self) -> str | None:
        """Look again (auto only); log the first answer and every change."""
        try:
            found = self._find()
        except Exception as err:  # noqa: BLE001 - a bug in a probe must not stop the exporter
            found = Found(None, f"looking for the proxy mode failed: {type(err).__name__}: {err}")
        if found.mode is None:
            if self._mode is None:
                self.how = found.how  # why there is none, for whoever asks
            if self._mode is None and not self._said_nothing:
                log.warning("proxy mode not found (%s): drift is not reported until it is; "
                            "set --proxy-mode to say it", found.how)
                self._said_nothing = True
            return self._mode  # no evidence: keep the last mode
        if found.mode != self._mode:
            if self._mode is None:
                log.info("proxy mode %s (%s)", found.mode, found.how)
            else:
                log.warning("proxy mode changed from %s to %s (%s)", self._mode, found.mode, found.how)
            self._mode, self.how = found.mode, found.how
        return self._mode

    def recheck_soon(self) -> None:
        """Look again now, on the mode's thread (auto only; at most once per
        ``RECHECK_SOON_SECONDS``): drift saw the live rules differ from what the API calls
        for, which a proxy redeployed in another mode shows too."""
        if self._thread is None:
            return
        now = self._clock()
        if now - self._asked_at >= RECHECK_SOON_SECONDS:
            self._asked_at = now
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.recheck)
            self._wake.clear()
            if not self._stop.is_set():
                self.check()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)


def shared_proxy_mode(ctx) -> ProxyMode:
    return ctx.service(SERVICE, lambda: ProxyMode(ctx.settings, ctx.paths))
