"""Nodes made of namespaces: several "machines" on one host, each with its own Open vSwitch.

A `Node` is a network namespace running its own ovsdb-server and ovs-vswitchd (own run dir,
database and logs under a temp dir; bridges use the userspace datapath, as everywhere on this
machine). Its "NIC" is a veth whose other end is a trunk port of a `Tor`: an OVS bridge on the
system OVS playing the physical top-of-rack switch, with one router netns per VLAN holding that
VLAN's gateways (netbed.Router). The node's own network is the ToR's native VLAN: the NIC holds
the node's address, the subnet route (the kernel's) and a default route, like a real host's eth.

    [node netns: ovsdb-server + ovs-vswitchd, NIC "eth1"] --veth (trunk, native VLAN)--> [ToR]
    [node netns]                                                     [ToR] --access tag N--> router netns

Why a private OVS per node: the node agent and OVN bind one bridge per name per node and restart
OVS; tests of "two nodes on one ToR" and "OVS restart" need several independent OVS instances that
the tests can kill, and the system OVS must not be disturbed (other runs share it).

Usage (the API is small on purpose; later changes are additive):

    tor = nodebed.make_tor(vlans={100: ["192.168.100.1/24"]})   # node VLAN 10: 172.31.0.1/24, fd00:31::1/64
    node = nodebed.make_node("a")                                # netns + ovsdb-server + ovs-vswitchd
    nic = tor.plug(node)                                         # "eth1" = 172.31.0.11/24 + default route
    node.vsctl("add-br", "br-x", "--", "set", "Bridge", "br-x", "datapath_type=netdev")
    node.exec("ping", "-c1", "172.31.0.1")
    node.restart_ovs(fresh_db=True)                              # OVS restart; optionally losing its config
    node.destroy(); tor.destroy()                                # both idempotent; use in finalizers

Names follow testbed/netbed.py: everything carries the run's TOKEN; `leftovers()` (called by the
session-end check in tests/conftest.py) finds node daemons and run dirs a crashed test left.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import netbed

VSWITCH_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
WORKDIR_PREFIX = f"ou-t{netbed.TOKEN}-node-"
# Default node network: the ToR's native VLAN and its gateways (one per family).
NODE_VLAN = 10
NODE_GATEWAYS = ("172.31.0.1/24", "fd00:31::1/64")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, wait_s: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# Node


@dataclass
class Pod:
    """A hand-plugged pod on a node's bridge: a netns with `ifname`, its host-side veth in the
    node's netns as an OVS port (no product code involved)."""

    netns: netbed.Netns
    host_port: str
    ifname: str
    addresses: list[str]

    @property
    def ns(self) -> str:
        return self.netns.name


