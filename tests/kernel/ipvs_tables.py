"""Random IPVS tables in `ipvsadm -R` form, and programming them into the (guest) kernel.

Only for the VM: these functions write to the kernel's IPVS table. Never on the host.
"""

from __future__ import annotations

import ipaddress
import os
import random
import subprocess

SCHEDULERS = ["rr", "wrr", "lc", "wlc", "sh", "mh", "dh", "sed", "nq", "fo", "ovf", "lblc"]
SCHED_FLAGS = {"sh": ["sh-fallback", "sh-port"], "mh": ["mh-fallback", "mh-port"]}
MODULES = ["ip_vs"] + [f"ip_vs_{s}" for s in SCHEDULERS]


def require_vm() -> None:
    if os.environ.get("KUBENODE_IN_VM") != "1":
        raise RuntimeError("refusing to program IPVS outside the kernel lane's VM")


def load_modules() -> None:
    require_vm()
    for module in MODULES:
        subprocess.run(["modprobe", module], check=True)


def ipvsadm(*args: str, stdin: str | None = None) -> str:
    require_vm()
    proc = subprocess.run(["ipvsadm", *args], input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ipvsadm {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def restore(lines: list[str]) -> None:
    """Program a table with one `ipvsadm -R` (one process for thousands of rules)."""
    ipvsadm("-R", stdin="\n".join(lines) + "\n")


def clear() -> None:
    ipvsadm("-C")


def _v4(n: int, base: str) -> str:
    return str(ipaddress.IPv4Address(base) + n)


def _v6(n: int, base: str) -> str:
    return str(ipaddress.IPv6Address(base) + n)


def random_table(rng: random.Random, services: int, max_reals: int = 6) -> list[str]:
    """Rules for ``services`` virtual servers of every kind the reader must handle."""
    lines = []
    used_marks = set()
    for i in range(services):
        ipv6 = rng.random() < 0.25
        kind = rng.choices(["TCP", "UDP", "SCTP", "FWM"], weights=[6, 3, 1, 1])[0]
        if kind == "FWM":
            mark = i + 1
            used_marks.add(mark)
            key = f"-f {mark}" + (" -6" if ipv6 else "")
        else:
            flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[kind]
            port = rng.randint(1, 65535)
            host = f"[{_v6(i, 'fd00:96::')}]" if ipv6 else _v4(i, "10.96.0.0")
            key = f"{flag} {host}:{port}"
        scheduler = rng.choice(SCHEDULERS)
        opts = f"-s {scheduler}"
        if scheduler in SCHED_FLAGS and rng.random() < 0.6:
            opts += " -b " + ",".join(rng.sample(SCHED_FLAGS[scheduler], rng.randint(1, 2)))
        if kind == "UDP" and not ipv6 and rng.random() < 0.3:
            opts += " -o"
        if rng.random() < 0.3:
            opts += f" -p {rng.choice([1, 60, 180, 3600, 10800, 86400, rng.randint(1, 100000)])}"
            if rng.random() < 0.5:
                if ipv6:
                    opts += f" -M {rng.randint(64, 128)}"
                else:
                    opts += f" -M {ipaddress.IPv4Network(f'0.0.0.0/{rng.randint(8, 32)}').netmask}"
        lines.append(f"-A {key} {opts}")
        for j in rng.sample(range(1000), rng.randint(0, max_reals)):
            n = i * 1000 + j
            address = f"[{_v6(n, 'fd00:244::')}]" if ipv6 else _v4(n, "10.128.0.0")
            forward = rng.choice(["-m", "-m", "-m", "-g", "-i"])
            port = rng.randint(1, 65535) if forward == "-m" else 0
            lines.append(f"-a {key} -r {address}:{port} {forward} -w {rng.randint(0, 10)}")
    return lines


def uniform_table(services: int, reals: int = 5, first: int = 0) -> list[str]:
    """A kube-proxy-like table: TCP ClusterIP services, ``reals`` masq backends of weight 1."""
    lines = []
    for i in range(first, first + services):
        vip = f"{_v4(i, '10.96.0.0')}:{80 + i % 7}"
        lines.append(f"-A -t {vip} -s rr")
        for j in range(reals):
            lines.append(f"-a -t {vip} -r {_v4(i * 8 + j, '10.128.0.0')}:8080 -m -w 1")
    return lines
