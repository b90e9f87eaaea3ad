"""Cluster-wide leases on etcd (issue 10): real etcd members (Debian's etcd-server, on loopback
ports, started and removed by the fixtures), real ipamd processes as nodes, the frozen
`ovs-underlay-ipam` for the churn.

The full churn (2,000 ADD/DEL, a 30 s outage) is `make soak-cluster` (bench/soak_cluster.py): the
frozen plugin costs ~0.2 s of CPU per exec on this 2-core machine, so CI runs the same scenario,
with every fault, over CHURN_OPS operations and a CHURN_OUTAGE_S outage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from netaddr import IPAddress

from core.errors import IpamdRefused
from core.ipamd_client import IpamClient
from core.spec import parse_ipam
from testbed import netbed
from testbed.cluster import IpamCluster, run_scenario
from testbed.etcd import EtcdCluster, start_cluster

CHURN_OPS = int(os.environ.get("OU_CLUSTER_CHURN_OPS", "360"))
CHURN_OUTAGE_S = float(os.environ.get("OU_CLUSTER_OUTAGE_S", "12"))

# One /24 with exclusions (never granted), a reserved range (statics only) and a short cool-down
# so that addresses come back during the outage.
CHURN_IPAM = {"subnets": [{"subnet": "10.77.0.0/24", "gateway": "10.77.0.1"}],
              "exclude": ["10.77.0.240-10.77.0.254", "10.77.0.100-10.77.0.109"],
              "reserved": ["10.77.0.230-10.77.0.239"], "cooldownSeconds": 2}
STATICS = ("10.77.0.235", "10.77.0.5", "10.77.0.77")


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = start_cluster(3, workdir=str(tmp_path / "etcd"))
    yield c
    c.destroy()


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = start_cluster(1, workdir=str(tmp_path / "etcd"))
    yield c
    c.destroy()


@pytest.fixture
def cluster3(etcd3: EtcdCluster, tmp_path: Path) -> Iterator[IpamCluster]:
    c = IpamCluster(tmp_path, etcd3, 3)
    yield c
    c.destroy()


def pool(**ipam: object) -> object:
    return parse_ipam(ipam).pool


@pytest.mark.timeout(900)
def test_churn_through_the_frozen_plugin_with_every_fault(bundle: Path, cluster3: IpamCluster) -> None:
    """3 nodes, 8 ADD/DEL at a time each, statics mixed in; kill -9 of an ipamd, of the etcd
    leader, every etcd member stopped while the churn goes on, a node removed: 0 duplicates at
    any sample (plugin results, etcd, every node), 0 lost leases after the outage, the queued
    releases applied (nothing left active at the end), the removed node's leases freed."""
    res = run_scenario(cluster3, network="churn", ipam=CHURN_IPAM, total=CHURN_OPS, outage_s=CHURN_OUTAGE_S,
                       statics=STATICS, log=print)
    report = json.dumps({k: v for k, v in res.__dict__.items()}, indent=1, default=str)
    assert res.ops >= CHURN_OPS, report
    assert res.duplicates == [], report
    assert res.failures == [], report
    assert res.lost_after_outage == [], report
    assert res.offline_in_election == [], report  # a leader election is not an outage
    assert res.leaked_at_end == [], report
    assert res.refused_live_release == "NODE_ALIVE", report
    assert res.removed_node_left == [], report
    assert res.replayed > 0, report  # the outage was served, and replayed
    assert res.during_outage.get("ADD 0", 0) > 0 and res.during_outage.get("DEL 0", 0) > 0, report
    assert res.codes.get("ADD 0", 0) > CHURN_OPS // 4, report
    print(report)


def test_a_28_shared_by_three_nodes_fills_to_the_last_address(etcd1: EtcdCluster, tmp_path: Path) -> None:
    """13 allocatable addresses, 3 nodes taking turns: every address is handed out exactly once,
    whichever node's block it is in (borrowing), and only then is the pool exhausted (101)."""
    c = IpamCluster(tmp_path, etcd1, 3)
    try:
        p = pool(subnets=[{"subnet": "10.78.0.0/28", "gateway": "10.78.0.1"}])
        got: list[str] = []
        clients = [nd.client() for nd in c.nodes]
        for i in range(13):
            a = clients[i % 3].allocate(network="small", pool=p, container_id=f"c{i}", ifname="eth0")
            got.append(str(a.ips[0].address.ip))
        assert sorted(got, key=lambda s: IPAddress(s)) == [f"10.78.0.{i}" for i in range(2, 15)]
        for cl in clients:
            with pytest.raises(IpamdRefused) as info:
                cl.allocate(network="small", pool=p, container_id="one-too-many", ifname="eth0")
            assert info.value.reason == "POOL_EXHAUSTED"
        leases = c.etcd_leases()
        assert sorted(leases) == sorted(got) and {v["state"] for v in leases.values()} == {"active"}
        assert {v["node"] for v in leases.values()} == {"node0", "node1", "node2"}
        for cl in clients:
            cl.close()
    finally:
        c.destroy()


