"""The OVS floor (issue 14): what one ADD of this design cannot go below on this machine, measured
by the bench itself with the primitives alone, no plugin, no fork, no Python beyond the calls:

1. a veth pair with its peer created inside a pod netns, both ends up (core.rtnl: three
   rtnetlink requests, what the plugin sends);
2. a raw OVSDB port add on the bench's underlay bridge until ovs-vswitchd has set its ofport
   (core.ovsdb: one insert transaction, then one `wait` for the ofport: what core.vswitch sends,
   without its ownership guards);
3. one durable SQLite write (WAL, synchronous=FULL: the COMMIT waits for the fsync, as ipamd's).

Each sample runs the three in a row; the row reports their sum, and one row per part. The
samples are taken in the rounds of the serial ADD rows they are compared with (bench/plugin_rows
latency_rows), so they see the same load and the same number of ports on the bridge (0 to the
round's size: ovs-vswitchd reconfigures the whole bridge for each new port, O(ports) on the
userspace datapath); a round's pairs and ports are removed after it, outside the timing.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench.common import netbed, summary

FLOOR = "OVS floor (veth + OVSDB port until ofport + durable SQLite write)"


class Floor:
    def __init__(self, bridge: str, netns: list[netbed.Netns], work: Path) -> None:
        from core import rtnl
        from core.ovsdb import OvsdbClient

        self.bridge = bridge
        self.netns = netns
        self.db = sqlite3.connect(str(work / "floor.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v TEXT)")
        self.ovs = OvsdbClient("unix:/run/openvswitch/db.sock", "Open_vSwitch")
        self.host = rtnl.Rtnl()
        self.parts: dict[str, list[float]] = {"veth": [], "port": [], "sqlite": [], "sum": []}
        self.made: dict[int, str] = {}

    def sample(self, i: int) -> None:
        from core import rtnl
        from core.netns import socket_in_netns
        from core.ovsdb import NamedUuid, Step, eq, op_insert, op_mutate, op_wait, to_datum

        ns = self.netns[i % len(self.netns)]
        name = f"fl{netbed.TOKEN}{i:05d}"[:15]
        peer = f"fl{i}"
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            t0 = time.perf_counter()
            self.host.call(rtnl.veth_add(host=name, peer=peer, peer_netns_fd=fd, peer_mac="02:00:00:00:00:01",
                                         host_mac="02:00:00:00:00:02"))
            self.made[i] = name
            self.host.call(rtnl.link_set(name=name, alias="bench floor"))
            with rtnl.Rtnl(socket_in_netns(ns.path, socket.AF_NETLINK, socket.SOCK_RAW, 0)) as pod:
                pod.call(rtnl.link_set(name=peer, up=True))
            t1 = time.perf_counter()
        finally:
            os.close(fd)
        self.ovs.transact([
            Step(op_insert("Interface", {"name": name}, "i"), "insert interface"),
            Step(op_insert("Port", {"name": name, "interfaces": [NamedUuid("i")]}, "p"), "insert port"),
            Step(op_mutate("Bridge", [eq("name", self.bridge)],
                           [["ports", "insert", to_datum([NamedUuid("p")])]]), "attach", count=1)])
        self.ovs.transact([Step(op_wait("Interface", [eq("name", name)], ["ofport"], "!=",
                                        [{"ofport": to_datum([])}], 10_000), "wait for ofport")])
        t2 = time.perf_counter()
        self.db.execute("BEGIN")
        self.db.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (name, "x" * 200))
        self.db.execute("COMMIT")
        t3 = time.perf_counter()
        for k, v in (("veth", t1 - t0), ("port", t2 - t1), ("sqlite", t3 - t2), ("sum", t3 - t0)):
            self.parts[k].append(v * 1000)

    def remove_all(self) -> None:
        names = list(self.made.values())
        self.made.clear()
        if names:
            args: list[str] = []
            for n in names:
                args += ["--", "--if-exists", "del-port", self.bridge, n]
            netbed.vsctl(*args)
        for n in names:
            netbed.delete_link(n)

    def close(self) -> None:
        self.remove_all()
        self.ovs.close()
        self.host.close()
        self.db.close()

    def rows(self) -> list[dict[str, Any]]:
        p = self.parts
        return [{"row": FLOOR, **summary(p["sum"]), "failed": 0},
                *({"row": f"OVS floor: {what}", **summary(p[key]), "failed": 0}
                  for key, what in (("veth", "veth pair, peer in the pod netns, both up"),
                                    ("port", "OVSDB port add until ofport"),
                                    ("sqlite", "one durable SQLite write")))]


def floor_rows(bridge: str, netns: list[netbed.Netns], work: Path, samples: int) -> list[dict[str, Any]]:
    """The floor alone (`--only floor`): rounds of 20 samples, removed after each round."""
    f = Floor(bridge, netns, work)
    try:
        for i in range(samples):
            f.sample(i)
            if i % 20 == 19:
                f.remove_all()
    finally:
        f.close()
    return f.rows()
