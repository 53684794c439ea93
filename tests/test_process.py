"""process collector against real processes: a busy `kubelet`, a `kube-router` that execs
short children, several processes of one component, restarts, a host /proc mounted elsewhere,
and an unreadable /proc. Figures are checked against /proc/<pid>/stat read by the test itself."""

import os
import subprocess
import time

import pytest
import yaml

from exporter.cli import settings_from_args
from exporter.collector import Context, Runner
from exporter.collectors.process import ProcessCollector
from exporter.paths import Paths
from tests.helpers import make_runner, samples, value

TICKS = os.sysconf("SC_CLK_TCK")


def process_runner(tmp_path, components=None, *argv):
    if components is not None:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"process": {"components": components}}))
        argv = ("--config.file", str(config), *argv)
    settings = settings_from_args(list(argv))
    ctx = Context(settings=settings, paths=Paths(settings["path.procfs"], settings["path.sysfs"]))
    collector = ProcessCollector(ctx)
    return Runner([collector]), collector


def kernel_figures(comm: str) -> tuple[float, float, set[int]]:
    """Sum of utime+stime and cutime+cstime (seconds) over processes named ``comm``, from
    /proc/<pid>/stat as the kernel prints it, and their PIDs."""
    own = children = 0
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                text = fh.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        if name != comm or fields[0] == "Z":
            continue
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14..17
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        own += utime + stime
        children += cutime + cstime
        pids.add(int(entry))
    return own / TICKS, children / TICKS, pids


