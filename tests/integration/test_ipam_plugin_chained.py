"""`ovs-underlay-ipam` under the reference main plugins (bridge, ptp), against a real ipamd.

The reference plugins from /usr/lib/cni are exec'd directly with CNI_* env and the config on
stdin; they find `ovs-underlay-ipam` (a tiny sh wrapper around `python -m cni.ipam_main`) in a
temp CNI_PATH. They run inside a private "host" netns, so the Linux bridge they create, ptp's
host veth and its forwarding sysctl never touch the root namespace. Oracles: `ip -j addr` in
the pod netns, `tcpdump` on the gateway's side of the segment, and `ipamd leases` through the
admin CLI.

    pod netns --veth(bridge plugin)--> [Linux bridge lb, host netns] --veth--> router netns (gateway)
                                                                  \\--veth--> squatter netns (holds an address)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testbed import netbed

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
REFERENCE = Path("/usr/lib/cni")
SUBNET = "10.231.7"  # private to the test namespaces: nothing of it reaches the root netns


# ---------------------------------------------------------------------------------------------
# harness


@pytest.fixture
def cni_path(tmp_path: Path) -> str:
    d = tmp_path / "cnibin"
    d.mkdir()
    for p in REFERENCE.iterdir():
        (d / p.name).symlink_to(p)
    wrapper = d / "ovs-underlay-ipam"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        "export PYTHONPATH\n"
        f'exec {shlex.quote(PYTHON)} -m cni.ipam_main "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(d)


@dataclass
class Runner:
    cni_path: str
    host: netbed.Netns
    log_file: str
    added: list[tuple[str, dict[str, Any], str, str, str]] = field(default_factory=list)

    def run(self, plugin: str, command: str, conf: dict[str, Any], *, container_id: str = "",
            netns: str = "", ifname: str = "eth0", cni_args: str = "") -> tuple[int, Any, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update({"CNI_COMMAND": command, "CNI_PATH": self.cni_path, "OVS_UNDERLAY_LOG_FILE": self.log_file})
        for key, value in (("CNI_CONTAINERID", container_id), ("CNI_NETNS", netns), ("CNI_IFNAME", ifname),
                           ("CNI_ARGS", cni_args)):
            if value:
                env[key] = value
        cmd = ["ip", "netns", "exec", self.host.name, os.path.join(self.cni_path, plugin)]
        proc = subprocess.run(cmd, input=json.dumps(conf).encode(), env=env, capture_output=True,
                              timeout=60, check=False)
        out = proc.stdout.decode()
        assert "Traceback" not in out
        parsed = json.loads(out) if out.strip() else None
        if command == "ADD":
            self.added.append((plugin, conf, container_id, netns, ifname))
        return proc.returncode, parsed, proc.stderr.decode(errors="replace")

    def cleanup(self) -> None:
        """DEL everything this test ADDed (best effort; the netns finalizers remove the rest)."""
        for plugin, conf, cid, netns, ifname in reversed(self.added):
            self.run(plugin, "DEL", conf, container_id=cid, netns=netns, ifname=ifname)
        self.added.clear()

    def log(self) -> str:
        try:
            return Path(self.log_file).read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture
def runner(cni_path: str, netns_factory: Callable[[str], netbed.Netns], tmp_path: Path) -> Iterator[Runner]:
    r = Runner(cni_path, netns_factory("h"), str(netbed.plugin_log(tmp_path.name)))
    yield r
    r.cleanup()


@dataclass
class Segment:
    """A Linux bridge in the host netns, with netns 'stations' plugged into it."""

    host: netbed.Netns
    bridge: str
    stations: list[tuple[netbed.Netns, str]] = field(default_factory=list)

    def plug(self, ns: netbed.Netns, *cidrs: str) -> str:
        """Attach `ns` (interface `eth0`) to the bridge with `cidrs`; returns that ifname."""
        hside, nside = netbed.uniq("sh"), netbed.uniq("sn")
        netbed.sh("ip", "link", "add", hside, "type", "veth", "peer", "name", nside, "netns", ns.name,
                  ns=self.host.name)
        self.stations.append((ns, hside))
        netbed.sh("ip", "link", "set", hside, "master", self.bridge, "up", ns=self.host.name)
        netbed.sh("ip", "link", "set", nside, "name", "eth0", ns=ns.name)
        for c in cidrs:
            netbed.sh("ip", "addr", "add", c, "dev", "eth0", ns=ns.name)
        netbed.sh("ip", "link", "set", "eth0", "up", ns=ns.name)
        return "eth0"

    def destroy(self) -> None:
        for _, hside in self.stations:
            netbed.delete_link(hside, ns=self.host.name)
        netbed.delete_link(self.bridge, ns=self.host.name)


@pytest.fixture
def segment(runner: Runner) -> Iterator[Segment]:
    lb = netbed.uniq("lb")
    netbed.sh("ip", "link", "add", lb, "type", "bridge", "stp_state", "0", "forward_delay", "0",
              ns=runner.host.name)
    seg = Segment(runner.host, lb)
    try:
        netbed.sh("ip", "link", "set", lb, "up", ns=runner.host.name)
        yield seg
    finally:
        runner.cleanup()  # DEL before the bridge goes (bridge DEL looks for it by name)
        seg.destroy()


def ipam(sock: str, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "type": "ovs-underlay-ipam", "daemonSocket": sock,
        "subnets": [{"subnet": f"{SUBNET}.0/24", "gateway": f"{SUBNET}.1",
                     "rangeStart": f"{SUBNET}.10", "rangeEnd": f"{SUBNET}.20"}],
        "routes": [{"dst": "192.0.2.0/24"}],
        "dns": {"nameservers": [f"{SUBNET}.53"]},
        "conflictCheckWaitMs": 300, "gatewayCheckTimeoutMs": 500,
    }
    conf.update(extra)
    return conf


def bridge_conf(lb: str, sock: str, name: str = "", **ipam_extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": name or f"ipb{netbed.TOKEN}", "type": "bridge", "bridge": lb,
            "isGateway": False, "ipMasq": False, "ipam": ipam(sock, **ipam_extra)}


def ptp_conf(sock: str, **ipam_extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": f"ipp{netbed.TOKEN}", "type": "ptp", "ipMasq": False,
            "ipam": ipam(sock, **ipam_extra)}


def live(d: netbed.Ipamd, cid: str) -> list[str]:
    return [row["address"] for row in d.leases() if row["containerID"] == cid]


# ---------------------------------------------------------------------------------------------
# bridge: the interface exists when IPAM runs -> conflict and gateway probes


def test_bridge_add_check_del_with_probes(runner: Runner, segment: Segment, ipamd: netbed.Ipamd,
                                          netns_factory: Callable[[str], netbed.Netns]) -> None:
    router = netns_factory("gw")
    gw_if = segment.plug(router, f"{SUBNET}.1/24")
    squatter = netns_factory("sq")
    segment.plug(squatter, f"{SUBNET}.10/24")  # holds the first candidate of the range
    pod = netns_factory("pod")
    conf = bridge_conf(segment.bridge, ipamd.socket)
    cid = netbed.container_id("b")

    with netbed.capture(gw_if, "arp", ns=router.name) as arp:
        rc, out, err = runner.run("bridge", "ADD", conf, container_id=cid, netns=pod.path,
                                  cni_args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns{netbed.TOKEN};K8S_POD_NAME=p1")
    assert rc == 0, f"{out} {err} {runner.log()[-3000:]}"
    granted = out["ips"][0]["address"]
    ip = granted.split("/")[0]
    assert granted != f"{SUBNET}.10/24" and granted.startswith(f"{SUBNET}."), f"{runner.log()}\n{ipamd.log()}"
    assert out["ips"][0]["gateway"] == f"{SUBNET}.1"
    assert {"dst": "192.0.2.0/24", "gw": f"{SUBNET}.1"} in out["routes"]
    # the pod got it (bridge configured what we returned)
    assert granted in netbed.addrs("eth0", ns=pod.name)
    assert any(r["dst"] == "192.0.2.0/24" and r.get("gateway") == f"{SUBNET}.1"
               for r in netbed.routes(ns=pod.name))
    # ipamd: a live lease for the attachment; the squatted address is quarantined with its MAC
    assert live(ipamd, cid) == [granted]
    rows = {r["ip"]: r for r in ipamd.leases(all=True)}
    assert rows[f"{SUBNET}.10"]["state"] == "quarantined" and rows[f"{SUBNET}.10"]["conflictMAC"]
    assert rows[ip]["podName"] == "p1"
    # on the wire: RFC 5227 probe (sender 0.0.0.0) for the squatted address, then the gateway
    # probe with the granted address as sender
    text = "\n".join(arp)
    assert re.search(rf"who-has {re.escape(SUBNET)}\.10 tell 0\.0\.0\.0", text), text
    assert re.search(rf"who-has {re.escape(SUBNET)}\.1 tell {re.escape(ip)}\b", text), text
    log = runner.log()
    assert "gateway probe skipped" not in log and "conflict probe skipped" not in log
    # bridge leaves the pod veth down until it configures our result: we raised it for the
    # probes and put it back down before returning
    assert "set eth0 up for the probes" in log and "set eth0 down again after the probes" in log

    rc, out2, err = runner.run("bridge", "CHECK", {**conf, "prevResult": out}, container_id=cid,
                               netns=pod.path)
    assert rc == 0, f"{out2} {err}"

    rc, out3, err = runner.run("bridge", "DEL", conf, container_id=cid, netns=pod.path)
    assert rc == 0, f"{out3} {err}"
    assert live(ipamd, cid) == []
    assert netbed.link("eth0", ns=pod.name) is None
    rc, out3, err = runner.run("bridge", "DEL", conf, container_id=cid, netns=pod.path)
    assert rc == 0, f"repeated DEL: {out3} {err}"

    # CHECK after DEL: our plugin reports the missing reservation (the link is gone too)
    rc, out4, _ = runner.run("ovs-underlay-ipam", "CHECK", {**conf, "prevResult": out}, container_id=cid,
                             netns=pod.path)
    assert rc == 1 and "no ipamd lease" in out4["msg"]


def test_bridge_missing_gateway_fails_103_and_leaves_no_lease(runner: Runner, segment: Segment,
                                                              ipamd: netbed.Ipamd,
                                                              netns_factory: Callable[[str], netbed.Netns]) -> None:
    pod = netns_factory("pod")
    conf = bridge_conf(segment.bridge, ipamd.socket)
    cid = netbed.container_id("g")
    rc, out, err = runner.run("bridge", "ADD", conf, container_id=cid, netns=pod.path)
    assert rc != 0, out
    assert out["code"] == 103, out
    assert f"gateway {SUBNET}.1 unreachable from eth0" in out["msg"]
    assert live(ipamd, cid) == []
    if netbed.link("eth0", ns=pod.name) is not None:  # bridge's own rollback may have removed it
        assert not [a for a in netbed.addrs("eth0", ns=pod.name) if a.startswith(SUBNET)]
    # with the check disabled the same attachment works
    conf_off = bridge_conf(segment.bridge, ipamd.socket, gatewayCheck=False)
    runner.run("bridge", "DEL", conf, container_id=cid, netns=pod.path)
    rc, out, err = runner.run("bridge", "ADD", conf_off, container_id=cid, netns=pod.path)
    assert rc == 0, f"{out} {err}"
    assert live(ipamd, cid) == [out["ips"][0]["address"]]


# ---------------------------------------------------------------------------------------------
# ptp: IPAM runs before the veth exists -> probes skipped, ADD still works


def test_ptp_probes_skipped_add_check_del(runner: Runner, ipamd: netbed.Ipamd,
                                          netns_factory: Callable[[str], netbed.Netns]) -> None:
    pod = netns_factory("pod")
    conf = ptp_conf(ipamd.socket)  # a gateway that nobody answers for: a real probe would fail
    cid = netbed.container_id("p")
    rc, out, err = runner.run("ptp", "ADD", conf, container_id=cid, netns=pod.path)
    assert rc == 0, f"{out} {err} {runner.log()[-3000:]}"
    granted = out["ips"][0]["address"]
    assert granted in netbed.addrs("eth0", ns=pod.name)
    assert live(ipamd, cid) == [granted]
    log = runner.log()
    assert "conflict probe skipped" in log and "gateway probe skipped" in log
    rc, out2, err = runner.run("ptp", "CHECK", {**conf, "prevResult": out}, container_id=cid, netns=pod.path)
    assert rc == 0, f"{out2} {err}"
    rc, out3, err = runner.run("ptp", "DEL", conf, container_id=cid, netns=pod.path)
    assert rc == 0, f"{out3} {err}"
    assert live(ipamd, cid) == []


# ---------------------------------------------------------------------------------------------
# daemon down, GC, STATUS (our plugin exec'd directly for the 1.1.0 verbs)


def test_daemon_down_add_11_del_11(runner: Runner, segment: Segment, ipamd: netbed.Ipamd,
                                   netns_factory: Callable[[str], netbed.Netns]) -> None:
    pod = netns_factory("pod")
    conf = bridge_conf(segment.bridge, ipamd.socket)
    ipamd.stop()
    cid = netbed.container_id("d")
    rc, out, _ = runner.run("bridge", "ADD", conf, container_id=cid, netns=pod.path)
    assert rc != 0 and out["code"] == 11 and ipamd.socket in out["msg"], out
    runner.added.clear()  # nothing to DEL through a dead daemon at teardown
    rc, out, _ = runner.run("bridge", "DEL", conf, container_id=cid, netns=pod.path)
    assert rc != 0 and out["code"] == 11 and ipamd.socket in out["msg"], out
    rc, out, _ = runner.run("ovs-underlay-ipam", "DEL", conf, container_id=cid, netns=pod.path)
    assert rc != 0 and out["code"] == 11 and ipamd.socket in out["msg"], out


def test_gc_removes_exactly_the_stale_leases(runner: Runner, ipamd: netbed.Ipamd,
                                             netns_factory: Callable[[str], netbed.Netns]) -> None:
    pod = netns_factory("pod")
    net_a = {"cniVersion": "1.1.0", "name": f"gca{netbed.TOKEN}", "type": "macvlan", "ipam": ipam(ipamd.socket)}
    net_b = {**net_a, "name": f"gcb{netbed.TOKEN}"}
    keep, stale, other = netbed.container_id("k"), netbed.container_id("s"), netbed.container_id("o")
    for cid, net, ifname in ((keep, net_a, "net1"), (stale, net_a, "net1"), (keep, net_a, "net2"),
                             (other, net_b, "net1")):
        rc, out, err = runner.run("ovs-underlay-ipam", "ADD", net, container_id=cid, netns=pod.path,
                                  ifname=ifname)
        assert rc == 0, f"{out} {err}"
    before = {(r["network"], r["containerID"], r["ifname"]) for r in ipamd.leases()}
    assert (net_a["name"], stale, "net1") in before
    gc = {**net_a, "cni.dev/valid-attachments": [{"containerID": keep, "ifname": "net1"},
                                                 {"containerID": keep, "ifname": "net2"}]}
    rc, out, err = runner.run("ovs-underlay-ipam", "GC", gc)
    assert rc == 0, f"{out} {err}"
    after = {(r["network"], r["containerID"], r["ifname"]) for r in ipamd.leases()}
    assert before - after == {(net_a["name"], stale, "net1")}
    assert (net_b["name"], other, "net1") in after  # another network is not touched
    # the older key alone works too
    gc_old = {**net_a, "cni.dev/attachments": [{"containerID": keep, "ifname": "net1"}]}
    rc, out, err = runner.run("ovs-underlay-ipam", "GC", gc_old)
    assert rc == 0, f"{out} {err}"
    assert {(r["network"], r["containerID"], r["ifname"]) for r in ipamd.leases()} == \
        after - {(net_a["name"], keep, "net2")}


def test_status_ok_exhausted_and_down(runner: Runner, ipamd: netbed.Ipamd,
                                      netns_factory: Callable[[str], netbed.Netns]) -> None:
    pod = netns_factory("pod")
    small = {"subnets": [{"subnet": f"{SUBNET}.0/24", "gateway": f"{SUBNET}.1",
                          "rangeStart": f"{SUBNET}.10", "rangeEnd": f"{SUBNET}.11"}]}
    net = {"cniVersion": "1.1.0", "name": f"st{netbed.TOKEN}", "type": "macvlan",
           "ipam": ipam(ipamd.socket, **small)}
    rc, out, err = runner.run("ovs-underlay-ipam", "STATUS", net)
    assert (rc, out) == (0, None), err
    for i in range(2):
        rc, out, err = runner.run("ovs-underlay-ipam", "ADD", net, container_id=netbed.container_id(f"x{i}"),
                                  netns=pod.path)
        assert rc == 0, f"{out} {err}"
    rc, out, _ = runner.run("ovs-underlay-ipam", "STATUS", net)
    assert rc == 1 and out["code"] == 50 and "no free address" in out["msg"], out
    for plugin, conf, cid, ns, ifname in list(runner.added):
        assert runner.run(plugin, "DEL", conf, container_id=cid, netns=ns, ifname=ifname)[0] == 0
    runner.added.clear()
    ipamd.stop()
    rc, out, _ = runner.run("ovs-underlay-ipam", "STATUS", net)
    assert rc == 1 and out["code"] == 50 and ipamd.socket in out["msg"], out


def test_direct_add_raises_the_link_for_probes_and_restores_it(runner: Runner, segment: Segment,
                                                               ipamd: netbed.Ipamd,
                                                               netns_factory: Callable[[str], netbed.Netns]) -> None:
    """What macvlan/ipvlan do (untestable here: no such kernel modules): the pod link exists
    but is down when IPAM runs. Our plugin probes through it and leaves it down."""
    router = netns_factory("gw")
    segment.plug(router, f"{SUBNET}.1/24")
    pod = netns_factory("pod")
    segment.plug(pod)
    netbed.sh("ip", "link", "set", "eth0", "down", ns=pod.name)
    net = {"cniVersion": "1.1.0", "name": f"dr{netbed.TOKEN}", "type": "macvlan", "master": "eth0",
           "ipam": ipam(ipamd.socket)}
    cid = netbed.container_id("r")
    rc, out, err = runner.run("ovs-underlay-ipam", "ADD", net, container_id=cid, netns=pod.path)
    assert rc == 0, f"{out} {err}"
    assert out == {"cniVersion": "1.1.0", "ips": [{"address": f"{SUBNET}.10/24", "gateway": f"{SUBNET}.1"}],
                   "routes": [{"dst": "192.0.2.0/24", "gw": f"{SUBNET}.1"}],
                   "dns": {"nameservers": [f"{SUBNET}.53"]}}
    assert "UP" not in netbed.link("eth0", ns=pod.name)["flags"]
    assert "gateway 10.231.7.1 reachable" in runner.log()
    # unreachable gateway: 103, the lease released, the link still down. (Another network: the
    # gateway MAC just learnt is cached by ipamd per network/segment for a few seconds.)
    netbed.sh("ip", "addr", "flush", "dev", "eth0", ns=router.name)
    cid2 = netbed.container_id("r")
    rc, out, err = runner.run("ovs-underlay-ipam", "ADD", {**net, "name": f"dq{netbed.TOKEN}"},
                              container_id=cid2, netns=pod.path)
    assert rc == 1 and out["code"] == 103, out
    assert live(ipamd, cid2) == [] and "UP" not in netbed.link("eth0", ns=pod.name)["flags"]
