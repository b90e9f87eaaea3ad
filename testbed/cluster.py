"""Several nodes' ipamds on one etcd, and a churn of CNI ADD/DEL through the frozen
`ovs-underlay-ipam` against all of them, with faults, for the tests and `make soak-cluster`.

Why here: the integration test (a short churn in `make test`) and the soak (the full 2,000
operations, a report) run the same harness. Every node is a real ipamd process with its own state
directory, socket and node name; every ADD/DEL is a real exec of the frozen plugin, 8 at a time
per node, with static requests mixed in.

The oracles are independent of ipamd's own bookkeeping:
- the plugin's results: at every moment, no address is held by two attachments whose ADD
  succeeded and whose DEL has not started (`Churn.live`), checked on every grant and every sample;
- etcd itself, read with etcdctl: no attachment active twice; after recovery, every live
  attachment is active at its address with its container id (0 lost leases);
- every node's own view (ListLeases over its socket): no address active twice on any node, nor
  across the nodes' own leases.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import netbed
from testbed.etcd import EtcdCluster

ROOT = Path(__file__).resolve().parent.parent
FROZEN_IPAM = ROOT / "dist" / "ovs-underlay" / "ovs-underlay-ipam"
OFFLINE_LINE = "etcd unreachable: serving from this node's own addresses"  # ipamd's log when it goes offline


@dataclass
class Node:
    name: str
    ipamd: netbed.Ipamd
    netns: netbed.Netns
    gone: bool = False  # removed from the cluster (`nodes release`)

    def client(self, timeout_ms: int = 10_000) -> Any:
        from core.ipamd_client import IpamClient

        return IpamClient(self.ipamd.socket, timeout_ms=timeout_ms)


class IpamCluster:
    """`n` ipamd processes (`node0`..) on `etcd`, each with its own work dir and a netns for its
    pods' CNI_NETNS."""

    def __init__(self, workdir: Path, etcd: EtcdCluster, n: int = 3, prefix: str = "",
                 extra_args: Sequence[str] = ()) -> None:
        self.etcd = etcd
        self.prefix = prefix or f"/ou-{netbed.TOKEN}-{os.getpid()}"
        self.nodes: list[Node] = []
        try:
            for i in range(n):
                d = workdir / f"node{i}"
                d.mkdir(parents=True, exist_ok=True)
                args = [*etcd.ipamd_args(self.prefix), "--node-name", f"node{i}", *extra_args]
                ipamd = netbed.start_ipamd(str(d), args)
                self.nodes.append(Node(f"node{i}", ipamd, netbed.make_netns(f"n{i}")))
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        for nd in self.nodes:
            nd.ipamd.stop()
            nd.netns.delete()

    def kill(self, nd: Node) -> None:
        nd.ipamd.stop(signal.SIGKILL)

    def restart(self, nd: Node) -> None:
        nd.ipamd.start(wait_s=30)

    def status(self, nd: Node) -> Any:
        with nd.client() as c:
            return c.list_nodes()

    def wait_online(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        for nd in self.nodes:
            if nd.gone or nd.ipamd.proc is None:
                continue
            while not self.status(nd).online:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{nd.name} did not come back online:\n{nd.ipamd.log()}")
                time.sleep(0.2)

    def etcd_leases(self) -> dict[str, dict[str, Any]]:
        """ip -> record, every lease key in etcd (etcdctl)."""
        kv = self.etcd.get_prefix(f"{self.prefix}/ips/")
        return {k.rsplit("/", 1)[1]: v for k, v in kv.items()}

    def node_leases(self, nd: Node) -> list[dict[str, Any]]:
        with nd.client() as c:
            return [{"ip": ip.address.split("/")[0], "cid": lease.container_id, "node": lease.node,
                     "state": lease.state} for lease in c.list_leases() for ip in lease.ips]


def ipam_conf(name: str, socket: str, ipam: dict[str, Any]) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": name, "type": "ovs-underlay-ipam",
            "capabilities": {"ips": True},
            "ipam": {"type": "ovs-underlay-ipam", "daemonSocket": socket, "gatewayCheck": False,
                     "conflictCheck": False, "timeoutMs": 20_000, **ipam}}


