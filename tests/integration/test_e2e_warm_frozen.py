"""The product's warm path end to end: the FROZEN bundle's `ovs-underlay` (the native client,
packaging/shim/ovs-underlay-shim.c) hands ADD/CHECK/DEL to a warm server that was itself started
through the shim (`ovs-underlay --warm-server` execs ovs-underlay-py), on a real OVS bridge,
netns and frozen ipamd; then the server is killed and the next ADD falls back in-process.

Oracles: OVS rows, links and ipamd's leases (netbed, the ipamd CLI); which process ran the verb
comes from the plugin log's `pid=`: exec keeps the pid, so an in-process run (the shim exec'd
ovs-underlay-py) logs the shim's own pid, a warm run logs the forked worker's pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import e2e_helpers as e2e
import plugin_helpers as ph
import pytest

from testbed import netbed

pytestmark = pytest.mark.timeout(900)  # the first test may build the bundle (PyInstaller + gcc)


@pytest.fixture
def warm_server(bundle: Path, tmp_path: Path) -> Iterator[netbed.WarmServer]:
    s = netbed.WarmServer([str(bundle / "ovs-underlay")], str(tmp_path / "run" / "cni-warm.sock"),
                          tmp_path / "warm-server.log")
    s.start()
    yield s
    s.stop()


def _conf(bridge: str, ipamd: netbed.Ipamd) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "name": f"fw{netbed.TOKEN}", "type": "ovs-underlay", "bridge": bridge,
            "vlan": 100,
            "ipam": {"type": "ovs-underlay-ipam", "daemonSocket": ipamd.socket,
                     "subnets": [{"subnet": "192.168.100.0/24", "gateway": "192.168.100.1",
                                  "rangeStart": "192.168.100.10"}],
                     "gatewayCheck": True, "conflictCheck": True}}


class Call:
    """One exec of the frozen `ovs-underlay`, the way a runtime does it."""

    def __init__(self, bundle: Path, sock: str, log: Path) -> None:
        self.bundle, self.sock, self.log = bundle, sock, log

    def __call__(self, command: str, conf: dict[str, Any], cid: str, netns: str) -> tuple[int, str, str, int]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
               "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": str(e2e.REFERENCE_PLUGINS),
               "OVS_UNDERLAY_LOG_FILE": str(self.log), "OVS_UNDERLAY_WARM_SOCKET": self.sock}
        proc = subprocess.Popen([str(self.bundle / "ovs-underlay")], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        out, err = proc.communicate(json.dumps(conf).encode(), timeout=60)
        return proc.returncode, out.decode(), err.decode(errors="replace"), proc.pid

    def pids(self, cid: str, command: str) -> set[int]:
        """pid= of the plugin log lines of one verb for one container."""
        found = set()
        for line in self.log.read_text(errors="replace").splitlines():
            if f" cmd={command} container_id={cid} " in line:
                found.add(int(line.split(" pid=", 1)[1].split()[0]))
        return found


def _leases(ipamd: netbed.Ipamd, cid: str) -> list[str]:
    return [le["ip"] for le in ipamd.leases() if le.get("containerID") == cid]


def test_frozen_shim_hands_calls_to_the_warm_server_and_falls_back_when_it_dies(
        bundle: Path, warm_server: netbed.WarmServer, underlay: netbed.Underlay, frozen_ipamd: netbed.Ipamd,
        netns_factory: Callable[[str], netbed.Netns], tmp_path: Path) -> None:
    # The server went through the shim: the same pid now runs the Python plugin.
    assert os.readlink(f"/proc/{warm_server.proc.pid}/exe") == str(bundle / "ovs-underlay-py")
    call = Call(bundle, warm_server.path, netbed.plugin_log(tmp_path.name))
    conf = _conf(underlay.bridge, frozen_ipamd)
    attached: list[tuple[str, str]] = []
    try:
        ns, cid = netns_factory("fw"), netbed.container_id("fw")
        host = ph.host_ifname(cid, "eth0")
        attached.append((cid, ns.path))
        rc, out, err, pid = call("ADD", conf, cid, ns.path)
        assert rc == 0, (out, err)
        res = json.loads(out)
        assert [i["name"] for i in res["interfaces"]] == [host, "eth0"]
        assert res["interfaces"][1]["sandbox"] == ns.path
        ip = res["ips"][0]["address"]
        assert ip.startswith("192.168.100.")
        port, iface = netbed.port(host), netbed.interface(host)
        assert port is not None and port["tag"] == 100 and iface is not None
        assert iface["external_ids"]["netns"] == ns.path  # the real path, not /proc/<pid>/fd/N
        assert host in netbed.bridge_ports(underlay.bridge) and netbed.link(host) is not None
        assert netbed.addrs("eth0", ns=ns.name) == [ip]
        assert _leases(frozen_ipamd, cid) == [ip.split("/")[0]]
        add_pids = call.pids(cid, "ADD")
        assert add_pids and pid not in add_pids and warm_server.proc.pid not in add_pids  # a worker ran it

        rc, out, err, pid = call("CHECK", dict(conf, prevResult=res), cid, ns.path)
        assert rc == 0 and out == "", (out, err)
        assert call.pids(cid, "CHECK") and pid not in call.pids(cid, "CHECK")

        rc, out, err, pid = call("DEL", conf, cid, ns.path)
        assert rc == 0 and out == "", (out, err)
        attached.pop()
        assert call.pids(cid, "DEL") and pid not in call.pids(cid, "DEL")
        assert netbed.port(host) is None and netbed.link(host) is None
        assert _leases(frozen_ipamd, cid) == []

        # The server dies hard (its socket file stays: connect is refused): the next ADD runs in
        # the shim's own process (it exec'd ovs-underlay-py) and still works.
        warm_server.stop(signal.SIGKILL)
        assert os.path.exists(warm_server.path)
        ns2, cid2 = netns_factory("fw"), netbed.container_id("fw")
        host2 = ph.host_ifname(cid2, "eth0")
        attached.append((cid2, ns2.path))
        rc, out, err, pid = call("ADD", conf, cid2, ns2.path)
        assert rc == 0, (out, err)
        assert "running in-process" in err
        assert call.pids(cid2, "ADD") == {pid}
        ip2 = json.loads(out)["ips"][0]["address"]
        assert netbed.port(host2) is not None and netbed.addrs("eth0", ns=ns2.name) == [ip2]
        assert _leases(frozen_ipamd, cid2) == [ip2.split("/")[0]]
        rc, out, err, pid = call("DEL", conf, cid2, ns2.path)
        assert rc == 0, (out, err)
        attached.pop()
        assert call.pids(cid2, "DEL") == {pid}
        assert netbed.port(host2) is None and netbed.link(host2) is None and _leases(frozen_ipamd, cid2) == []
    finally:
        for c, path in attached:  # a failed assertion must not leave ports, veths or leases
            call("DEL", conf, c, path)


def test_frozen_shim_version_and_help_go_straight_to_python(bundle: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION", "OVS_UNDERLAY_WARM_SOCKET": "/nonexistent/x.sock"}
    res = subprocess.run([str(bundle / "ovs-underlay")], env=env, input=b'{"cniVersion": "1.0.0"}',
                         capture_output=True, timeout=30, cwd="/")
    assert res.returncode == 0 and "1.1.0" in json.loads(res.stdout)["supportedVersions"], res.stderr
    res = subprocess.run([str(bundle / "ovs-underlay"), "--help"], capture_output=True, timeout=30, cwd="/")
    assert res.returncode == 0 and b"--warm-server" in res.stdout


def _worker_of(server_log: Path, plugin: str, command: str, cid: str) -> set[int]:
    """Worker pids the server logged (debug) for one call."""
    return {int(line.split("worker ", 1)[1].split(":", 1)[0]) for line in server_log.read_text().splitlines()
            if f": {plugin} {command} container_id={cid}" in line}


def test_frozen_ipam_shim_under_the_reference_bridge_is_served_warm(
        bundle: Path, frozen_ipamd: netbed.Ipamd, netns_factory: Callable[[str], netbed.Netns],
        tmp_path: Path) -> None:
    """`ovs-underlay-ipam` is the same native client: under the reference `bridge` plugin its
    ADD and DEL are served by the one warm server (the worker that the server logs is the pid
    that logs the IPAM verb), with the address in the pod and the lease in ipamd, and gone after DEL."""
    br, ns, cid = netbed.uniq("ib"), netns_factory("ib"), netbed.container_id("ib")
    server = netbed.WarmServer([str(bundle / "ovs-underlay")], str(tmp_path / "run" / "cni-warm.sock"),
                               tmp_path / "warm-server.log", args=("--log-level", "debug"))
    server.start()  # stopped in the finally below: nothing between here and the try can fail
    log = netbed.plugin_log(tmp_path.name)  # the plugin logs only inside /var/log/ovs-underlay
    conf = {"cniVersion": "1.0.0", "name": f"ib{netbed.TOKEN}", "type": "bridge", "bridge": br,
            "ipam": {"type": "ovs-underlay-ipam", "daemonSocket": frozen_ipamd.socket,
                     "subnets": [{"subnet": "10.233.0.0/24", "gateway": "10.233.0.1"}], "gatewayCheck": False}}
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_CONTAINERID": cid, "CNI_NETNS": ns.path, "CNI_IFNAME": "eth0",
           "CNI_PATH": f"{bundle}:{e2e.REFERENCE_PLUGINS}", "OVS_UNDERLAY_LOG_FILE": str(log),
           "OVS_UNDERLAY_WARM_SOCKET": server.path}

    def bridge(command: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(e2e.REFERENCE_PLUGINS / "bridge")], env={**env, "CNI_COMMAND": command},
                              input=json.dumps(conf).encode(), capture_output=True, timeout=60, cwd="/")

    def plugin_pids(command: str) -> set[int]:
        return {int(line.split(" pid=", 1)[1].split()[0]) for line in log.read_text().splitlines()
                if f" cmd={command} container_id={cid} " in line}

    try:
        res = bridge("ADD")
        assert res.returncode == 0, (res.stdout, res.stderr)
        ip = json.loads(res.stdout)["ips"][0]["address"]
        assert ip.startswith("10.233.0.") and netbed.addrs("eth0", ns=ns.name) == [ip]
        assert _leases(frozen_ipamd, cid) == [ip.split("/")[0]]
        workers = _worker_of(server.log, "ovs-underlay-ipam", "ADD", cid)
        assert len(workers) == 1 and plugin_pids("ADD") == workers
        res = bridge("DEL")
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert _leases(frozen_ipamd, cid) == []
        workers = _worker_of(server.log, "ovs-underlay-ipam", "DEL", cid)
        assert len(workers) == 1 and plugin_pids("DEL") == workers
    finally:
        bridge("DEL")
        netbed.delete_link(br)
        server.stop()