@pytest.fixture
def spawn(tmp_path):
    """Start a bash script as a process whose name is ``name`` (bash run through a
    symlink of that name: the kernel names a process after the file it executed)."""
    procs = []
    bindir = tmp_path / "bin"
    bindir.mkdir()

    def start(name, script, *args):
        link = bindir / name
        if not link.exists():
            link.symlink_to("/bin/bash")
        proc = subprocess.Popen([str(link), "-c", script, name, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{proc.pid}/comm") as fh:
                    if fh.read().strip() == name[:15]:  # the kernel keeps 15 characters
                        return proc
            except OSError:
                pass
            time.sleep(0.01)
        raise AssertionError(f"process {name} did not start")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


BUSY = "while :; do :; done"
# Waits on its stdin (a builtin): no child that could briefly carry the same name.
IDLE = "read wait_for_the_test"


def bracketed(runner, comm):
    """A scrape, with the kernel's figures read just before and just after it."""
    own1, kids1, pids1 = kernel_figures(comm)
    s = samples(runner)
    own2, kids2, pids2 = kernel_figures(comm)
    assert pids1 == pids2, "processes came or went during the scrape"
    return s, (own1, own2), (kids1, kids2), pids1


def test_busy_kubelet_cpu_moves_by_what_the_kernel_accounts(tmp_path, spawn):
    kubelet = spawn("kubelet", BUSY)
    runner, _ = process_runner(tmp_path)  # the default components
    time.sleep(0.5)
    s, (lo, hi), _, pids = bracketed(runner, "kubelet")
    assert kubelet.pid in pids
    first = value(s, "kubenode_process_cpu_seconds_total", component="kubelet")
    assert value(s, "kubenode_process_up", component="kubelet") == 1.0
    assert lo - 1e-9 <= first <= hi + 1e-9
    assert value(s, "kubenode_process_resident_memory_bytes", component="kubelet") > 1_000_000

    time.sleep(1.5)
    s, (lo, hi), _, _ = bracketed(runner, "kubelet")
    second = value(s, "kubenode_process_cpu_seconds_total", component="kubelet")
    assert lo - 1e-9 <= second <= hi + 1e-9
    # How much CPU the loop gets depends on the machine's load; that it moved, and by
    # exactly what the kernel accounted (the bracket above), does not.
    assert second > first, "a busy loop for 1.5 s should have used CPU"
    # A component with no process: up 0 and no counters.
    assert value(s, "kubenode_process_up", component="kube-proxy") == 0.0
    assert value(s, "kubenode_process_cpu_seconds_total", component="kube-proxy") is None
    assert value(s, "kubenode_process_resident_memory_bytes", component="kube-proxy") is None


def test_exec_storm_shows_in_children_cpu(tmp_path, spawn):
    storm = 'for i in $(seq "$1"); do /bin/true; done; echo done; read wait_for_the_test'
    router = spawn("kube-router", storm, "1500")
    runner, _ = process_runner(tmp_path)
    first = samples(runner)
    assert value(first, "kubenode_process_up", component="kube-router") == 1.0
    assert router.stdout.readline().strip() == "done"
    # Its children have all exited and been waited for: the figures are settled.
    s, (own, _), (kids, _), pids = bracketed(runner, "kube-router")
    assert pids == {router.pid}
    children = value(s, "kubenode_process_children_cpu_seconds_total", component="kube-router")
    assert children == pytest.approx(kids, abs=1e-9)
    assert value(s, "kubenode_process_cpu_seconds_total", component="kube-router") == pytest.approx(own, abs=1e-9)
    assert children > 0.1, "1500 execs of /bin/true should cost their children some CPU"
    before = value(first, "kubenode_process_children_cpu_seconds_total", component="kube-router")
    assert children > before


def test_several_processes_are_summed(tmp_path, spawn):
    name = "kube-proxy"
    procs = [spawn(name, BUSY) for _ in range(2)]
    runner, _ = process_runner(tmp_path)
    time.sleep(0.3)
    s, (lo, hi), _, pids = bracketed(runner, name)
    assert {p.pid for p in procs} <= pids
    assert value(s, "kubenode_process_processes", component=name) == len(pids)
    assert lo - 1e-9 <= value(s, "kubenode_process_cpu_seconds_total", component=name) <= hi + 1e-9


def test_match_on_command_line(tmp_path, spawn):
    marker = f"nodeproc-marker-{os.getpid()}"
    spawn("containerd-shim", IDLE, marker)
    runner, _ = process_runner(tmp_path, [{"name": "shim", "match": marker}])
    s = samples(runner)
    assert value(s, "kubenode_process_up", component="shim") == 1.0
    assert value(s, "kubenode_process_processes", component="shim") == 1.0


def test_long_name_truncated_by_the_kernel_still_matches(tmp_path, spawn):
    name = f"kube-controller-manager-{os.getpid()}"
    spawn(name, IDLE)
    runner, _ = process_runner(tmp_path, [{"name": "kcm", "match": f"^{name}$"}])
    assert value(samples(runner), "kubenode_process_up", component="kcm") == 1.0


def test_pids_are_kept_and_a_restart_is_found_at_once(tmp_path, spawn):
    comp = f"np-{os.getpid()}"
    first = spawn(comp, IDLE)
    missing = f"npx-{os.getpid()}"
    runner, collector = process_runner(tmp_path, [{"name": comp}, {"name": missing}])
    tracker = collector.tracker
    now = [1000.0]
    tracker.clock = lambda: now[0]

    samples(runner)
    assert tracker.stats.scans == 1
    for _ in range(5):
        now[0] += 5
        s = samples(runner)
    assert tracker.stats.scans == 1, "scanned /proc although every kept process was alive"
    assert value(s, "kubenode_process_up", component=comp) == 1.0
    assert value(s, "kubenode_process_up", component=missing) == 0.0

    # The kept process exits and another starts: found on the next scrape, not later.
    first.kill()
    first.wait()
    second = spawn(comp, IDLE)
    s = samples(runner)
    assert tracker.stats.scans == 2
    assert value(s, "kubenode_process_up", component=comp) == 1.0
    assert tracker.kept_pids()[comp] == [second.pid]

    # A component that had no process is looked for again only after a while.
    late = spawn(missing, IDLE)
    s = samples(runner)
    assert value(s, "kubenode_process_up", component=missing) == 0.0
    now[0] += tracker.missing_rescan
    s = samples(runner)
    assert value(s, "kubenode_process_up", component=missing) == 1.0
    assert tracker.kept_pids()[missing] == [late.pid]


def test_host_proc_mounted_elsewhere(tmp_path, spawn):
    """As a DaemonSet sees it: the host's procfs mounted at another path."""
    kubelet = spawn("kubelet", IDLE)
    hostproc = tmp_path / "host-proc"
    hostproc.mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(hostproc)], check=True)
    try:
        runner, collector = process_runner(tmp_path, None, "--path.procfs", str(hostproc))
        s = samples(runner)
        assert value(s, "kubenode_process_up", component="kubelet") == 1.0
        kept = collector.tracker._kept["kubelet"]
        assert kubelet.pid in [p.pid for p in kept]
        assert all(p._proc._procfs_path == str(hostproc) for p in kept)
    finally:
        subprocess.run(["umount", str(hostproc)], check=True)


