"""The kernel lane's runner fails loudly, with the reason, when its VM cannot run."""

from tests.kernel import lane, vm


def test_missing_kernel_is_a_failure_with_a_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vm, "KERNEL_CACHE", tmp_path / "kernel")
    assert lane.main([]) != 0
    err = capsys.readouterr().err
    assert "no kernel prepared" in err and "prepare.sh" in err


def test_missing_modules_is_a_failure_with_a_reason(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "kernel"
    (cache / "root" / "boot").mkdir(parents=True)
    (cache / "version").write_text("0.0.0-kubenode-ipvs-test\n")
    (cache / "root" / "boot" / "vmlinuz-0.0.0-kubenode-ipvs-test").write_bytes(b"")
    monkeypatch.setattr(vm, "KERNEL_CACHE", cache)
    assert lane.main([]) != 0
    assert "modules of 0.0.0-kubenode-ipvs-test are not installed" in capsys.readouterr().err


def test_missing_qemu_is_a_failure_with_a_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vm, "kernel_image", lambda: ("6.1.0-test", tmp_path / "vmlinuz"))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert lane.main([]) != 0
    assert "qemu-system-x86_64 is missing" in capsys.readouterr().err
