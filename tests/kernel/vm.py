"""Boot the kernel lane's VM once and run one shell script in it (virtme-ng, TCG).

The guest shares the host's root read-only (same Python, venv and project), so
only ``results`` (a --rwdir) and tmpfs are writable there. vng's own exit status
says nothing about the script (it is 255 on success too), so the script writes
its status into ``results`` and we read it back after the VM is gone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
KERNEL_CACHE = PROJECT / ".cache" / "kernel"
PREPARE = "bash tests/kernel/prepare.sh (or scripts/setup.sh --test)"


class LaneError(Exception):
    """The VM could not be run at all; the message says what is missing."""


@dataclass
class VMRun:
    status: int  # the script's exit status, as the guest recorded it
    seconds: float  # wall time of the whole VM run, boot to power-off
    results: Path  # the guest's writable folder, left for the caller to read
    console: str  # vng's output (kernel log and script output)


def kernel_image() -> tuple[str, Path]:
    version_file = KERNEL_CACHE / "version"
    if not version_file.is_file():
        raise LaneError(f"no kernel prepared in {KERNEL_CACHE}; run {PREPARE}")
    version = version_file.read_text().strip()
    image = KERNEL_CACHE / "root" / "boot" / f"vmlinuz-{version}"
    if not image.is_file():
        raise LaneError(f"kernel image {image} is missing; run {PREPARE}")
    if not Path(f"/lib/modules/{version}/modules.dep").is_file():
        raise LaneError(f"modules of {version} are not installed in /lib/modules; run {PREPARE}")
    return version, image


def vng_command() -> str:
    # vng runs virtme-run from PATH: both live beside the venv's python.
    bindir = Path(sys.executable).parent
    vng = bindir / "vng"
    if not vng.exists():
        raise LaneError(f"virtme-ng (vng) is not installed in {bindir}; run scripts/setup.sh --test")
    return str(vng)


def run_in_vm(script: str, name: str, memory: str = "1G", timeout: float = 1800) -> VMRun:
    """Run ``script`` (bash, with $RESULTS set) in one VM boot; return its status."""
    version, image = kernel_image()
    vng = vng_command()
    if shutil.which("qemu-system-x86_64") is None:
        raise LaneError("qemu-system-x86_64 is missing; apt-get install qemu-system-x86")
    results = Path(tempfile.mkdtemp(prefix=f"kubenode-{name}-{os.getpid()}-"))
    wrapped = results / "script.sh"
    status_file = results / "status"
    wrapped.write_text(
        "set -u\n"
        f"export RESULTS={results} KUBENODE_IN_VM=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp\n"
        f"cd {PROJECT}\n"
        "( set -e\n" + script + "\n)\n"
        f"echo $? > {status_file}\n")
    env = dict(os.environ)
    env["PATH"] = f"{Path(vng).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [vng, "--run", str(image), "--disable-kvm", "--memory", memory, "--verbose",
             "--rwdir", str(results), "--exec", f"bash {wrapped}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", env=env, timeout=timeout, cwd=PROJECT)
        console = proc.stdout
    except subprocess.TimeoutExpired as err:
        console = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        raise LaneError(f"the VM did not finish within {timeout:.0f} s; console tail:\n"
                        + "\n".join(console.splitlines()[-30:])) from None
    seconds = time.monotonic() - start
    if not status_file.is_file():
        raise LaneError(f"the VM ended without running the script (vng exit {proc.returncode}, kernel {version}); "
                        "console tail:\n" + "\n".join(console.splitlines()[-30:]))
    return VMRun(int(status_file.read_text().strip() or 1), seconds, results, console)
