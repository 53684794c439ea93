"""What ``serve`` loads on a node of one mode: the readers of the other modes stay unimported.

Checked in a fresh interpreter (imports are process-wide): the collectors are built as
``serve`` builds them, every default one enabled, with ``--proxy-mode ipvs``.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import sys
from tests.helpers import make_runner
runner, ctx = make_runner(["--proxy-mode", "ipvs", "--web.listen-address", "127.0.0.1:0"])
print("iptables_legacy" if "exporter.readers.iptables_legacy" in sys.modules else "-")
print("iptables_blob" if "exporter.readers.iptables_blob" in sys.modules else "-")
"""


def test_an_ipvs_node_does_not_import_the_iptables_readers():
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # The iptables collector is enabled by default but runs only in iptables mode: its
    # reader (the x_tables blob decoder and what it imports) is built on its first scrape.
    assert done.stdout.split() == ["-", "-"], done.stdout


_CLIENT_PROBE = """
import sys
import exporter.kube.client, exporter.kube.store
heavy = ("asyncio", "lightkube", "httpx2", "httpcore2", "anyio")
print(" ".join(m for m in heavy if m in sys.modules) or "-")
"""


def test_the_kubernetes_client_loads_no_http_library_nor_asyncio():
    # Every exporter process builds the client: a client library with asyncio cost ~15 MB RSS
    # in each; the standard library's http.client and ssl do the same job.
    done = subprocess.run([sys.executable, "-c", _CLIENT_PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["-"], done.stdout
