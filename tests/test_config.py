import os
import subprocess
import sys

import pytest

from exporter.cli import main, settings_from_args
from exporter.config import ConfigError, flatten


def write(tmp_path, text):
    path = tmp_path / "config.yml"
    path.write_text(text)
    return str(path)


def test_defaults():
    s = settings_from_args([])
    assert s["web.listen-address"] == ":9815"
    assert s["proxy"] == "kube-proxy"
    assert s["path.procfs"] == "/proc"
    assert s["drift.grace-period"] == 60.0


def test_file_nested_and_dotted_keys_and_flags_win(tmp_path):
    path = write(tmp_path, """
web:
  listen-address: "127.0.0.1:1234"
drift.grace-period: 30
proxy: kube-router
node-ip: [10.0.0.1, 10.0.0.2]
""")
    s = settings_from_args(["--config.file", path, "--proxy", "kube-proxy"])
    assert s["web.listen-address"] == "127.0.0.1:1234"
    assert s["drift.grace-period"] == 30.0
    assert s["proxy"] == "kube-proxy"  # the flag wins over the file
    assert s["node-ip"] == ["10.0.0.1", "10.0.0.2"]


def test_repeated_flag_is_a_list():
    s = settings_from_args(["--node-ip", "10.0.0.1", "--node-ip", "fd00::1"])
    assert s["node-ip"] == ["10.0.0.1", "fd00::1"]


