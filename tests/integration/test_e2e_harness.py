"""The e2e harness itself: cnitool is a working CNI runtime and the frozen bundle starts.

If cnitool cannot drive the reference plugins, an e2e failure of ours would mean nothing; so
this runs the reference `bridge` + `host-local` through the same `Cnitool` wrapper the product
tests use, and asserts through `ip -j`.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import e2e_helpers as e2e
import pytest

from testbed import netbed

pytestmark = pytest.mark.timeout(900)  # the first test may build the bundle (PyInstaller)


def test_cnitool_drives_reference_bridge_and_host_local(
        cnitool_bin: Path, tmp_path: Path, netns_factory: Callable[[str], netbed.Netns]) -> None:
    lbr = netbed.uniq("lb")
    conf = {
        "cniVersion": "1.0.0", "name": "refnet",
        "plugins": [{"type": "bridge", "bridge": lbr, "isGateway": True,
                     "ipam": {"type": "host-local", "dataDir": str(tmp_path / "hl"),
                              "ranges": [[{"subnet": "10.201.0.0/24"}]]}}],
    }
    tool = e2e.Cnitool(tmp_path / "net.d", [e2e.REFERENCE_PLUGINS], binary=cnitool_bin)
    e2e.write_conf(tool.netconfpath, conf)
    pods = [netns_factory("hp"), netns_factory("hp")]
    cids = [netbed.container_id("h") for _ in pods]
    try:
        results = [tool.add("refnet", p.path, container_id=c).ok().json() for p, c in zip(pods, cids, strict=True)]
        addrs = [r["ips"][0]["address"] for r in results]
        assert [netbed.addrs("eth0", ns=p.name) for p in pods] == [[a] for a in addrs]
        assert netbed.ping_retry(pods[0].name, addrs[1].split("/")[0])
        # The patched cnitool passed our container id: host-local records it with the lease.
        leased = (tmp_path / "hl" / "refnet" / addrs[0].split("/")[0]).read_text()
        assert leased.startswith(cids[0])
        tool.check("refnet", pods[0].path, container_id=cids[0]).ok()
    finally:
        for p, c in zip(pods, cids, strict=True):
            tool.delete("refnet", p.path, container_id=c)
            e2e.forget_cached_results(c)
        netbed.delete_link(lbr)
    assert not list((tmp_path / "hl" / "refnet").glob("10.*"))  # DEL released both leases


def test_cnitool_reports_plugin_errors(cnitool_bin: Path, tmp_path: Path, pod_netns: netbed.Netns) -> None:
    tool = e2e.Cnitool(tmp_path / "net.d", [e2e.REFERENCE_PLUGINS], binary=cnitool_bin)
    e2e.write_conf(tool.netconfpath, {"cniVersion": "1.0.0", "name": "nope", "type": "no-such-plugin"})
    res = tool.add("nope", pod_netns.path, container_id=netbed.container_id("h"))
    assert res.rc != 0 and "no-such-plugin" in (res.stdout + res.stderr)


def test_frozen_version_answers_without_python(bundle: Path) -> None:
    # No venv on PATH, no PYTHONPATH: the bundle carries its own interpreter.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "VERSION"}
    res = subprocess.run([str(bundle / "ovs-underlay")], env=env, capture_output=True, text=True,
                         input='{"cniVersion": "1.0.0"}', timeout=30, cwd="/")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(out["supportedVersions"])
    assert res.stderr == ""


def test_frozen_version_answers_on_stdout_only(bundle: Path) -> None:
    """How fast it starts is `make bench`'s VERSION row (target 80 ms), not a timed test; what
    keeps it fast (VERSION imports nothing heavy) is test_plugin_datapath's import check."""
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION"}
    for prog in ("ovs-underlay", "ovs-underlay-ipam"):
        res = subprocess.run([str(bundle / prog)], env=env, capture_output=True, input=b"", timeout=60)
        assert res.returncode == 0 and res.stderr == b"", res.stderr
        doc = json.loads(res.stdout)
        assert doc["supportedVersions"][-1] == "1.1.0" and doc["cniVersion"] == "1.1.0", doc


def test_bundle_executables_share_one_internal_dir(bundle: Path) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == ["_internal", *e2e.PROGRAMS]
    libpython = list((bundle / "_internal").glob("libpython3*.so*"))
    assert len(libpython) == 1
