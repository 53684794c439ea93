"""memcg on the host's real cgroup v1: real dying memory cgroups, counted against the kernel.

Each of 200 child cgroups (under a parent named for this test run) runs one short process
that writes a file; the file's page cache stays charged to the child, so after `rmdir` the
child is dying: gone from the directory tree, still counted in /proc/cgroups. Deleting the
files uncharges them and lets the kernel free the children.
"""

import os
import shutil
import time

import pytest

from tests.helpers import samples, value
from tests.memcg_fixtures import make_dying_children, memcg_runner, remove_cgroup_tree

MEMORY_ROOT = "/sys/fs/cgroup/memory"
CHILDREN = 200
pytestmark = pytest.mark.root


def kernel_dying() -> int:
    """The kernel's own numbers, read independently of the collector's code."""
    with open("/proc/cgroups") as fh:
        num = next(int(line.split()[2]) for line in fh if line.startswith("memory\t"))
    live = sum(1 for _ in os.walk(MEMORY_ROOT))
    return num - live


@pytest.fixture
def parent(tmp_path):
    if not os.path.exists(os.path.join(MEMORY_ROOT, "memory.stat")):
        pytest.fail(f"this test needs cgroup v1's memory controller at {MEMORY_ROOT} (see lab.md)")
    if os.geteuid() != 0:
        pytest.fail("this test needs root to make memory cgroups")
    name = f"kubenode-nodeproc-{os.getpid()}"
    path = os.path.join(MEMORY_ROOT, name)
    files = tmp_path / "charged"
    files.mkdir()
    os.mkdir(path)
    try:
        yield name, path, files
    finally:
        remove_cgroup_tree(path)
        shutil.rmtree(files, ignore_errors=True)


def test_dying_count_matches_the_kernel_and_rises_by_what_we_made(parent):
    name, path, files = parent
    runner = memcg_runner("--memcg.paths", name)

    before = samples(runner)
    assert value(before, "kubenode_collector_success", collector="memcg") == 1.0
    assert any(k[0] == "kubenode_memcg_hierarchy_info" and ("version", "1") in k[1] for k in before)
    dying_before = value(before, "kubenode_memcg_cgroups", state="dying")

    make_dying_children(path, files, CHILDREN)

    k1 = kernel_dying()
    after = samples(runner)
    k2 = kernel_dying()
    dying_after = value(after, "kubenode_memcg_cgroups", state="dying")
    live_after = value(after, "kubenode_memcg_cgroups", state="live")
    print(f"dying before {dying_before:.0f}, after {dying_after:.0f}; kernel {k1}..{k2}; live {live_after:.0f}")

    assert value(after, "kubenode_collector_success", collector="memcg") == 1.0
    # Same figure as the kernel's, read just before and after (other cgroups on the host
    # may come and go meanwhile, hence the small margin).
    assert min(k1, k2) - 3 <= dying_after <= max(k1, k2) + 3
    # Every child we removed still holds its page cache, so nearly all are dying; the
    # kernel may free a few on its own, and other cgroups of the host may be freed meanwhile.
    assert dying_after - dying_before >= CHILDREN * 0.8
    assert live_after == pytest.approx(sum(1 for _ in os.walk(MEMORY_ROOT)), abs=3)
    read = value(after, "kubenode_memcg_stat_read_seconds", cgroup=f"/{name}")
    assert read is not None and read > 0
    assert value(after, "kubenode_memcg_stat_read_bytes", cgroup=f"/{name}") > 500

    # Uncharge the page cache: the kernel frees the dying children, and the count follows.
    shutil.rmtree(files)
    deadline = time.monotonic() + 20
    while True:
        freed = samples(runner)
        dying_freed = value(freed, "kubenode_memcg_cgroups", state="dying")
        if dying_after - dying_freed >= CHILDREN * 0.8 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert dying_after - dying_freed >= CHILDREN * 0.8, (dying_after, dying_freed)