@dataclass
class Node:
    """A netns with its own ovsdb-server and ovs-vswitchd. `exec` runs commands inside it with
    OVS_RUNDIR/OVS_DBDIR/OVS_LOGDIR set, so plain `ovs-vsctl` / `ovs-appctl -t ovs-vswitchd`
    talk to this node's OVS."""

    name: str
    netns: netbed.Netns
    workdir: Path
    ovsdb_server: subprocess.Popen[bytes] | None = None
    vswitchd: subprocess.Popen[bytes] | None = None
    pods: list[Pod] = field(default_factory=list)

    # -- where things are --------------------------------------------------------------------

    @property
    def ns(self) -> str:
        return self.netns.name

    @property
    def db_path(self) -> Path:
        return self.workdir / "conf.db"

    @property
    def db_sock(self) -> str:
        """Filesystem path of this node's OVSDB unix socket (reachable from any netns)."""
        return str(self.workdir / "db.sock")

    @property
    def ovsdb(self) -> str:
        """The OVSDB endpoint, `unix:PATH`, as programs take it (`--ovsdb`, `ovsdbSocket`)."""
        return f"unix:{self.db_sock}"

    def env(self) -> dict[str, str]:
        d = str(self.workdir)
        return {**os.environ, "OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d}

    # -- running things in the node ----------------------------------------------------------

    def exec(self, *args: str, check: bool = True, timeout: float = 30, input: str | None = None,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the node's netns (with the node's OVS environment, plus `env`)."""
        cmd = ["ip", "netns", "exec", self.ns, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                             env={**self.env(), **(env or {})})
        if check and res.returncode != 0:
            raise RuntimeError(f"[node {self.name}] {' '.join(args)} failed ({res.returncode}): "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res

    def popen(self, *args: str, env: Mapping[str, str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        """Start a process in the node's netns; tracked so the session-end check kills survivors.
        `ip netns exec` execs in place, so the Popen's pid is the command's own pid."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *args],
                                env={**self.env(), **(env or {})}, **kw)
        netbed.PROCS.append(proc)
        return proc

    def vsctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec("ovs-vsctl", "--timeout=30", *args, check=check, timeout=45)

    def ovs_rows(self, table: str, *columns: str, where: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Rows of this node's OVSDB table, decoded like netbed.ovs_rows."""
        cmd = ["--format=json", "--data=json"]
        if columns:
            cmd.append("--columns=" + ",".join(columns))
        cmd += ["find" if where else "list", table, *where]
        data = json.loads(self.vsctl(*cmd).stdout)
        return [{h: netbed._ovs_value(v) for h, v in zip(data["headings"], row, strict=True)}
                for row in data["data"]]

    def ip_json(self, *args: str) -> Any:
        return netbed.ip_json(*args, ns=self.ns)

    def link(self, name: str) -> dict[str, Any] | None:
        return netbed.link(name, ns=self.ns)

    def addrs(self, ifname: str) -> list[str]:
        return netbed.addrs(ifname, ns=self.ns)

    def ping(self, dst: str, count: int = 1, wait_s: float = 1.0) -> bool:
        return netbed.ping(self.ns, dst, count, wait_s)

    def ping_retry(self, dst: str, attempts: int = 5) -> bool:
        return netbed.ping_retry(self.ns, dst, attempts)

    # -- OVS lifecycle -----------------------------------------------------------------------

    def ovs_running(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.ovsdb_server, self.vswitchd))

    def start_ovs(self, wait_s: float = 30) -> None:
        """Start ovsdb-server (creating the database if missing) and ovs-vswitchd, and return once
        ovs-vswitchd has acknowledged the configuration (cur_cfg caught up with next_cfg)."""
        if not self.db_path.exists():
            subprocess.run(["ovsdb-tool", "create", str(self.db_path), VSWITCH_SCHEMA], check=True,
                           capture_output=True)
        d = self.workdir
        if self.ovsdb_server is None or self.ovsdb_server.poll() is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.db_sock)
            with open(d / "ovsdb-server.out", "ab") as out:
                self.ovsdb_server = self.popen(
                    "ovsdb-server", str(self.db_path), f"--remote=punix:{self.db_sock}",
                    "--remote=db:Open_vSwitch,Open_vSwitch,manager_options",
                    f"--pidfile={d}/ovsdb-server.pid", f"--log-file={d}/ovsdb-server.log",
                    "-vconsole:off", "--no-chdir", stdout=out, stderr=out)
            self._wait(lambda: os.path.exists(self.db_sock), wait_s, "ovsdb-server socket")
            subprocess.run(["ovs-vsctl", f"--db={self.ovsdb}", "--no-wait", "--timeout=10", "init"],
                           check=True, capture_output=True)
        if self.vswitchd is None or self.vswitchd.poll() is not None:
            with open(d / "ovs-vswitchd.out", "ab") as out:
                self.vswitchd = self.popen(
                    "ovs-vswitchd", self.ovsdb, f"--pidfile={d}/ovs-vswitchd.pid",
                    f"--log-file={d}/ovs-vswitchd.log", "-vconsole:off", "--no-chdir",
                    stdout=out, stderr=out)
            # Without --no-wait, ovs-vsctl returns once ovs-vswitchd has applied the change.
            res = subprocess.run(["ovs-vsctl", f"--db={self.ovsdb}", f"--timeout={int(wait_s)}",
                                  "set", "Open_vSwitch", ".", "external_ids:nodebed=ready"],
                                 capture_output=True, text=True)
            if res.returncode != 0 or self.vswitchd.poll() is not None:
                raise RuntimeError(f"[node {self.name}] ovs-vswitchd did not come up: {res.stderr}\n"
                                   + self.log("ovs-vswitchd"))

    def stop_ovs(self, sig: int = signal.SIGTERM, db: bool = True) -> None:
        """Stop ovs-vswitchd (and ovsdb-server unless `db=False`) with `sig` (SIGKILL = a crash).
        The userspace datapath's internal ports are persistent taps: they stay, link down."""
        _stop(self.vswitchd, sig)
        if db:
            _stop(self.ovsdb_server, sig)

    def restart_ovs(self, fresh_db: bool = False, sig: int = signal.SIGTERM) -> None:
        """Stop and start OVS. `fresh_db=True` starts from an empty database, as after a reinstall
        or an OVS container without persistent /etc/openvswitch: every bridge is gone."""
        self.stop_ovs(sig)
        if fresh_db:
            self.db_path.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.workdir / ".conf.db.~lock~")
        self.start_ovs()

    def log(self, daemon: str = "ovs-vswitchd", tail: int = 4000) -> str:
        try:
            return (self.workdir / f"{daemon}.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    # -- pods -------------------------------------------------------------------------------

    def plug_pod(self, bridge: str, addresses: Sequence[str], vlan: int | None = None,
                 gateway: str | None = None, ifname: str = "eth0",
                 external_ids: Mapping[str, str] | None = None) -> Pod:
        """A pod netns whose `ifname` holds `addresses` (IPv6 with nodad), plugged into this node's
        `bridge` as an access port of `vlan` (no tag: a trunk), with a default route via `gateway`."""
        pod_ns = netbed.make_netns("pod")
        host = netbed.uniq("pv")
        try:
            self.exec("ip", "link", "add", host, "type", "veth", "peer", "name", ifname, "netns", pod_ns.name)
            self.exec("ip", "link", "set", host, "up")
            cmd = ["add-port", bridge, host]
            if vlan is not None:
                cmd.append(f"tag={vlan}")
            for k, v in (external_ids or {}).items():
                cmd += ["--", "set", "Interface", host, f"external_ids:{k}={v}"]
            self.vsctl(*cmd)
            for a in addresses:
                pod_ns.exec("ip", "addr", "add", a, "dev", ifname, *(["nodad"] if ":" in a else []))
            pod_ns.exec("ip", "link", "set", ifname, "up")
            if gateway:
                pod_ns.exec("ip", "-6" if ":" in gateway else "-4", "route", "add", "default", "via", gateway)
        except BaseException:
            pod_ns.delete()
            self.exec("ip", "link", "del", host, check=False)
            raise
        pod = Pod(pod_ns, host, ifname, list(addresses))
        self.pods.append(pod)
        return pod

    # -- teardown ---------------------------------------------------------------------------

    def destroy(self) -> None:
        """Stop the daemons, delete the netns (and with it every link and tap in it), the pods and
        the run dir. Idempotent; never raises."""
        for pod in self.pods:
            with contextlib.suppress(Exception):
                pod.netns.delete()
        self.pods.clear()
        with contextlib.suppress(Exception):
            self.stop_ovs()
        with contextlib.suppress(Exception):
            self.netns.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _wait(cond: Callable[[], bool], wait_s: float, what: str) -> None:
        deadline = time.monotonic() + wait_s
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {wait_s}s waiting for {what}")
            time.sleep(0.02)


def make_node(name: str) -> Node:
    """A node named `name` (short: it is part of the netns name) with its OVS running."""
    ns = netbed.make_netns(f"n{name}")
    node = Node(name, ns, Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{name}-")))
    try:
        node.start_ovs()
    except BaseException:
        node.destroy()
        raise
    return node


# ---------------------------------------------------------------------------------------------
# ToR


@dataclass
class Nic:
    """A node's NIC: `name` inside the node's netns, `tor_port` its peer on the ToR bridge."""

    node: Node
    name: str
    tor_port: str
    addresses: list[str]
    gateways: list[str]

    def mac(self) -> str:
        ln = self.node.link(self.name)
        assert ln is not None, f"{self.name} is gone from node {self.node.name}"
        return str(ln["address"])


@dataclass
class Tor:
    """The physical switch: a netdev OVS bridge on the system OVS. Node NICs are trunk ports whose
    untagged traffic belongs to `node_vlan` (a real switch's native VLAN); routers are access
    ports into netns holding the gateways."""

    bridge: str
    node_vlan: int
    routers: dict[int, netbed.Router] = field(default_factory=dict)
    nics: list[Nic] = field(default_factory=list)
    _cleanup: list[Callable[[], object]] = field(default_factory=list)
    _host_ids: Any = field(default_factory=lambda: itertools.count(11))

    def add_router(self, vlan: int, gateways: Sequence[str]) -> netbed.Router:
        r = netbed.add_router(self.bridge, vlan, gateways, self._cleanup)
        self.routers[vlan] = r
        return r

    def remove_router(self, vlan: int) -> None:
        r = self.routers.pop(vlan)
        netbed.vsctl("--if-exists", "del-port", self.bridge, r.tor_port, check=False)
        netbed.delete_link(r.tor_port)
        r.netns.delete()

    def node_gateways(self) -> list[str]:
        return self.routers[self.node_vlan].gateway_ips()

    def plug(self, node: Node, ifname: str = "eth1", addresses: Sequence[str] | None = None,
             gateways: Sequence[str] | None = None, mtu: int | None = None) -> Nic:
        """Give `node` a NIC named `ifname` wired to this switch as a trunk (native VLAN =
        `node_vlan`). It holds `addresses` (default: the next .N / ::N on the node VLAN's subnets),
        the kernel's subnet routes and a default route per family via `gateways` (default: the
        node VLAN's gateways)."""
        if addresses is None:
            n = next(self._host_ids)
            addresses = []
            for g in self.routers[self.node_vlan].gateways:
                ip, plen = g.split("/")
                base = ip.rsplit(":", 1)[0] + ":" if ":" in ip else ip.rsplit(".", 1)[0] + "."
                addresses.append(f"{base}{n:x}/{plen}" if ":" in ip else f"{base}{n}/{plen}")
        if gateways is None:
            gateways = self.node_gateways()
        tor_side, tmp = netbed.uniq("nt"), netbed.uniq("nn")
        netbed.sh("ip", "link", "add", tor_side, "type", "veth", "peer", "name", tmp, "netns", node.ns)
        self._cleanup.append(lambda: netbed.delete_link(tor_side))
        netbed.sh("ip", "link", "set", tor_side, "up")
        if mtu:
            netbed.sh("ip", "link", "set", tor_side, "mtu", str(mtu))
        netbed.vsctl("add-port", self.bridge, tor_side, "--", "set", "Port", tor_side,
                     "vlan_mode=native-untagged", f"tag={self.node_vlan}")
        node.exec("ip", "link", "set", tmp, "name", ifname)
        if mtu:
            node.exec("ip", "link", "set", ifname, "mtu", str(mtu))
        for a in addresses:
            node.exec("ip", "addr", "add", a, "dev", ifname, *(["nodad"] if ":" in a else []))
        node.exec("ip", "link", "set", ifname, "up")
        for gw in gateways:
            node.exec("ip", "-6" if ":" in gw else "-4", "route", "add", "default", "via", gw, "dev", ifname)
        nic = Nic(node, ifname, tor_side, list(addresses), list(gateways))
        self.nics.append(nic)
        return nic

    def destroy(self) -> None:
        for fn in reversed(self._cleanup):
            with contextlib.suppress(Exception):
                fn()
        self._cleanup.clear()
        self.routers.clear()


def make_tor(vlans: Mapping[int, Sequence[str]] | None = None, node_vlan: int = NODE_VLAN,
             node_gateways: Sequence[str] = NODE_GATEWAYS) -> Tor:
    """A ToR with the node network on `node_vlan` (router holding `node_gateways`) and one router
    per entry of `vlans` ({vlan: [gateway CIDRs]})."""
    bridge = netbed.make_bridge("tor")
    tor = Tor(bridge, node_vlan)
    tor._cleanup.append(lambda: netbed.delete_bridge(bridge))
    try:
        tor.add_router(node_vlan, node_gateways)
        for vlan, gws in (vlans or {}).items():
            tor.add_router(vlan, gws)
    except BaseException:
        tor.destroy()
        raise
    return tor


# ---------------------------------------------------------------------------------------------
# Session-end check


def leftovers() -> list[str]:
    """Node run dirs of this run still on disk (their daemons are in netbed.PROCS, which the
    session-end check kills): removed, and named so the run fails."""
    found = []
    for d in glob.glob(os.path.join(tempfile.gettempdir(), WORKDIR_PREFIX + "*")):
        found.append(f"node run dir {d}")
        shutil.rmtree(d, ignore_errors=True)
    return found