@pytest.mark.parametrize("make, reason", [
    (lambda p: p / "nope", "no such directory"),
    (lambda p: p, "is not a procfs"),
])
def test_unreadable_proc_fails_only_this_collector(tmp_path, caplog, make, reason):
    procfs = make(tmp_path)
    runner, _ = make_runner(["--path.procfs", str(procfs)])
    s = samples(runner)
    assert value(s, "kubenode_collector_success", collector="process") == 0.0
    assert reason in caplog.text and str(procfs) in caplog.text
    assert value(s, "kubenode_process_up", component="kubelet") is None
    # The other collectors still serve (memcg reads /sys; its /proc/cgroups count fails with
    # this procfs, but its read times, yielded before that, are there).
    assert value(s, "kubenode_memcg_stat_read_seconds", cgroup="/") is not None


# --- one odd process among good ones (a fixture /proc tree) -------------------------------

BTIME = 1_700_000_000
PAGE = os.sysconf("SC_PAGE_SIZE")


def stat_text(pid: int, comm: str, utime: int, stime: int, cutime: int = 0, cstime: int = 0,
              starttime: int = 1000) -> str:
    """A /proc/<pid>/stat line as the kernel prints it (52 fields; figures in clock ticks)."""
    fields = ["S", "1"] + ["0"] * 50
    fields[11:15] = [str(utime), str(stime), str(cutime), str(cstime)]
    fields[19] = str(starttime)
    return f"{pid} ({comm}) {' '.join(fields)}\n"


def fake_procfs(root, processes: dict[int, tuple[str, str]]):
    """A /proc tree: /proc/stat with btime, and per process comm, cmdline, stat and statm
    (``processes``: pid -> (comm, stat text)); every process has 1,000 resident pages."""
    root.mkdir()
    (root / "stat").write_text(f"cpu  1 2 3 4\nbtime {BTIME}\n")
    for pid, (comm, stat) in processes.items():
        d = root / str(pid)
        d.mkdir()
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes(comm.encode() + b"\0")
        (d / "stat").write_text(stat)
        (d / "statm").write_text("5000 1000 200 10 0 300 0\n")
    return root


GARBLED = {
    "empty": "",
    "not stat text": "garbage\n",
    "cut short": "202 (kube-proxy) S 1 2 3\n",
    "words for numbers": stat_text(202, "kube-proxy", 7, 3).replace(" 7 3 ", " lots some "),
}


def odd_one_out(tmp_path):
    good = {101: ("kubelet", stat_text(101, "kubelet", 300, 100)),
            201: ("kube-proxy", stat_text(201, "kube-proxy", 50, 50, 20, 20)),
            202: ("kube-proxy", stat_text(202, "kube-proxy", 7, 3))}
    return fake_procfs(tmp_path / "proc", good)


def scrape_twice(runner):
    samples(runner)
    return samples(runner)


