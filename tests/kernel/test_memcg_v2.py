"""memcg on a real cgroup v2 (inside the kernel lane's VM, KUBENODE_IN_VM=1).

Children of a parent with +memory in its subtree_control each run one short process that
writes a file on tmpfs (its shmem pages are charged to the child), then are removed: the
kernel keeps them as dying descendants until the files are deleted. The collector's counts
must be the kernel's own (root cgroup.stat), and rise by what was made. Also: the timed read
of the root memory.stat, and the pods cgroup found on a real v2 tree.
"""

import os
import shutil
import time

import pytest

from tests.helpers import samples, value
from tests.memcg_fixtures import make_dying_children, memcg_runner, remove_cgroup_tree

ROOT = "/sys/fs/cgroup"
CHILDREN = 200
pytestmark = pytest.mark.kernel


def cgroup_stat() -> dict[str, int]:
    with open(os.path.join(ROOT, "cgroup.stat")) as fh:
        return {k: int(v) for k, v in (line.split() for line in fh)}


def enable_memory(cgroup: str) -> None:
    with open(os.path.join(cgroup, "cgroup.subtree_control"), "w") as fh:
        fh.write("+memory")


@pytest.fixture
def v2_parent(tmp_path):
    controllers_file = os.path.join(ROOT, "cgroup.controllers")
    if not os.path.exists(controllers_file):
        pytest.fail(f"{ROOT} is not cgroup v2 (no cgroup.controllers): the VM must mount cgroup2 there")
    with open(controllers_file) as fh:
        if "memory" not in fh.read().split():
            pytest.fail(f"the memory controller is not offered at {ROOT}")
    enable_memory(ROOT)
    name = f"kubenode-nodeproc-{os.getpid()}"
    parent = os.path.join(ROOT, name)
    files = tmp_path / "charged"
    files.mkdir()
    os.mkdir(parent)
    try:
        enable_memory(parent)
        yield name, parent, files
    finally:
        remove_cgroup_tree(parent)
        shutil.rmtree(files, ignore_errors=True)


def test_dying_count_is_nr_dying_descendants_and_rises_by_what_we_made(v2_parent):
    name, parent, files = v2_parent
    runner = memcg_runner("--memcg.paths", name)
    before = samples(runner)
    assert value(before, "kubenode_collector_success", collector="memcg") == 1.0
    assert any(k[0] == "kubenode_memcg_hierarchy_info" and ("version", "2") in k[1] for k in before)
    dying_before = value(before, "kubenode_memcg_cgroups", state="dying")

    make_dying_children(parent, files, CHILDREN)

    k1 = cgroup_stat()
    after = samples(runner)
    k2 = cgroup_stat()
    dying = value(after, "kubenode_memcg_cgroups", state="dying")
    live = value(after, "kubenode_memcg_cgroups", state="live")
    print(f"v2 dying before {dying_before:.0f}, after {dying:.0f}; kernel {k1}; live {live:.0f}")
    assert value(after, "kubenode_collector_success", collector="memcg") == 1.0
    lo, hi = sorted((k1["nr_dying_descendants"], k2["nr_dying_descendants"]))
    assert lo <= dying <= hi
    live_lo, live_hi = sorted((k1["nr_descendants"] + 1, k2["nr_descendants"] + 1))
    assert live_lo <= live <= live_hi
    assert dying - dying_before >= CHILDREN * 0.9
    assert value(after, "kubenode_memcg_stat_read_bytes", cgroup=f"/{name}") > 500

    shutil.rmtree(files)
    deadline = time.monotonic() + 30
    while True:
        freed = value(samples(runner), "kubenode_memcg_cgroups", state="dying")
        if dying - freed >= CHILDREN * 0.9 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert dying - freed >= CHILDREN * 0.9, (dying, freed)


def test_root_memory_stat_read_time_and_pods_cgroup(tmp_path):
    pods = os.path.join(ROOT, "kubepods.slice")
    if os.path.exists(pods):
        pytest.fail(f"{pods} already exists in the VM; this test makes and removes its own")
    enable_memory(ROOT)
    os.mkdir(pods)
    try:
        start = time.perf_counter()
        with open(os.path.join(ROOT, "memory.stat"), "rb") as fh:
            size = len(fh.read())
        direct = time.perf_counter() - start
        s = samples(memcg_runner())
        assert value(s, "kubenode_collector_success", collector="memcg") == 1.0
        assert value(s, "kubenode_memcg_hierarchy_info", version="2", pods_cgroup="/kubepods.slice") == 1
        seconds = value(s, "kubenode_memcg_stat_read_seconds", cgroup="/")
        print(f"v2 root memory.stat: {size} bytes, collector {seconds:.6f} s, direct read {direct:.6f} s")
        assert 0 < seconds < 5
        assert value(s, "kubenode_memcg_stat_read_bytes", cgroup="/") == pytest.approx(size, rel=0.2)
        assert value(s, "kubenode_memcg_stat_read_seconds", cgroup="/kubepods.slice") > 0
    finally:
        os.rmdir(pods)
