"""--proxy-mode: auto asks kube-proxy (/proxyMode, a real HTTP server standing in for it), else
looks at the tables in a network namespace of the test's own; the mode is said once and on a
change; collectors of another mode are off and silent; the options' other names."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from exporter.cli import settings_from_args
from exporter.collector import Context, Runner, build_collectors
from exporter.config import ConfigError
from exporter.paths import Paths
from exporter.proxymode import Found, ProxyMode, find_mode, proxy_mode_url
from tests.helpers import value
from tests.nft_rulesets import NftNS, ServicePort, ruleset
from tests.proxy_server import Answer, FakeProxy
from tests.test_proxy import fake  # noqa: F401 - the fixture: a kube-proxy stand-in


@pytest.fixture
def ns():
    with NftNS() as namespace:
        subprocess.run(["nsenter", f"--net={namespace.path}", "ip", "link", "set", "lo", "up"], check=True)
        yield namespace


def settings(*argv: str):
    return settings_from_args(["--node-name", "n1", *argv])


def empty_procfs(tmp_path: Path) -> Paths:
    (tmp_path / "net").mkdir(exist_ok=True)
    return Paths(str(tmp_path), "/sys")


def test_proxy_mode_url_is_on_the_metrics_address():
    assert proxy_mode_url("http://127.0.0.1:10249/metrics") == "http://127.0.0.1:10249/proxyMode"
    assert proxy_mode_url(None) == "http://127.0.0.1:10249/proxyMode"
    assert proxy_mode_url("http://[::1]:9999/x?y=1") == "http://[::1]:9999/proxyMode"


@pytest.mark.parametrize("answer", [b"nftables", b"nftables\n", b"ipvs", b"iptables"])
def test_kube_proxy_says_its_mode(fake, tmp_path, answer):
    fake.answers["/proxyMode"] = Answer(answer, content_type="text/plain; charset=utf-8")
    found = find_mode(settings("--proxy.metrics-url", fake.url()), empty_procfs(tmp_path))
    assert found.mode == answer.decode().strip() and "kube-proxy answered" in found.how


def test_an_unknown_answer_falls_back_to_the_tables(tmp_path, ns):
    proxy = ns.run(lambda: FakeProxy().start())  # listening inside the namespace, beside the tables
    try:
        proxy.answers["/proxyMode"] = Answer(b"kernelspace")
        ns.nft(ruleset([ServicePort("ns1", "svc1", "172.30.0.41", [("10.180.0.1", 80)])]))
        found = ns.run(lambda: find_mode(settings("--proxy.metrics-url", proxy.url()), empty_procfs(tmp_path)))
    finally:
        proxy.stop()
    assert found.mode == "nftables"
    assert "answered" in found.how and "'kernelspace', not a mode" in found.how and "found the kube-proxy nftables table" in found.how


def test_tables_say_the_mode_when_kube_proxy_does_not(tmp_path, ns):
    s = settings("--proxy.metrics-url", "http://127.0.0.1:9/metrics", "--proxy.timeout", "0.5")
    paths = empty_procfs(tmp_path)
    nothing = ns.run(lambda: find_mode(s, paths))
    assert nothing.mode is None and "no kube-proxy table" in nothing.how
    # iptables-nft's nat table with KUBE-SERVICES (kube-proxy's iptables mode) ...
    ns.nft("add table ip nat\nadd chain ip nat KUBE-SERVICES\n")
    assert ns.run(lambda: find_mode(s, paths)).mode == "iptables"
    # ... then nftables' own table: it wins over leftovers of iptables mode.
    ns.nft(ruleset([ServicePort("ns1", "svc1", "fd00:10:96::41", [("fd00:10::1", 80)])], "ip6"))
    found = ns.run(lambda: find_mode(s, paths))
    assert found.mode == "nftables" and "also found: iptables" in found.how
    # IPVS with virtual servers wins over both (IPVS mode keeps a KUBE-SERVICES chain too).
    (tmp_path / "net" / "ip_vs").write_text(
        "IP Virtual Server version 1.2.1 (size=4096)\nProt LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\nTCP  0A600001:01BB rr\n")
    assert ns.run(lambda: find_mode(s, paths)).mode == "ipvs"


def test_kube_router_is_ipvs_without_asking(tmp_path):
    found = find_mode(settings("--proxy", "kube-router", "--proxy.metrics-url", "http://127.0.0.1:9/metrics"),
                      empty_procfs(tmp_path))
    assert found == Found("ipvs", "kube-router programs IPVS only")


def test_said_once_and_on_a_change_and_kept_without_evidence(caplog):
    answers = iter([Found("nftables", "kube-proxy answered"), Found(None, "nothing"), Found(None, "nothing"),
                    Found("nftables", "kube-proxy answered"), Found("ipvs", "its tables")])
    caplog.set_level(logging.INFO, "exporter.proxymode")
    mode = ProxyMode(settings(), None, find=lambda: next(answers), recheck=0)
    assert mode.current() == "nftables"
    assert [mode.check() for _ in range(3)] == ["nftables", "nftables", "nftables"]
    assert mode.check() == "ipvs"
    lines = [r.getMessage() for r in caplog.records if r.name == "exporter.proxymode"]
    assert lines == ["proxy mode nftables (kube-proxy answered)",
                     "proxy mode changed from nftables to ipvs (its tables)"]


def test_drift_asks_for_a_look_now_on_the_modes_thread_at_most_once_per_interval():
    """``recheck_soon`` wakes the mode's thread (the scrape that asks does not wait for
    the look); asks within ``RECHECK_SOON_SECONDS`` of the last are one look (an outage
    asks on every scrape); with the mode set by flag there is nothing to look for."""
    import threading

    from exporter import proxymode

    looked = threading.Semaphore(0)
    answers = iter([Found("iptables", "its tables")] + [Found("nftables", "its table")] * 5)

    def find():
        looked.release()
        return next(answers)

    clock = [1000.0]
    mode = ProxyMode(settings(), None, find=find, recheck=3600, clock=lambda: clock[0])
    try:
        assert looked.acquire(timeout=1) and mode.current() == "iptables"  # the look at start
        mode.recheck_soon()
        assert looked.acquire(timeout=5), "no look after recheck_soon"
        for _ in range(50):  # the thread sets the mode just after the look
            if mode.current() == "nftables":
                break
            threading.Event().wait(0.02)
        assert mode.current() == "nftables"
        clock[0] += proxymode.RECHECK_SOON_SECONDS - 1
        mode.recheck_soon()
        assert not looked.acquire(timeout=0.5), "looked again within the interval"
        clock[0] += 1
        mode.recheck_soon()
        assert looked.acquire(timeout=5)
    finally:
        mode.stop()
    ProxyMode(settings("--proxy-mode", "iptables"), None, find=lambda: pytest.fail("looked for")).recheck_soon()


def test_a_set_mode_is_not_looked_for():
    mode = ProxyMode(settings("--proxy-mode", "iptables"), None, find=lambda: pytest.fail("looked for"))
    assert mode.current() == "iptables" and mode.how == "set by --proxy-mode"


def runner_for(tmp_path, *argv):
    s = settings("--path.procfs", str(empty_procfs(tmp_path).procfs), "--no-collector.memcg",
                 "--no-collector.process", "--no-collector.proxy", "--no-collector.ipset", *argv)
    ctx = Context(settings=s, paths=Paths(s["path.procfs"], "/sys"))
    return Runner(build_collectors(ctx), timeout=5), ctx


def scrape(runner) -> dict:
    out = {}
    for family in runner.collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_collectors_of_another_mode_are_off_and_silent(tmp_path, caplog):
    """On an nftables node the ipvs collector has no series (nothing to alert on) and logs
    nothing; on an iptables node drift says once that there is no reader yet."""
    runner, ctx = runner_for(tmp_path, "--proxy-mode", "iptables", "--kubeconfig", str(tmp_path / "none"))
    try:
        for _ in range(3):
            s = scrape(runner)
            assert value(s, "kubenode_collector_success", collector="ipvs") is None
            assert value(s, "kubenode_collector_success", collector="nftables") is None
            assert value(s, "kubenode_collector_success", collector="drift") == 0
    finally:
        runner.close()
        ctx.close()
    assert not [r for r in caplog.records if getattr(r, "collector", None) in ("ipvs", "nftables")]


def test_auto_without_a_mode_found_keeps_mode_collectors_off(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ns = NftNS()
    with ns:
        runner, ctx = ns.run(lambda: runner_for(tmp_path, "--proxy.metrics-url", "http://127.0.0.1:9/metrics"))
        try:
            for _ in range(3):
                s = ns.run(lambda: scrape(runner))
                assert value(s, "kubenode_collector_success", collector="ipvs") is None
                assert value(s, "kubenode_collector_success", collector="drift") == 0
        finally:
            runner.close()
            ctx.close()
    said = [r.getMessage() for r in caplog.records if "proxy mode not found" in r.getMessage()]
    assert len(said) == 1 and "no kube-proxy table on this node" in said[0]
    drift_lines = [r.getMessage() for r in caplog.records if getattr(r, "collector", None) == "drift"]
    assert len(drift_lines) == 1 and "no proxy mode found" in drift_lines[0]


def test_old_and_contract_names_of_options(tmp_path):
    assert not settings("--no-collector.ipvs_drift").collector_enabled("drift")
    assert settings("--collector.ipvs_drift").collector_enabled("drift")
    assert settings().collector_enabled("drift")
    config = tmp_path / "config.yaml"
    config.write_text("proxy_mode: nftables\n")
    assert settings("--config.file", str(config))["proxy-mode"] == "nftables"
    config.write_text("proxy-mode: ipvs\nproxy_mode: nftables\n")
    assert settings("--config.file", str(config))["proxy-mode"] == "ipvs", "the option's own name wins"
    assert settings("--config.file", str(config), "--proxy-mode", "iptables")["proxy-mode"] == "iptables"
    config.write_text("proxy_mode: userspace\n")
    with pytest.raises(ConfigError, match="must be one of auto, ipvs, nftables, iptables"):
        settings("--config.file", str(config))
    assert settings()["proxy-mode"] == "auto"


def test_auto_that_finds_nothing_says_why_to_whoever_asks():
    from exporter.proxymode import Found, ProxyMode

    mode = ProxyMode({"proxy-mode": "auto"}, None, find=lambda: Found(None, "no table here"), recheck=0)
    assert mode.current() is None
    assert mode.how == "no table here"


def test_auto_finds_iptables_legacy_and_says_which_backend(tmp_path):
    """kube-proxy's KUBE-SERVICES in the legacy nat table (x_tables, read by getsockopt):
    mode iptables, the log line naming the backend; both backends holding it, said too."""
    from tests.ipt_rulesets import IptNS

    s = settings("--proxy.metrics-url", "http://127.0.0.1:9/metrics", "--proxy.timeout", "0.5")
    paths = Paths("/proc", "/sys")  # /proc/thread-self/net: the namespace's own x_tables
    with IptNS() as ipt:
        assert ipt.run(lambda: find_mode(s, paths)).mode is None
        ipt.iptables("-t", "nat", "-N", "KUBE-SERVICES", backend="legacy")
        found = ipt.run(lambda: find_mode(s, paths))
        assert found.mode == "iptables" and "KUBE-SERVICES chain (iptables-legacy)" in found.how
        ipt.iptables("-t", "nat", "-N", "KUBE-SERVICES", backend="nft")
        found = ipt.run(lambda: find_mode(s, paths))
        assert found.mode == "iptables" and "in both iptables backends" in found.how


def test_rechecks_copy_the_legacy_nat_table_only_when_it_changed(tmp_path, monkeypatch):
    """auto's rechecks (every 5 minutes while kube-proxy's /proxyMode does not answer) keep
    one legacy reader: the whole nat table (60 MB at 10,000 Services) is fetched again only
    when its entry count or size moved."""
    from exporter.readers import iptables_legacy
    from tests.ipt_rulesets import IptNS

    fetched = []
    has_chain = iptables_legacy.has_chain
    monkeypatch.setattr(iptables_legacy, "has_chain", lambda *a: fetched.append(a) or has_chain(*a))
    s = settings("--proxy.metrics-url", "http://127.0.0.1:9/metrics", "--proxy.timeout", "0.5",
                 "--proxy-mode", "auto")
    paths = Paths("/proc", "/sys")
    with IptNS() as ipt:
        ipt.iptables("-t", "nat", "-N", "KUBE-SERVICES", backend="legacy")
        mode = ipt.run(lambda: ProxyMode(s, paths, recheck=0))
        assert mode.current() == "iptables" and len(fetched) == 1
        assert ipt.run(mode.check) == "iptables" and len(fetched) == 1
        ipt.iptables("-t", "nat", "-N", "KUBE-SVC-X", backend="legacy")
        assert ipt.run(mode.check) == "iptables" and len(fetched) == 2