@pytest.mark.parametrize("garbled", list(GARBLED), ids=list(GARBLED))
def test_one_garbled_stat_skips_that_process_only(tmp_path, caplog, garbled):
    procfs = odd_one_out(tmp_path)
    (procfs / "202" / "stat").write_text(GARBLED[garbled])
    runner, _ = process_runner(tmp_path, None, "--path.procfs", str(procfs))
    caplog.set_level("DEBUG", logger="exporter")
    s = scrape_twice(runner)
    assert value(s, "kubenode_collector_success", collector="process") == 1.0
    # The rest is read as before: kubelet whole, kube-proxy without the odd process.
    assert value(s, "kubenode_process_cpu_seconds_total", component="kubelet") == pytest.approx(400 / TICKS)
    assert value(s, "kubenode_process_cpu_seconds_total", component="kube-proxy") == pytest.approx(100 / TICKS)
    assert value(s, "kubenode_process_children_cpu_seconds_total", component="kube-proxy") == pytest.approx(40 / TICKS)
    assert value(s, "kubenode_process_resident_memory_bytes", component="kube-proxy") == 1000 * PAGE
    assert value(s, "kubenode_process_processes", component="kube-proxy") == 1.0
    assert value(s, "kubenode_process_up", component="kube-proxy") == 1.0
    # ... and the skip is counted, per component, every component present.
    assert value(s, "kubenode_process_unreadable_processes", component="kube-proxy") == 1.0
    assert value(s, "kubenode_process_unreadable_processes", component="kubelet") == 0.0
    assert value(s, "kubenode_process_unreadable_processes", component="kube-router") == 0.0
    # Said once over two scrapes, in one line naming the process and the file; no traceback.
    said = [r for r in caplog.records if "202" in r.getMessage() and r.levelno >= 20]
    assert len(said) == 1 and said[0].levelname == "WARNING", [r.getMessage() for r in said]
    assert f"{procfs}/202/stat" in said[0].getMessage() and "kube-proxy" in said[0].getMessage()
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_a_kept_process_turning_odd_and_back(tmp_path, caplog):
    """A process read well at first, then garbled (its statm here, its stat after), then
    readable again: skipped while odd, back in the sums after, each change said once."""
    procfs = odd_one_out(tmp_path)
    runner, collector = process_runner(tmp_path, None, "--path.procfs", str(procfs))
    caplog.set_level("DEBUG", logger="exporter")
    s = samples(runner)
    assert value(s, "kubenode_process_processes", component="kube-proxy") == 2.0
    assert value(s, "kubenode_process_unreadable_processes", component="kube-proxy") == 0.0

    (procfs / "202" / "statm").write_text("x\n")
    s = scrape_twice(runner)
    assert value(s, "kubenode_collector_success", collector="process") == 1.0
    assert value(s, "kubenode_process_processes", component="kube-proxy") == 1.0
    assert value(s, "kubenode_process_unreadable_processes", component="kube-proxy") == 1.0
    assert value(s, "kubenode_process_cpu_seconds_total", component="kube-proxy") == pytest.approx(100 / TICKS)

    good_stat = (procfs / "202" / "stat").read_text()
    (procfs / "202" / "statm").write_text("5000 1000 200 10 0 300 0\n")
    (procfs / "202" / "stat").write_text("")
    s = scrape_twice(runner)
    assert value(s, "kubenode_process_unreadable_processes", component="kube-proxy") == 1.0

    (procfs / "202" / "stat").write_text(good_stat)
    s = scrape_twice(runner)
    assert value(s, "kubenode_process_processes", component="kube-proxy") == 2.0
    assert value(s, "kubenode_process_unreadable_processes", component="kube-proxy") == 0.0
    assert value(s, "kubenode_process_cpu_seconds_total", component="kube-proxy") == pytest.approx(110 / TICKS)
    said = [r.getMessage() for r in caplog.records if "202" in r.getMessage() and r.levelno >= 20]
    # unreadable (statm), unreadable (stat: a new reason), readable again
    assert len(said) == 3, said
    assert "statm" in said[0] and "/stat " in said[1] + " " and "readable again" in said[2], said
    assert "Traceback" not in caplog.text


def test_an_odd_process_found_by_the_scan_is_picked_up_once_readable(tmp_path):
    procfs = odd_one_out(tmp_path)
    good_stat = (procfs / "202" / "stat").read_text()
    (procfs / "202" / "stat").write_text("")
    runner, collector = process_runner(tmp_path, None, "--path.procfs", str(procfs))
    s = scrape_twice(runner)
    assert value(s, "kubenode_process_unreadable_processes", component="kube-proxy") == 1.0
    scans = collector.tracker.stats.scans
    (procfs / "202" / "stat").write_text(good_stat)
    s = samples(runner)  # not at the next slow rescan: at once
    assert value(s, "kubenode_process_processes", component="kube-proxy") == 2.0
    assert value(s, "kubenode_process_unreadable_processes", component="kube-proxy") == 0.0
    assert collector.tracker.stats.scans == scans + 1
    # An odd process that exits is no longer counted.
    (procfs / "202" / "stat").write_text("")
    samples(runner)
    import shutil
    shutil.rmtree(procfs / "202")
    s = samples(runner)
    assert value(s, "kubenode_process_unreadable_processes", component="kube-proxy") == 0.0
    assert value(s, "kubenode_process_processes", component="kube-proxy") == 1.0