def cni(verb: str, conf: dict[str, Any], nd: Node, cid: str, static: str = "") -> tuple[int, dict[str, Any]]:
    """One exec of the frozen plugin: (0, result) or (code, error JSON)."""
    if static:
        conf = {**conf, "runtimeConfig": {"ips": [static]}}
    env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": nd.netns.path, "CNI_IFNAME": "net1",
           "CNI_PATH": "/usr/lib/cni", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    p = subprocess.run([str(FROZEN_IPAM)], input=json.dumps(conf).encode(), env=env, capture_output=True,
                       timeout=60)
    out: dict[str, Any] = json.loads(p.stdout) if p.stdout.strip() else {}
    if p.returncode == 0:
        return 0, out
    return int(out.get("code", 999)) or 999, out


@dataclass
class Churn:
    """ADD/DEL loops, `per_node` at a time on every node, until `total` operations ran."""

    cluster: IpamCluster
    network: str
    ipam: dict[str, Any]
    total: int
    per_node: int = 8
    statics: Sequence[str] = ()  # addresses requested now and then (one holder at a time)
    static_every: int = 6
    ops: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    live: dict[str, tuple[str, str]] = field(default_factory=dict)  # cid -> (node, ip)
    duplicates: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # unexpected errors
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    paused: set[str] = field(default_factory=set)  # nodes whose workers wait (restarting, removed)
    started: float = 0.0
    _seq: Any = field(default_factory=lambda: itertools.count())
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.started = time.monotonic()
        for nd in self.cluster.nodes:
            conf = ipam_conf(self.network, nd.ipamd.socket, self.ipam)
            for slot in range(self.per_node):
                t = threading.Thread(target=self._worker, args=(nd, conf, slot), daemon=True,
                                     name=f"churn-{nd.name}-{slot}")
                t.start()
                self._threads.append(t)

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def done(self) -> bool:
        with self.lock:
            return self.ops >= self.total

    def progress(self) -> float:
        with self.lock:
            return self.ops / self.total

    def _count(self, what: str) -> None:
        with self.lock:
            self.ops += 1
            self.codes[what] += 1

    def _worker(self, nd: Node, conf: dict[str, Any], slot: int) -> None:
        rnd = random.Random(f"{nd.name}/{slot}")
        while not self.stop.is_set() and not self.done():
            if nd.name in self.paused or nd.gone:
                if nd.gone:
                    return
                time.sleep(0.2)
                continue
            cid = f"test{netbed.TOKEN}{nd.name}s{slot}n{next(self._seq)}"
            static = ""
            if self.statics and rnd.randrange(self.static_every) == 0:
                static = rnd.choice(list(self.statics))
            code, out = cni("ADD", conf, nd, cid, static)
            self._count(f"ADD {code}")
            if code == 0:
                ip = out["ips"][0]["address"].split("/")[0]
                with self.lock:
                    holders = [c for c, (_, i) in self.live.items() if i == ip]
                    if holders:
                        self.duplicates.append(f"{ip}: {cid} on {nd.name} while {holders} hold it")
                    self.live[cid] = (nd.name, ip)
                if static and ip != static:
                    self.failures.append(f"{cid}: asked for {static}, got {ip}")
            elif code not in (11, 101, 102):  # try later, exhausted, a static that is taken
                self.failures.append(f"ADD {cid} on {nd.name}: {code} {out.get('msg')}")
            time.sleep(rnd.random() * 0.05)
            with self.lock:
                self.live.pop(cid, None)
            self._delete(nd, conf, cid)

    def _delete(self, nd: Node, conf: dict[str, Any], cid: str) -> None:
        """DEL until it succeeds (it is idempotent): through a restart, through an outage."""
        for attempt in itertools.count():
            if nd.gone:
                return  # the node was removed: `nodes release` freed its leases
            if nd.name in self.paused:
                time.sleep(0.2)
                continue
            code, out = cni("DEL", conf, nd, cid)
            self._count(f"DEL {code}")
            if code == 0:
                return
            if code != 11 or attempt > 100:
                self.failures.append(f"DEL {cid} on {nd.name}: {code} {out.get('msg')}")
                return
            time.sleep(0.3)

    # ---- the oracles -----------------------------------------------------------------------

    def check_live(self) -> None:
        with self.lock:
            seen: dict[str, str] = {}
            for cid, (_, ip) in self.live.items():
                if ip in seen:
                    self.duplicates.append(f"sample: {ip} held by {seen[ip]} and {cid}")
                seen[ip] = cid

    def check_nodes(self) -> None:
        """Every node's own leases, alone and together: no address active twice."""
        own: dict[str, str] = {}
        for nd in self.cluster.nodes:
            if nd.gone or nd.ipamd.proc is None or nd.name in self.paused:
                continue
            try:
                rows = self.cluster.node_leases(nd)
            except Exception:  # restarting: sampled next time
                continue
            active = [r for r in rows if r["state"] == "active"]
            for ip, n in Counter(r["ip"] for r in active).items():
                if n > 1:
                    self.duplicates.append(f"{nd.name} lists {ip} active {n} times")
            for r in active:
                if r["node"] == nd.name:
                    if r["ip"] in own and own[r["ip"]] != nd.name:
                        self.duplicates.append(f"{r['ip']} active on {own[r['ip']]} and {nd.name}")
                    own[r["ip"]] = nd.name

    def check_etcd(self) -> dict[str, dict[str, Any]]:
        """No attachment active twice in etcd (an address is one key: it cannot be)."""
        leases = self.cluster.etcd_leases()
        owners = Counter((v["containerID"], v["ifname"]) for v in leases.values() if v["state"] == "active")
        for owner, n in owners.items():
            if n > 1:
                self.duplicates.append(f"etcd: {owner} active at {n} addresses")
        return leases

    def check_no_lost_leases(self, settle_s: float = 1.0) -> list[str]:
        """Every live attachment is active in etcd at its address with its container id."""
        time.sleep(settle_s)
        leases = self.check_etcd()
        with self.lock:
            live = dict(self.live)
        lost = []
        for cid, (node, ip) in live.items():
            v = leases.get(ip)
            if v is None or v["state"] != "active" or v["containerID"] != cid or v["node"] != node:
                with self.lock:
                    still = cid in self.live
                if still:
                    lost.append(f"{cid} ({node}, {ip}): etcd has {v}")
        return lost


