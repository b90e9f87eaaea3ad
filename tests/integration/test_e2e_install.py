"""`make install` layout (scripts/install.sh) and that the installed plugins run as a runtime
execs them: by absolute path through the CNI_BIN_DIR symlink, from any working directory.

packaging/install-bundle.sh (behind both `make install` and the image's install-cni, run here
under busybox sh as in the image) upgrades a live node: content-named releases, one rename of
the PREFIX link, the previous release kept. Proven with a process that started from the old
release, plugin execs that run all through the upgrade, a legacy flat install and a damaged
release."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import e2e_helpers as e2e
import pytest

from testbed import netbed

pytestmark = pytest.mark.timeout(900)  # may build the bundle (PyInstaller)
INSTALL = e2e.ROOT / "scripts" / "install.sh"


def install(destdir: str, prefix: str, cni_bin: str, examples: str, tmp: Path, *, ok: bool = True,
            **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SBIN_DIR": str(tmp / "sbin") if not destdir else "/usr/local/sbin",
           "SYSTEMD_DIR": str(tmp / "systemd") if not destdir else "/etc/systemd/system", **extra_env}
    res = subprocess.run([str(INSTALL), destdir, prefix, cni_bin, examples], env=env, capture_output=True,
                         text=True, timeout=120)
    assert (res.returncode == 0) == ok, res.stderr
    return res


def test_install_into_destdir_layout(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    install(str(dest), "/opt/ovs-underlay", "/opt/cni/bin", "1", tmp_path)
    prefix = dest / "opt/ovs-underlay"
    # PREFIX is a relative link to one content-named release next to it (packaging/install-bundle.sh).
    release = os.readlink(prefix)
    assert release.startswith(f"ovs-underlay.releases/{e2e.IMAGE_VERSION}-") and prefix.resolve().is_dir(), release
    for prog in e2e.PROGRAMS:
        assert os.access(prefix / prog, os.X_OK)
    assert (prefix / "_internal").is_dir()
    # The links name paths on the target system (DESTDIR is not part of them).
    for name in ("ovs-underlay", "ovs-underlay-ipam"):
        link = dest / "opt/cni/bin" / name
        assert os.readlink(link) == f"/opt/ovs-underlay/{name}"
    for prog in ("ovs-underlay-ipamd", "ovs-underlay-node"):
        assert os.readlink(dest / "usr/local/sbin" / prog) == f"/opt/ovs-underlay/{prog}"
        assert (prefix / "bin" / prog).resolve() == (prefix / prog).resolve()
    assert (prefix / "examples/10-underlay-vlan.conflist").is_file()
    assert (prefix / "examples/kubernetes/20-daemonset.yaml").is_file()
    # The unit's --config exists, with the shipped defaults; an edited one is never replaced.
    conf = dest / "etc/ovs-underlay/ipamd.json"
    assert conf.read_text() == (e2e.EXAMPLES / "ipamd.json").read_text()
    for name in ("ovs-underlay-ipamd.service", "ovs-underlay-warm.service", "ovs-underlay-node.service"):
        installed = dest / "etc/systemd/system" / name
        assert installed.read_text() == (e2e.EXAMPLES / name).read_text()
    # Nothing was written outside DESTDIR, and no staging copy or temporary link is left.
    assert sorted(p.name for p in (dest / "opt").iterdir()) == ["cni", "ovs-underlay", "ovs-underlay.releases"]
    assert [p.name for p in (dest / "opt/ovs-underlay.releases").iterdir()] == [release.split("/")[1]]
    assert not list(dest.rglob("*.tmp.*")) and not list(dest.rglob(".staging.*"))


def test_install_without_examples_and_reinstall_replaces(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    install(str(dest), "/opt/ovs-underlay", "/opt/cni/bin", "", tmp_path)
    prefix = dest / "opt/ovs-underlay"
    assert not (prefix / "examples").exists()
    first = os.readlink(prefix)
    (prefix / "stale-file").write_text("x")  # an edited (damaged) release is not reused
    edited = dest / "etc/ovs-underlay/ipamd.json"
    edited.write_text('{"cooldownSeconds": 5}\n')
    install(str(dest), "/opt/ovs-underlay", "/opt/cni/bin", "", tmp_path)
    assert not (prefix / "stale-file").exists() and os.readlink(prefix) != first
    assert edited.read_text() == '{"cooldownSeconds": 5}\n'  # the operator's config survives
    assert (prefix / "README.md").is_file()
    assert sorted(p.name for p in (dest / "opt").iterdir()) == ["cni", "ovs-underlay", "ovs-underlay.releases"]


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
    # The frozen agent reads the shipped YAML example (PyYAML is in the bundle): the file parses,
    # and on a node the example excludes there is nothing to do (no OVSDB needed for that).
    node = tmp_path / "sbin/ovs-underlay-node"
    base = [str(node), "--config", str(e2e.EXAMPLES / "provider-networks.yaml"), "--ovsdb", "unix:/nonexistent",
            "--state-dir", str(tmp_path / "state")]
    res = subprocess.run([*base, "--node-name", "control-plane-1", "apply", "--dry-run"], env=env, cwd="/",
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout == "", res.stderr
    res = subprocess.run([*base, "--node-name", "worker-1", "apply", "--dry-run"], env=env, cwd="/",
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 4 and "OVSDB at unix:/nonexistent is unreachable" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
# packaging/install-bundle.sh: upgrades of a live node

INSTALL_BUNDLE = e2e.ROOT / "packaging" / "install-bundle.sh"


def busybox_path(tmp: Path) -> str:
    """A PATH of busybox applets only: the tools install-cni has in the image."""
    bb = tmp / "busybox-bin"
    if not bb.exists():
        bb.mkdir()
        busybox = netbed.tool("busybox")
        for applet in e2e.build_image.APPLETS:
            (bb / applet).symlink_to(busybox)
    return str(bb)


def install_bundle(source: Path, root: Path, tmp: Path, version: str = "9.9.9", ok: bool = True,
                   **env: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([netbed.tool("busybox"), "sh", str(INSTALL_BUNDLE), str(source), str(root), "/opt/ovs-underlay",
                          "/opt/cni/bin"], env={"PATH": busybox_path(tmp), "OVS_UNDERLAY_VERSION": version, **env},
                         capture_output=True, text=True, timeout=120)
    assert (res.returncode == 0) == ok, res.stderr
    return res


def test_install_cni_ovnk_alias_is_made_by_the_shared_script_and_a_real_one_stops_it_first(
        bundle: Path, tmp_path: Path) -> None:
    """The image's install-cni (busybox sh, node root under ROOT) makes the ovn-k8s-cni-overlay
    link too with OVNK_ALIAS=1; over a file that is not our link it refuses before it changes
    anything (no release, no plugin links)."""
    root = tmp_path / "node"
    (root / "opt/cni/bin").mkdir(parents=True)
    alias = root / "opt/cni/bin/ovn-k8s-cni-overlay"
    alias.write_text("#!/bin/sh\n# ovn-kubernetes' shim\n")
    res = install_bundle(bundle, root, tmp_path, ok=False, OVNK_ALIAS="1")
    assert "not ours" in res.stderr and alias.read_text().startswith("#!/bin/sh")
    assert not (root / "opt/ovs-underlay").exists() and not (root / "opt/cni/bin/ovs-underlay").exists()
    res = install_bundle(bundle, root, tmp_path, ok=False, OVNK_ALIAS="yes")
    assert "OVNK_ALIAS" in res.stderr
    alias.unlink()
    install_bundle(bundle, root, tmp_path, OVNK_ALIAS="1")
    assert os.readlink(alias) == "/opt/ovs-underlay/ovs-underlay"
    assert os.readlink(root / "opt/cni/bin/ovs-underlay") == "/opt/ovs-underlay/ovs-underlay"
    install_bundle(bundle, root, tmp_path, OVNK_ALIAS="1")  # again: our own link is fine


def variant(bundle: Path, tmp: Path, name: str) -> Path:
    """The bundle plus one file: another content, so another release."""
    out = tmp / f"bundle-{name}"
    shutil.copytree(bundle, out, symlinks=True)
    (out / "VARIANT").write_text(name)
    return out


def releases(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "opt/ovs-underlay.releases").iterdir())


def current(root: Path) -> str:
    return os.readlink(root / "opt/ovs-underlay").split("/")[-1]


def test_upgrades_never_break_a_running_process_or_a_plugin_call(bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "node"
    a, b, c = (variant(bundle, tmp_path, n) for n in "abc")
    install_bundle(a, root, tmp_path)
    rel_a = current(root)
    # A daemon started from the first release, as ipamd or the warm server would be.
    d = netbed.Ipamd(str(tmp_path / "ipamd.sock"), str(tmp_path / "state"), None, str(tmp_path / "ipamd.log"),
                     [str(root / "opt/ovs-underlay/ovs-underlay-ipamd"), "serve", "--socket", str(tmp_path / "ipamd.sock"),
                      "--state-dir", str(tmp_path / "state"), *netbed.NO_RECONCILE])
    (tmp_path / "state").mkdir()
    d.start()
    try:
        assert d.proc is not None
        assert os.readlink(f"/proc/{d.proc.pid}/exe") == str(root / "opt/ovs-underlay.releases" / rel_a / "ovs-underlay-ipamd")
        # Plugin execs through the paths the runtime uses, all through two upgrades.
        stop, calls, failures = threading.Event(), [0], []

        def runtime() -> None:
            while not stop.is_set():
                for plugin in ("ovs-underlay", "ovs-underlay-ipam"):
                    calls[0] += 1
                    try:
                        res = subprocess.run([str(root / "opt/ovs-underlay" / plugin)], input='{"cniVersion": "1.0.0"}',
                                             env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}, cwd="/",
                                             capture_output=True, text=True, timeout=30)
                    except OSError as exc:  # the path was missing: what a runtime would see too
                        failures.append(f"{plugin}: {exc}")
                        continue
                    if res.returncode != 0 or "supportedVersions" not in res.stdout:
                        failures.append(f"{plugin}: {res.returncode} {res.stdout} {res.stderr}")

        threads = [threading.Thread(target=runtime) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for src in (b, a):
                install_bundle(src, root, tmp_path)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert failures == [] and calls[0] >= 4, (calls, failures[:3])
        assert current(root) == rel_a
        (rel_b,) = [r for r in releases(root) if r != rel_a]
        assert releases(root) == sorted([rel_a, rel_b])  # this one and the previous one
        # A third release: the one before the previous goes; the daemon's release stays.
        install_bundle(c, root, tmp_path)
        assert current(root) not in (rel_a, rel_b) and releases(root) == sorted([rel_a, current(root)])
        assert d.cli("health", check=False).returncode == 0 and d.proc.poll() is None
        assert os.path.exists(f"/proc/{d.proc.pid}/exe") and "(deleted)" not in os.readlink(f"/proc/{d.proc.pid}/exe")
    finally:
        d.stop()
    assert not list(root.rglob("*.tmp.*")) and not list(root.rglob(".staging.*"))


def test_install_bundle_takes_over_a_flat_install_and_refuses_bad_paths(bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "node"
    (root / "opt").mkdir(parents=True)
    shutil.copytree(bundle, root / "opt/ovs-underlay", symlinks=True)  # a `make install` of before
    res = install_bundle(bundle, root, tmp_path)
    assert "moved the old" in res.stderr
    legacy = [r for r in releases(root) if r.startswith("legacy-")]
    assert len(legacy) == 1 and current(root).startswith("9.9.9-")  # the old one kept as the previous
    assert (root / "opt/ovs-underlay/ovs-underlay-ipam").is_file()
    for bad in ("opt/ovs-underlay", "/opt/../etc/x", "/opt/ovs underlay", "/opt/ovs-underlay/"):
        res = subprocess.run([netbed.tool("busybox"), "sh", str(INSTALL_BUNDLE), str(bundle), str(root), bad, "/opt/cni/bin"],
                             env={"PATH": busybox_path(tmp_path)}, capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "PREFIX" in res.stderr, (bad, res.stderr)
    res = subprocess.run([netbed.tool("busybox"), "sh", str(INSTALL_BUNDLE), str(tmp_path), str(root), "/opt/x", "/opt/cni/bin"],
                         env={"PATH": busybox_path(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "not a bundle" in res.stderr
    assert not (root / "opt/x").exists() and not (root / "opt/x.releases").exists()


def test_ovnk_alias_runs_our_plugin_and_never_replaces_a_real_ovn_kubernetes(bundle: Path, tmp_path: Path) -> None:
    """OVNK_ALIAS=1: CNI_BIN_DIR/ovn-k8s-cni-overlay -> ovs-underlay, so an ovn-kubernetes NAD
    ("type": "ovn-k8s-cni-overlay") runs unchanged; refused over a file that is not our link."""
    prefix, cni_bin = tmp_path / "opt/ovs-underlay", tmp_path / "opt/cni/bin"
    install("", str(prefix), str(cni_bin), "", tmp_path)
    assert not (cni_bin / "ovn-k8s-cni-overlay").exists()  # opt-in only
    install("", str(prefix), str(cni_bin), "", tmp_path, OVNK_ALIAS="1")
    alias = cni_bin / "ovn-k8s-cni-overlay"
    assert alias.is_symlink() and os.readlink(alias) == str(prefix / "ovs-underlay")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "VERSION"}
    res = subprocess.run([str(alias)], env=env, cwd="/", capture_output=True, text=True, timeout=30,
                         input='{"cniVersion": "1.0.0", "name": "n", "type": "ovn-k8s-cni-overlay"}')
    assert res.returncode == 0 and "1.1.0" in json.loads(res.stdout)["supportedVersions"], res.stderr
    install("", str(prefix), str(cni_bin), "", tmp_path, OVNK_ALIAS="1")  # again: our own link is fine
    alias.unlink()
    alias.write_text("#!/bin/sh\n# ovn-kubernetes' shim\n")
    res = install("", str(prefix), str(cni_bin), "", tmp_path, ok=False, OVNK_ALIAS="1")
    assert "not ours" in res.stderr and alias.read_text().startswith("#!/bin/sh")
