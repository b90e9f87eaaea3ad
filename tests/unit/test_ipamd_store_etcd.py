"""The etcd store's cluster rules against a real etcd (the session's one-member etcd, see
conftest.py): outage mode, lost replies, blocks, the outage reserve, node release.

Faults are injected at the client: `Flaky` forwards to the real EtcdClient and can make etcd look
unreachable (every call fails as if no member answered) or lose the reply of the next
transaction after etcd applied it, which is exactly what a node sees when etcd stops between
applying a write and answering.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPNetwork

from core import etcd
from core.spec import parse_ipam
from ipamd.errors import NodeAlive, StoreConflict, StoreUnavailable
from ipamd.model import ACTIVE, RELEASED, RESERVED, Entry
from ipamd.store_etcd import EtcdStore

POOL = parse_ipam({"subnets": [{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}]}).pool


class Flaky:
    """An EtcdClient whose etcd can 'go away' (down) or lose one transaction's reply (lose_reply)."""

    def __init__(self, real: etcd.EtcdClient) -> None:
        self.real = real
        self.down = False
        self.lose_reply = False
        self.election = False  # the next transaction lands, then etcd answers "no leader"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr) or name in ("close",):
            return attr

        def call(*a: Any, **kw: Any) -> Any:
            if self.down:
                raise etcd.EtcdUnavailable("etcd at test unreachable (injected)", answered=False)
            out = attr(*a, **kw)
            if name == "txn" and self.election:
                self.election = False
                raise etcd.EtcdUnavailable("etcdserver: request timed out (injected)", answered=True)
            if name == "txn" and self.lose_reply:
                self.lose_reply = False
                self.down = True  # etcd stopped right after applying it
                raise etcd.EtcdUnavailable("etcd at test unreachable (reply lost, injected)", answered=False)
            return out

        return call


@pytest.fixture
def stores(etcd_cluster: Any, tmp_path: Path) -> Iterator[Any]:
    """A factory of stores on one fresh prefix: store(node) -> (EtcdStore, Flaky)."""
    made: list[EtcdStore] = []
    prefix = f"/t-{tmp_path.name}"

    def make(node: str = "node-a", reserve: int = 4) -> tuple[EtcdStore, Flaky]:
        flaky = Flaky(etcd.EtcdClient(etcd.EtcdConfig(tuple(etcd_cluster.endpoints))))
        s = EtcdStore(flaky, prefix=prefix, node=node, journal_path=str(tmp_path / f"{node}.db"),  # type: ignore[arg-type]
                      outage_reserve=reserve)
        made.append(s)
        return s, flaky

    yield make
    for s in made:
        s.close()


def entry(ip: str, cid: str = "c1", node: str = "node-a") -> Entry:
    return Entry("n1", IPNetwork(f"{ip}/24"), 0, cid, "eth0", node=node)


def hold(s: EtcdStore, *ips: str) -> None:
    s.hold([Entry("n1", IPNetwork(f"{ip}/24"), 0, "", "", state=RESERVED, node=s.node) for ip in ips])


def test_offline_serves_only_this_nodes_own_addresses_and_replays(stores: Any, etcd_cluster: Any) -> None:
    a, fa = stores("node-a")
    b, _ = stores("node-b")
    a.put_pool("n1", POOL)
    hold(a, "10.0.0.10", "10.0.0.11")
    a.reserve([entry("10.0.0.2", "old")])
    fa.down = True
    # the first write that finds etcd gone takes the store offline; an address that is not
    # provably this node's (here: a free one) is not written: its request decides again
    with pytest.raises(StoreConflict):
        a.reserve([entry("10.0.0.3", "x")])
    assert not a.online
    place = a.placement("n1", 0)
    assert place is not None and place.offline and [str(ip) for ip in place.outage] == ["10.0.0.10", "10.0.0.11"]
    with pytest.raises(StoreUnavailable):  # still not its own: refused while offline
        a.reserve([entry("10.0.0.3", "x")])
    a.reserve([entry("10.0.0.10", "p1")])  # its reserve: served
    assert [e.ip.format() for e in a.release_by_owner("n1", "old", "eth0", 5)] == ["10.0.0.2"]  # queued
    place = a.placement("n1", 0)
    assert place is not None and [str(ip) for ip in place.outage] == ["10.0.0.2", "10.0.0.11"]
    a.reserve([entry("10.0.0.2", "p2")])  # its own lease released during the outage: served
    # meanwhile node B (online) can take none of them, and etcd knows nothing yet
    for ip in ("10.0.0.10", "10.0.0.11", "10.0.0.2"):
        with pytest.raises(StoreConflict):
            b.reserve([entry(ip, "b", node="node-b")])
    fa.down = False
    a._recover()
    assert a.online and a.replayed == 2
    kv = etcd_cluster.get_prefix(f"{a.prefix}/ips/")
    got = {k.rsplit("/", 1)[1]: (v["state"], v["containerID"], v["node"]) for k, v in kv.items()}
    assert got["10.0.0.10"] == (ACTIVE, "p1", "node-a") and got["10.0.0.2"] == (ACTIVE, "p2", "node-a")
    assert got["10.0.0.11"] == (RESERVED, "", "node-a") and "10.0.0.3" not in got


