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
