"""`make test-kernel`: one VM boot with real IPVS and cgroup v2, pytest over tests/kernel inside.

    python -m tests.kernel.lane [pytest args...]     e.g.  -k ipvs -x

Prints the inner pytest output (so CI logs carry its "N passed" line) and how
long the VM took; exits with the inner pytest's status, not vng's. Fails with a
reason when the kernel, its modules, qemu or virtme-ng are missing.
"""

from __future__ import annotations

import shlex
import shutil
import sys

from tests.kernel.vm import LaneError, run_in_vm


def main(argv: list[str]) -> int:
    pytest_args = " ".join(shlex.quote(a) for a in argv)
    # The guest root is read-only: no pytest cache, temp dirs on the guest's /tmp (tmpfs).
    script = (
        f"{shlex.quote(sys.executable)} -m pytest -p no:cacheprovider --basetemp=/tmp/kubenode-pytest "
        f"-o console_output_style=classic tests/kernel {pytest_args} > \"$RESULTS/pytest.out\" 2>&1"
    )
    try:
        run = run_in_vm(script, "kernel-lane")
    except LaneError as err:
        print(f"kernel lane: FAILED to run: {err}", file=sys.stderr)
        return 2
    out = run.results / "pytest.out"
    if out.is_file():
        sys.stdout.write(out.read_text(errors="replace"))
    else:
        print("kernel lane: pytest wrote no output; console tail:\n"
              + "\n".join(run.console.splitlines()[-30:]))
    print(f"kernel lane: VM boot + tests took {run.seconds:.1f} s; inner pytest exit status {run.status}")
    sys.stdout.flush()
    if run.status == 0:
        shutil.rmtree(run.results, ignore_errors=True)
    else:
        print(f"kernel lane: results kept in {run.results}")
    return run.status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