def sampler(churn: Churn, period_s: float = 1.0,
            etcd_up: Callable[[], bool] = lambda: True) -> threading.Thread:
    """Check the oracles every `period_s` while the churn runs."""

    def run() -> None:
        while not churn.stop.is_set() and not churn.done():
            churn.check_live()
            churn.check_nodes()
            if etcd_up():
                with contextlib.suppress(Exception):  # etcd going down between the check and the read
                    churn.check_etcd()
            time.sleep(period_s)

    t = threading.Thread(target=run, daemon=True, name="churn-sampler")
    t.start()
    return t


@dataclass
class Scenario:
    """What a churn with faults saw (the test asserts on it; the soak prints it)."""

    ops: int = 0
    seconds: float = 0.0
    codes: dict[str, int] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lost_after_outage: list[str] = field(default_factory=list)
    leaked_at_end: list[str] = field(default_factory=list)
    refused_live_release: str = ""
    released_node: dict[str, int] = field(default_factory=dict)
    removed_node_left: list[str] = field(default_factory=list)
    replayed: int = 0
    during_outage: dict[str, int] = field(default_factory=dict)  # results while no etcd member ran
    offline_in_election: list[str] = field(default_factory=list)  # nodes that went offline then
    events: list[str] = field(default_factory=list)


