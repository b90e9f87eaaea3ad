"""ovs-underlay under a real container runtime: podman 4.3 with its CNI backend.

podman loads the shipped `10-underlay-vlan.conflist` (our bridge, datapathType netdev and the
test ipamd's socket substituted) from its network config dir, validates it by exec'ing the
FROZEN plugins from `dist/ovs-underlay/` with VERSION (libcni 1.1.2, cniVersion 1.0.0), and runs
ADD/DEL through libcni for `podman run`/`podman rm`: container ids are podman's, the netns is
podman's (`/run/netns/netns-<uuid>`), static addresses arrive as CNI_ARGS `IP=`/`MAC=`. Everything is
asserted through independent oracles: `ip -j` in the container's netns, `ovs-vsctl` JSON,
ipamd's `leases -o json`, and ping run by podman inside the containers.

podman is confined to one temp dir: its own containers.conf, storage.conf and registries.conf
(env CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, CONTAINERS_REGISTRIES_CONF), vfs storage, file
locks (not /dev/shm/libpod_lock), file events, tmp_dir, network config dir, and a unique cgroup
parent. The containers run a busybox-static rootfs (`--rootfs`), so no image is pulled.

Two things this machine (and CI, same image) forces, both in `e2e.podman_env`:
- OCI runtime runc, not crun: cgroups are hybrid (v1 + a cgroup2 mount holding the `hugetlb`
  controller) and crun 1.8 refuses that outright, even with cgroups disabled: "crun: cgroups in
  hybrid mode not supported, drop all controllers from cgroupv2". runc does not support
  `cgroups=disabled`, so containers get cgroupfs cgroups under our unique parent.
- explicit ulimits: as root podman asks for nofile=1048576, and podman itself lowers its nproc to
  32768, while this root has no CAP_SYS_RESOURCE: "setrlimit `RLIMIT_NOFILE`: Operation not
  permitted".

podman's container ids do not carry the run's token, so the conftest's leftover check cannot see
our attachments: `Podman.teardown` finds them by the network name (which does) and removes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import e2e_helpers as e2e
import pytest
from plugin_helpers import host_ifname

from testbed import netbed

pytestmark = pytest.mark.timeout(900)  # the first test may build the bundle (PyInstaller)

GATEWAY = "192.168.100.1"
STATIC_IP, STATIC_MAC = "192.168.100.150", "0a:58:c0:a8:64:96"
APPLETS = ("sh", "sleep", "ping", "ip", "cat")


def _make_rootfs(root: Path) -> None:
    """A directory for `podman run --rootfs`: busybox-static and the applets the tests use."""
    busybox = netbed.tool("busybox")
    if b"ld-linux" in Path(busybox).read_bytes()[:4096]:  # PT_INTERP: a dynamic build
        raise RuntimeError(f"{busybox} is dynamically linked: install busybox-static")
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        (root / d).mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")


@dataclass
class Podman:
    """podman confined to `base`, attaching containers to one ovs-underlay network."""

    base: Path
    network: str
    bridge: str
    env: dict[str, str]
    cgroup_parent: str
    host_before: dict[str, int]  # e2e.podman_host_state() before podman first ran
    cids: dict[str, str] = field(default_factory=dict)  # container name -> id
    sandboxes: dict[str, str] = field(default_factory=dict)  # container name -> netns path

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}\n"
                                 f"plugin log:\n{self.plugin_log()}")
        return res

    def plugin_log(self) -> str:
        log = netbed.plugin_log("podman")
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def run(self, name: str, *opts: str) -> str:
        """`podman run -d` a sleeping busybox on our network; returns the container id. podman
        stops reading options at the first positional, so `--rootfs DIR` and the command go last."""
        self.cids[name] = ""
        out = self("run", "-d", "--name", name, "--network", self.network, "--cgroup-parent", self.cgroup_parent,
                   *opts, "--rootfs", str(self.base / "rootfs"), "sleep", "300").stdout
        self.cids[name] = out.strip().splitlines()[-1]
        self.sandboxes[name] = self.inspect(name)["NetworkSettings"]["SandboxKey"]
        return self.cids[name]

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self("container", "inspect", name).stdout)[0])

    def exec(self, name: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("exec", name, *cmd, check=check, timeout=60)

    def assert_pings(self, name: str, dst: str, within_s: float = 30.0) -> None:
        """`podman exec NAME ping -c1 DST` until it answers. The userspace datapath sends first
        packets (ARP included) through ovs-vswitchd, which a loaded machine can stall for
        seconds: retry to a deadline, and name what the container saw when it never answers."""
        deadline = time.monotonic() + within_s
        while True:
            res = self.exec(name, "ping", "-c1", "-W2", dst, check=False)
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                break
        ns = os.path.basename(self.sandboxes[name])
        neigh = netbed.sh("ip", "-n", ns, "neigh", "show", check=False).stdout
        fdb = netbed.sh("ovs-appctl", "fdb/show", self.bridge, check=False).stdout
        raise AssertionError(f"{name} cannot ping {dst} within {within_s:.0f}s:\n{res.stdout}{res.stderr}\n"
                             f"neighbours in {ns}:\n{neigh}\nfdb of {self.bridge}:\n{fdb}")

    def our_interfaces(self) -> list[dict[str, Any]]:
        return netbed.ovs_rows("Interface", "name", "external_ids", where=[f"external_ids:network={self.network}"])

    def teardown(self) -> list[str]:
        """Remove everything podman and the plugin made for this network; returns what podman's
        own `rm` had left behind. Safe to call twice."""
        left: list[str] = []
        if self.cids:
            self("rm", "--all", "--force", "--time", "0", check=False, timeout=180)
        for row in self.our_interfaces():
            left.append(f"OVS port {row['name']} ({row['external_ids'].get('container_id')})")
            netbed.vsctl("--if-exists", "del-port", row["name"], check=False)
            netbed.delete_link(row["name"])
        for ln in netbed.links():
            alias = ln.get("ifalias") or ""
            if any(cid and cid in alias for cid in self.cids.values()):
                left.append(f"link {ln['ifname']} ({alias})")
                netbed.delete_link(ln["ifname"])
        for path in self.sandboxes.values():
            if os.path.exists(path):
                left.append(f"netns {path}")
                netbed.sh("ip", "netns", "del", os.path.basename(path), check=False)
        for cid in self.cids.values():
            if cid:
                e2e.forget_cached_results(cid)
        for point in e2e.mounts_under(self.base):
            left.append(f"mount {point}")
            netbed.sh("umount", "-l", point, check=False)
        left += e2e.remove_cgroup_tree(self.cgroup_parent)
        shutil.rmtree(self.base, ignore_errors=True)
        self.cids.clear()
        return left


@pytest.fixture
def podman(bundle: Path, frozen_ipamd: netbed.Ipamd, underlay: netbed.Underlay) -> Iterator[Podman]:
    netbed.tool("podman")
    netbed.tool("runc")
    host_before = e2e.podman_host_state()
    network = netbed.uniq("pn", limit=40)
    base = Path(tempfile.mkdtemp(prefix=f"ou-podman-{netbed.TOKEN}-"))
    env = {**e2e.podman_env(base, network), "OVS_UNDERLAY_LOG_FILE": str(netbed.plugin_log("podman"))}
    pm = Podman(base, network, underlay.bridge, env,
                "/" + netbed.uniq("podcg", limit=40), host_before)
    try:
        _make_rootfs(base / "rootfs")
        conf = e2e.adapt(e2e.load_example("10-underlay-vlan.conflist"), name=network, bridge=underlay.bridge,
                         daemon_socket=frozen_ipamd.socket)
        # The example's 1 s budget for the gateway's ARP answer is tight for the userspace
        # datapath on a loaded 2-core machine (seen: 103 "gateway unreachable ... within 1000 ms").
        conf["plugins"][0]["ipam"]["gatewayCheckTimeoutMs"] = 5000
        # No "capabilities": libcni passes no runtimeConfig, so podman's --ip/--mac-address can
        # reach the plugin only as CNI_ARGS IP=/MAC=.
        assert "capabilities" not in conf["plugins"][0]
        e2e.write_conf(base / "net.d", conf)
        res = pm("network", "inspect", network)
        assert json.loads(res.stdout)[0]["driver"] == "ovs-underlay", f"podman rejected {network}:\n{res.stderr}"
        yield pm
    finally:
        pm.teardown()


def _ip_addr(pm: Podman, name: str) -> tuple[list[str], str]:
    """(IPv4 CIDRs, MAC) of eth0 as the container itself sees them (busybox `ip addr`)."""
    out = pm.exec(name, "ip", "addr", "show", "dev", "eth0").stdout
    mac = re.search(r"link/ether ([0-9a-f:]{17})", out)
    return re.findall(r"inet (\S+)", out), mac.group(1) if mac else ""


def _assert_attached(pm: Podman, ipamd: netbed.Ipamd, name: str) -> str:
    """One container's attachment, through every oracle; returns its address."""
    cid = pm.cids[name]
    (lease,) = [le for le in ipamd.leases(network=pm.network) if le["containerID"] == cid]
    assert lease["ifname"] == "eth0" and lease["state"] == "active", lease
    ip = lease["ip"]
    ns = os.path.basename(pm.sandboxes[name])
    assert pm.sandboxes[name] == f"/run/netns/{ns}"  # podman's own netns-<uuid>
    assert netbed.addrs("eth0", ns=ns) == [f"{ip}/24"]
    assert any(r.get("dst") == "default" and r.get("gateway") == GATEWAY for r in netbed.routes(ns=ns))
    link = netbed.link("eth0", ns=ns)
    assert link is not None
    assert _ip_addr(pm, name) == ([f"{ip}/24"], link["address"])  # what the container sees
    info = pm.inspect(name)
    assert f"{pm.cgroup_parent}/" in Path(f"/proc/{info['State']['Pid']}/cgroup").read_text()
    # podman understood our 1.0.0 result
    net = info["NetworkSettings"]["Networks"][pm.network]
    assert (net["IPAddress"], net["IPPrefixLen"], net["Gateway"], net["MacAddress"]) == (
        ip, 24, GATEWAY, link["address"]), net
    (port,) = netbed.ovs_rows("Port", "name", "tag", "external_ids", where=[f"external_ids:container_id={cid}"])
    assert port["tag"] == 100 and port["name"] == host_ifname(cid, "eth0"), port
    assert port["name"] in netbed.bridge_ports(pm.bridge)
    iface = netbed.interface(port["name"])
    assert iface is not None
    ids = iface["external_ids"]
    assert (ids["owner"], ids["container_id"], ids["ifname"], ids["network"], ids["netns"]) == (
        "ovs-underlay", cid, "eth0", pm.network, pm.sandboxes[name]), ids
    assert ids["pod_name"] == name  # podman sends K8S_POD_NAME=<container name>
    return str(ip)