@pytest.mark.parametrize("text, message", [
    ("nonsense-key: 1\n", "unknown config file key 'nonsense-key'"),
    ("drift:\n  grace-periodd: 3\n", "did you mean 'drift.grace-period'"),
    ("drift.grace-period: soon\n", "must be a number of seconds"),
    ("proxy: cilium\n", "must be one of kube-proxy, kube-router"),
    ("ipset.include: '(['\n", "not a valid regular expression"),
    ("- a\n- b\n", "must be a mapping"),
    ("web: [\n", "not valid YAML at line"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        settings_from_args(["--config.file", write(tmp_path, text)])


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    assert main(["--config.file", write(tmp_path, "proxy: cilium\n")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cilium" in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["--config.file", str(tmp_path / "nope.yml")]) == 2
    assert "config file" in (err := capsys.readouterr().err) and "cannot read it" in err


def test_process_components_validated(tmp_path):
    path = write(tmp_path, "process:\n  components:\n    - {name: etcd, match: '^etcd$'}\n    - containerd\n")
    s = settings_from_args(["--config.file", path])
    assert s["process.components"] == [{"name": "etcd", "match": "^etcd$"},
                                       {"name": "containerd", "match": "^containerd$"}]
    bad = write(tmp_path, "process:\n  components:\n    - {name: etcd, regex: x}\n")
    with pytest.raises(ConfigError, match="unknown component key"):
        settings_from_args(["--config.file", bad])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e.f": 2}) == {"a.b": 1, "a.c.d": [1], "e.f": 2}


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["desired", "--help"], ["diff", "--help"]])
def test_help_lists_every_flag_with_defaults(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--proxy" in out
    if argv[-1] == "--help" and argv[0] in ("--help", "serve"):
        for flag in ("--web.listen-address", "--drift.grace-period", "--path.procfs",
                     "--collector.ipset", "--no-collector.ipvs_drift"):
            assert flag in out, flag
        assert "(default :9815)" in out and "(default 60" in out


# --- bad values are refused at start: one line, exit 2 ------------------------------------------


def refused_at_start(argv: list[str]) -> str:
    """Run the exporter as a process; it must exit 2 at once (a value let through would serve)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    out = subprocess.run([sys.executable, "-m", "exporter", "--web.listen-address", "127.0.0.1:0", *argv],
                         capture_output=True, text=True, timeout=20, env=env)
    assert out.returncode == 2, out.stderr
    return out.stderr.strip()

@pytest.mark.parametrize("argv, words", [
    (["--proxy.timeout", "nan"], ["proxy.timeout", "finite"]),
    (["--proxy.timeout", "inf"], ["proxy.timeout", "finite"]),
    (["--drift.grace-period=-inf"], ["drift.grace-period", "finite"]),
    (["--drift.follow-interval", "1e400"], ["drift.follow-interval", "finite"]),
    (["--proxy.timeout", "1e300"], ["proxy.timeout", "at most"]),
    (["--proxy.metrics-url", "ftp://127.0.0.1/metrics"], ["proxy.metrics-url", "http://"]),
    (["--proxy.metrics-url", "file:///etc/passwd"], ["proxy.metrics-url", "http://"]),
    (["--proxy.metrics-url", "https://127.0.0.1:10249/metrics"], ["proxy.metrics-url", "http://"]),
    (["--proxy.max-bytes", "inf"], ["proxy.max-bytes", "whole number"]),
])
def test_bad_flag_values_exit_2_with_one_line(argv, words):
    err = refused_at_start(argv)
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("text, words", [
    (b"proxy.max-bytes: .inf\n", ["proxy.max-bytes", "whole number"]),
    (b"drift.max-service-series: -.inf\n", ["drift.max-service-series", "whole number"]),
    (b"proxy:\n  timeout: .nan\n", ["proxy.timeout", "finite"]),
    (b"drift.grace-period: .inf\n", ["drift.grace-period", "finite"]),
    (b"proxy.metrics-url: gopher://127.0.0.1/\n", ["proxy.metrics-url", "http://"]),
    (b"proxy: kube-router\nnode-name: caf\xe9\n", ["{path}", "not UTF-8", "line 2"]),
    (b"\xff\xfeproxy: kube-router\n", ["{path}", "not UTF-8"]),
    (b"node-ip: &a [*a]\n", ["{path}", "cycle", "line 1"]),
    (b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
        b"%c: &%c [%s]\n" % (98 + i, 98 + i, b",".join([b"*%c" % (97 + i)] * 10)) for i in range(8)),
     ["{path}", "more than 10000 nodes"]),
    (b"proxy: kube-proxy\n---\nproxy: kube-router\n", ["{path}", "2 YAML documents"]),
])
def test_bad_config_file_values_exit_2_with_one_line(tmp_path, text, words):
    path = tmp_path / "config.yml"
    path.write_bytes(text)
    err = refused_at_start(["--config.file", str(path)])
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for word in words:
        assert word.format(path=path) in err, err


def test_good_values_still_read(tmp_path):
    # The bounds refuse nothing a real config says: anchors and merge keys, big finite numbers.
    path = write(tmp_path, "base: &b {match: '^kubelet$'}\nprocess:\n  components:\n    - {<<: *b, name: kubelet}\n"
                           "proxy.timeout: 0.5\nproxy.max-bytes: 1e3\nproxy.metrics-url: http://[::1]:10249/metrics\n")
    with pytest.raises(ConfigError, match="unknown config file key 'base.match'"):
        settings_from_args(["--config.file", path])
    path = write(tmp_path, "process:\n  components:\n    - &k {name: kubelet, match: '^kubelet$'}\n"
                           "    - {<<: *k, name: kubelet2}\nproxy.timeout: 0.5\nproxy.max-bytes: 1000.0\n"
                           "proxy.metrics-url: http://[::1]:10249/metrics\n")
    s = settings_from_args(["--config.file", path])
    assert s["process.components"][1] == {"name": "kubelet2", "match": "^kubelet$"}
    assert s["proxy.timeout"] == 0.5 and s["proxy.max-bytes"] == 1000
    assert s["proxy.metrics-url"] == "http://[::1]:10249/metrics"
    # A count too large for a float is still a whole number (it was a traceback).
    s = settings_from_args(["--config.file", write(tmp_path, "drift.max-service-series: 1%s\n" % ("0" * 400))])
    assert s["drift.max-service-series"] == 10**400