def test_statics_definitions_gc_and_nodes(etcd1: EtcdCluster, tmp_path: Path) -> None:
    """A static address is reserved cluster-wide whichever node's block holds it; a node whose
    definition holds back fewer addresses is refused (7); GC and release touch only the calling
    node's leases; `nodes` lists the blocks; `nodes release` refuses a live node."""
    c = IpamCluster(tmp_path, etcd1, 2, extra_args=["--outage-reserve", "0"])
    try:
        n0, n1 = c.nodes
        base = {"subnets": [{"subnet": "10.79.0.0/24", "gateway": "10.79.0.1"}], "exclude": ["10.79.0.200-10.79.0.254"]}
        p = pool(**base)
        with n0.client() as a, n1.client() as b:
            first = a.allocate(network="n", pool=p, container_id="a0", ifname="eth0")
            assert str(first.ips[0].address.ip) == "10.79.0.2"  # node0 claimed block 0: .2-.17
            # node1 reserves .9 (in node0's block) by CAS on its key: node0 never hands it out
            b.allocate(network="n", pool=p, container_id="b0", ifname="eth0", requested_ips=[IPAddress("10.79.0.9")])
            got = [str(a.allocate(network="n", pool=p, container_id=f"a{i}", ifname="eth0").ips[0].address.ip)
                   for i in range(1, 16)]
            assert "10.79.0.9" not in got and len(set(got)) == 15
            with pytest.raises(IpamdRefused) as info:
                a.allocate(network="n", pool=p, container_id="x", ifname="eth0", requested_ips=[IPAddress("10.79.0.9")])
            assert info.value.reason == "ADDRESS_TAKEN"
            # the same network with fewer exclusions on another node: refused (CNI 7), not stored
            with pytest.raises(IpamdRefused) as info:
                b.allocate(network="n", pool=pool(subnets=base["subnets"], exclude=["10.79.0.210-10.79.0.254"]),
                           container_id="b1", ifname="eth0", requested_ips=[IPAddress("10.79.0.205")])
            assert info.value.reason == "POOL_CHANGED"
            # GC on node1 keeps nothing, and releases only node1's lease
            released = b.gc(network="n", valid=[])
            assert [lease.container_id for lease in released] == ["b0"]
            assert len([x for x in c.etcd_leases().values() if x["state"] == "active"]) == 16
            # a DEL without network on node1 for node0's attachment touches nothing
            assert b.release(network="", container_id="a0", ifname="eth0") == []
            nodes = b.list_nodes()
            assert nodes.node == "node1" and nodes.online
            by = {x.name: x for x in nodes.nodes}
            assert by["node0"].alive and by["node0"].leases == 16
            assert next((blk.index, blk.first, blk.last) for blk in by["node0"].blocks) == (0, "10.79.0.2", "10.79.0.17")
            with pytest.raises(IpamdRefused) as info:
                b.release_node("node0")
            assert info.value.reason == "NODE_ALIVE"
        out = n1.ipamd.cli("nodes").stdout
        assert "node0" in out and "10.79.0.2-10.79.0.17" in out
        rows = json.loads(n1.ipamd.cli("leases", "-o", "json").stdout)
        assert {r["node"] for r in rows} == {"node0"}
        r = n1.ipamd.cli("nodes", "release", "node0", check=False)
        assert r.returncode == 1 and "alive" in r.stderr
    finally:
        c.destroy()


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    """etcd with --client-cert-auth: ipamd connects with --etcd-cacert/--etcd-cert/--etcd-key,
    and is refused without its client certificate."""
    etcd = start_cluster(1, tls=True, workdir=str(tmp_path / "etcd"))
    try:
        assert etcd.tls is not None
        # conf-examples/ipamd-etcd.json, pointed at this etcd and these certificates
        conf = json.loads((Path(__file__).resolve().parents[2] / "conf-examples" / "ipamd-etcd.json").read_text())
        conf.update(etcdEndpoints=",".join(etcd.endpoints), etcdCACert=etcd.tls.ca, etcdCert=etcd.tls.client_cert,
                    etcdKey=etcd.tls.client_key, etcdPrefix="/tls", nodeName="tls-node", metricsPort=0)
        (tmp_path / "ipamd.json").write_text(json.dumps(conf))
        (tmp_path / "n").mkdir()
        d = netbed.start_ipamd(str(tmp_path / "n"), ["--config", str(tmp_path / "ipamd.json")])
        try:
            with IpamClient(d.socket) as cl:
                a = cl.allocate(network="tls", pool=pool(subnets=["10.80.0.0/24"]), container_id="t", ifname="eth0")
            assert "10.80.0." in str(a.ips[0].address)
            rec = etcd.get_prefix("/tls/ips/")[f"/tls/ips/tls/{a.ips[0].address.ip}"]
            assert rec["containerID"] == "t" and rec["node"] == "tls-node"
        finally:
            d.stop()
        d = tmp_path / "nocert"
        d.mkdir()
        args = ["--store", "etcd", "--etcd-endpoints", ",".join(etcd.endpoints), "--etcd-cacert", etcd.tls.ca,
                "--etcd-prefix", "/nocert", "--node-name", "nocert"]
        with pytest.raises(RuntimeError, match="exited with 1"):
            netbed.start_ipamd(str(d), args)
    finally:
        etcd.destroy()