def _assert_gone(pm: Podman, ipamd: netbed.Ipamd, names: list[str]) -> None:
    cids = [pm.cids[n] for n in names]
    for cid in cids:
        assert not netbed.ovs_rows("Port", "name", where=[f"external_ids:container_id={cid}"]), cid
        assert not [ln for ln in netbed.links() if cid in (ln.get("ifalias") or "")], cid
    assert not [le for le in ipamd.leases(network=pm.network) if le["containerID"] in cids]
    assert not [n for n in names if os.path.exists(pm.sandboxes[n])]
    assert not pm.our_interfaces()
    assert not [f for f in (e2e.LIBCNI_CACHE / "results").glob("*") if any(c in f.name for c in cids)]


def test_podman_loads_the_network_through_version(podman: Podman) -> None:
    # libcni's ValidateNetworkList execs our frozen plugin with VERSION (cniVersion 1.0.0); a
    # failure makes podman skip the file with a warning ("Error validating CNI config file").
    res = podman("network", "inspect", podman.network)
    (net,) = json.loads(res.stdout)
    assert net["name"] == podman.network and net["driver"] == "ovs-underlay", net
    assert res.stderr.strip() == "", res.stderr
    assert podman.network in podman("network", "ls", "--format", "{{.Name}}").stdout.split()


