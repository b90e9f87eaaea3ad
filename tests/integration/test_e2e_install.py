"""`make install` layout (scripts/install.sh) and that the installed plugins run as a runtime
execs them: by absolute path through the CNI_BIN_DIR symlink, from any working directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import e2e_helpers as e2e
import pytest

pytestmark = pytest.mark.timeout(900)  # may build the bundle (PyInstaller)
INSTALL = e2e.ROOT / "scripts" / "install.sh"


def install(destdir: str, prefix: str, cni_bin: str, examples: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SBIN_DIR": str(tmp / "sbin") if not destdir else "/usr/local/sbin",
           "SYSTEMD_DIR": str(tmp / "systemd") if not destdir else "/etc/systemd/system"}
    res = subprocess.run([str(INSTALL), destdir, prefix, cni_bin, examples], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res


def test_install_into_destdir_layout(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    install(str(dest), "/opt/ovs-underlay", "/opt/cni/bin", "1", tmp_path)
    prefix = dest / "opt/ovs-underlay"
    for prog in e2e.PROGRAMS:
        assert os.access(prefix / prog, os.X_OK)
    assert (prefix / "_internal").is_dir()
    # Links are relative, so they resolve inside DESTDIR now and on the target system later.
    for name in ("ovs-underlay", "ovs-underlay-ipam"):
        link = dest / "opt/cni/bin" / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == (prefix / name).resolve()
    sbin = dest / "usr/local/sbin/ovs-underlay-ipamd"
    assert sbin.is_symlink() and sbin.resolve() == (prefix / "ovs-underlay-ipamd").resolve()
    assert (prefix / "bin/ovs-underlay-ipamd").resolve() == (prefix / "ovs-underlay-ipamd").resolve()
    assert (prefix / "examples/10-underlay-vlan.conflist").is_file()
    # The unit's --config exists, with the shipped defaults; an edited one is never replaced.
    conf = dest / "etc/ovs-underlay/ipamd.json"
    assert conf.read_text() == (e2e.EXAMPLES / "ipamd.json").read_text()
    for name in ("ovs-underlay-ipamd.service", "ovs-underlay-warm.service"):
        installed = dest / "etc/systemd/system" / name
        assert installed.read_text() == (e2e.EXAMPLES / name).read_text()
    # Nothing was written outside DESTDIR.
    assert not list(tmp_path.glob("*.new.*")) and not list((dest / "opt").glob("ovs-underlay.*"))


def test_install_without_examples_and_reinstall_replaces(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    install(str(dest), "/opt/ovs-underlay", "/opt/cni/bin", "", tmp_path)
    prefix = dest / "opt/ovs-underlay"
    assert not (prefix / "examples").exists()
    (prefix / "stale-file").write_text("x")
    edited = dest / "etc/ovs-underlay/ipamd.json"
    edited.write_text('{"cooldownSeconds": 5}\n')
    install(str(dest), "/opt/ovs-underlay", "/opt/cni/bin", "", tmp_path)
    assert not (prefix / "stale-file").exists()
    assert edited.read_text() == '{"cooldownSeconds": 5}\n'  # the operator's config survives
    assert (prefix / "README.md").is_file()
    assert sorted(p.name for p in (dest / "opt").iterdir()) == ["cni", "ovs-underlay"]


def test_installed_symlinks_run_from_anywhere(bundle: Path, tmp_path: Path) -> None:
    # DESTDIR empty, everything below tmp: the links are what a runtime would exec.
    prefix, cni_bin = tmp_path / "opt/ovs-underlay", tmp_path / "opt/cni/bin"
    install("", str(prefix), str(cni_bin), "", tmp_path)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "VERSION"}
    for plugin in ("ovs-underlay", "ovs-underlay-ipam"):
        exe = cni_bin / plugin
        res = subprocess.run([str(exe)], env=env, cwd="/", capture_output=True, text=True, timeout=30,
                             input='{"cniVersion": "1.0.0"}')
        assert res.returncode == 0, f"{exe}: {res.stderr}"
        assert "1.0.0" in json.loads(res.stdout)["supportedVersions"]
    ipamd = tmp_path / "sbin/ovs-underlay-ipamd"
    assert ipamd.resolve() == (prefix / "ovs-underlay-ipamd").resolve()
    res = subprocess.run([str(ipamd), "--help"], env=env, cwd="/", capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "serve" in res.stdout, res.stderr