def test_a_lost_reply_is_reconciled(stores: Any, etcd_cluster: Any) -> None:
    """A transaction that reached etcd but whose reply was lost: if its request was failed (an
    address that needed etcd), the write is undone on recovery; if it was kept offline (the
    node's own address), the replay finds it already there."""
    a, fa = stores("node-a")
    a.put_pool("n1", POOL)
    hold(a, "10.0.0.10")
    fa.lose_reply = True
    with pytest.raises(StoreConflict):  # landed in etcd, but the request is told to decide again
        a.reserve([entry("10.0.0.5", "lost")])
    assert etcd_cluster.get_prefix(f"{a.prefix}/ips/n1/10.0.0.5")  # it did land
    fa.down = False
    a._recover()
    assert not etcd_cluster.get_prefix(f"{a.prefix}/ips/n1/10.0.0.5")  # undone: nobody holds it
    assert a.get_entry("n1", "10.0.0.5") is None and a.online
    # the node's own address: kept offline (outbox) although the reply was lost; the replay
    # finds it already in etcd
    fa.lose_reply = True
    a.reserve([entry("10.0.0.10", "kept")])
    assert not a.online
    fa.down = False
    a._recover()
    kv = etcd_cluster.get_prefix(f"{a.prefix}/ips/")
    assert kv[f"{a.prefix}/ips/n1/10.0.0.10"]["containerID"] == "kept" and a.replayed == 0


def test_an_election_is_not_an_outage(stores: Any) -> None:
    """A transaction that ends in an election's answer ("request timed out") may have landed:
    the store stays online, reads the keys back and lets the requests decide again, so a
    request whose write landed finds its lease instead of taking a second address."""
    a, fa = stores("node-a")
    a.put_pool("n1", POOL)
    fa.election = True
    with pytest.raises(StoreConflict):
        a.reserve([entry("10.0.0.7", "c7")])
    assert a.online
    assert [e.ip.format() for e in a.get_by_owner("n1", "c7", "eth0")] == ["10.0.0.7"]


def test_blocks_are_claimed_in_the_lease_transaction_and_borrowing_is_a_cas(stores: Any, etcd_cluster: Any) -> None:
    a, _ = stores("node-a")
    b, _ = stores("node-b")
    a.put_pool("n1", POOL)
    a.reserve([entry("10.0.0.2", "a1")])  # block 0 (.2-.17) becomes node-a's in the same transaction
    kv = etcd_cluster.get_prefix(f"{a.prefix}/blocks/")
    assert kv == {f"{a.prefix}/blocks/n1/0/0": {"node": "node-a", "claimedMs": kv[f"{a.prefix}/blocks/n1/0/0"]["claimedMs"]}}
    b._resync()  # (no watch thread in unit tests: read the shared state)
    b.reserve([entry("10.0.0.3", "b1", node="node-b")])  # borrowed from node-a's block: no claim
    assert len(etcd_cluster.get_prefix(f"{a.prefix}/blocks/")) == 1
    with pytest.raises(StoreConflict):  # node-a's view is stale: the CAS on the key refuses it
        a.reserve([entry("10.0.0.3", "a2")])
    place = b.placement("n1", 0)
    assert place is not None and place.own == () and dict(place.claimed) == {0: "node-a"}
    b.reserve([entry("10.0.0.18", "b2", node="node-b")])  # a free block: node-b claims block 1
    place = b.placement("n1", 0)
    assert place is not None and place.own == (1,) and dict(place.claimed) == {0: "node-a", 1: "node-b"}


def test_release_touches_only_this_nodes_leases(stores: Any) -> None:
    a, _ = stores("node-a")
    b, _ = stores("node-b")
    a.put_pool("n1", POOL)
    a.reserve([entry("10.0.0.2", "same")])
    b._resync()  # (no watch thread in unit tests: read the shared state)
    assert b.release_by_owner(None, "same", "eth0", 1) == []
    assert a.get_entry("n1", "10.0.0.2").state == ACTIVE  # type: ignore[union-attr]


def test_nodes_release_refuses_a_live_node_and_frees_a_dead_one(stores: Any, etcd_cluster: Any) -> None:
    a, _ = stores("node-a")
    b, _ = stores("node-b")
    a.put_pool("n1", POOL)
    b._resync()
    b.reserve([entry("10.0.0.20", "b1", node="node-b")])
    hold(b, "10.0.0.21")
    b._beat()  # node-b's heartbeat
    a._resync()
    with pytest.raises(NodeAlive):
        a.release_node("node-b")
    with pytest.raises(NodeAlive):
        a.release_node("node-a")
    b.client.lease_revoke(b._hb_lease)  # node-b dies
    r = a.release_node("node-b")
    assert (r.leases, r.reserved, r.blocks) == (1, 1, 1)
    kv = etcd_cluster.get_prefix(f"{a.prefix}/")
    assert kv[f"{a.prefix}/ips/n1/10.0.0.20"]["state"] == RELEASED
    assert f"{a.prefix}/ips/n1/10.0.0.21" not in kv and not any("/blocks/" in k for k in kv)