def test_podman_two_containers_on_vlan100(podman: Podman, frozen_ipamd: netbed.Ipamd) -> None:
    a, b = netbed.uniq("pa", limit=63), netbed.uniq("pb", limit=63)
    podman.run(a)
    podman.run(b)
    ips = [_assert_attached(podman, frozen_ipamd, n) for n in (a, b)]
    assert ips[0] != ips[1]
    leases = {le["containerID"]: le["ip"] for le in frozen_ipamd.leases(network=podman.network)}
    assert leases == {podman.cids[a]: ips[0], podman.cids[b]: ips[1]}
    podman.assert_pings(a, ips[1])
    podman.assert_pings(b, ips[0])
    podman.assert_pings(a, GATEWAY)
    podman.assert_pings(b, GATEWAY)
    podman("rm", "--force", "--time", "0", a, b)
    _assert_gone(podman, frozen_ipamd, [a, b])
    assert podman.teardown() == []
    assert e2e.podman_host_state() == podman.host_before  # host config and storage untouched


def test_podman_static_ip_and_mac_reach_the_plugin_as_cni_args(podman: Podman, frozen_ipamd: netbed.Ipamd) -> None:
    s, d = netbed.uniq("ps", limit=63), netbed.uniq("pd", limit=63)
    podman.run(s, "--ip", STATIC_IP, "--mac-address", STATIC_MAC)
    podman.run(d)
    assert _assert_attached(podman, frozen_ipamd, s) == STATIC_IP
    assert _ip_addr(podman, s) == ([f"{STATIC_IP}/24"], STATIC_MAC)
    (lease,) = [le for le in frozen_ipamd.leases(network=podman.network) if le["containerID"] == podman.cids[s]]
    assert lease["mac"] == STATIC_MAC, lease
    other = _assert_attached(podman, frozen_ipamd, d)
    podman.assert_pings(s, other)
    podman.assert_pings(d, STATIC_IP)
    podman.assert_pings(s, GATEWAY)
    podman("rm", "--force", "--time", "0", s, d)
    _assert_gone(podman, frozen_ipamd, [s, d])
    assert podman.teardown() == []
    assert e2e.podman_host_state() == podman.host_before  # host config and storage untouched