def run_scenario(cluster: IpamCluster, *, network: str, ipam: dict[str, Any], total: int, outage_s: float,
                 statics: Sequence[str] = (), log: Callable[[str], None] = lambda s: None) -> Scenario:
    """The churn with every fault of issue 10, in order, at fractions of the run: kill -9 of one
    ipamd, kill of the etcd leader, every etcd member stopped for `outage_s` while the churn goes
    on, and one node removed with `nodes release`."""
    from core.errors import CoreError

    res = Scenario()
    etcd = cluster.etcd
    up = [True]
    churn = Churn(cluster, network, ipam, total, statics=statics)
    t0 = time.monotonic()

    def event(msg: str) -> None:
        res.events.append(f"{time.monotonic() - t0:6.1f}s {churn.ops:5d} ops  {msg}")
        log(res.events[-1])

    def at(fraction: float) -> None:
        while churn.progress() < fraction and not churn.stop.is_set():
            time.sleep(0.1)

    churn.start()
    sampler(churn, etcd_up=lambda: up[0])
    try:
        victim = cluster.nodes[1]
        at(0.12)
        event(f"kill -9 ipamd of {victim.name}")
        cluster.kill(victim)
        time.sleep(1.0)
        cluster.restart(victim)
        event(f"{victim.name} restarted")

        at(0.28)
        leader = etcd.leader()
        event(f"kill -9 etcd leader {leader.name}")
        etcd.kill(leader)
        time.sleep(3.0)
        etcd.start(leader)
        event(f"etcd {leader.name} back")
        res.offline_in_election = [nd.name for nd in cluster.nodes
                                   if OFFLINE_LINE in Path(nd.ipamd.log_path).read_text(errors="replace")]

        at(0.42)
        event(f"every etcd member stopped for {outage_s:.0f}s")
        up[0] = False
        etcd.stop_all()
        with churn.lock:
            before = Counter(churn.codes)
        time.sleep(outage_s)
        with churn.lock:
            res.during_outage = dict(Counter(churn.codes) - before)
        etcd.start_all()
        event("etcd back")
        cluster.wait_online(90)
        up[0] = True
        event("every node online again")
        res.lost_after_outage = churn.check_no_lost_leases()
        res.replayed = sum(int(cluster.status(nd).replayed) for nd in cluster.nodes)

        at(0.65)
        gone = cluster.nodes[2]
        with cluster.nodes[0].client() as c:
            try:
                c.release_node(gone.name)
            except CoreError as exc:
                res.refused_live_release = getattr(exc, "reason", "") or exc.msg
        gone.gone = True
        churn.paused.add(gone.name)
        time.sleep(1.0)  # its workers finish their call
        gone.ipamd.stop()  # SIGTERM: the heartbeat lease is revoked
        with churn.lock:
            for cid in [c for c, (n, _) in churn.live.items() if n == gone.name]:
                del churn.live[cid]  # its pods went with the node
        # SIGTERM revokes the heartbeat lease; if the shutdown did not get that far (a kill after
        # the stop's grace, a busy machine), the lease expires within its TTL: as an operator
        # would, retry `nodes release` until then instead of failing the run.
        deadline = time.monotonic() + 45
        while True:
            try:
                with cluster.nodes[0].client() as c:
                    r = c.release_node(gone.name)
                break
            except CoreError as exc:
                if "is alive" not in exc.msg or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        res.released_node = {"leases": int(r.leases), "reserved": int(r.reserved), "blocks": int(r.blocks)}
        event(f"nodes release {gone.name}: {res.released_node}")
        time.sleep(0.5)
        left = cluster.etcd.get_prefix(f"{cluster.prefix}/")
        res.removed_node_left = [k for k, v in left.items()
                                 if isinstance(v, dict) and v.get("node") == gone.name
                                 and (v.get("state") in ("active", "reserved") or "/blocks/" in k)]

        churn.join(3600)
        event("churn done")
        churn.check_live()
        churn.check_nodes()
        time.sleep(1.0)
        leases = churn.check_etcd()
        res.leaked_at_end = [f"{ip}: {v}" for ip, v in leases.items()
                             if v["state"] == "active" and v["node"] != gone.name]
    finally:
        churn.stop.set()
        churn.join(60)
    res.ops = churn.ops
    res.seconds = time.monotonic() - t0
    res.codes = dict(churn.codes)
    res.duplicates = list(churn.duplicates)
    res.failures = list(churn.failures)
    return res
