"""The stores every ipamd store-level test runs over: one table, one fixture.

Adding a store is one row in STORES; the contract suite (test_ipamd_store_contract.py) and the
group-commit tests (test_ipamd_group_commit.py) then run over it too. The etcd row runs against a
real one-member etcd (Debian's etcd-server, testbed/etcd.py) started once per session on a
loopback port; each test gets its own key prefix (derived from its tmp_path, so that a second
handle on the same directory sees the same keys) and its own journal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from ipamd.store import MemoryStore, Store
from ipamd.store_sqlite import SqliteStore

NODE = "node-a"  # the node every store-level test writes as
_ETCD: dict[str, Any] = {}  # the session's etcd (started on first use)


def etcd_store(d: Path) -> Store:
    from core.etcd import EtcdClient, EtcdConfig
    from ipamd.store_etcd import EtcdStore

    cluster = _ETCD["cluster"]
    prefix = "/t/" + hashlib.sha1(str(d).encode()).hexdigest()[:12]
    client = EtcdClient(EtcdConfig(tuple(cluster.endpoints)))
    return EtcdStore(client, prefix=prefix, node=NODE, journal_path=str(d / "etcd-journal.db"))


class StoreKind(NamedTuple):
    open: Callable[[Path], Store]  # open the store kept under this directory (a new handle each call)
    durable: bool  # a second handle opened on the same directory sees what the first one wrote


STORES: dict[str, StoreKind] = {
    "memory": StoreKind(lambda d: MemoryStore(), durable=False),
    "sqlite": StoreKind(lambda d: SqliteStore(str(d / "ipam.db"), node=NODE), durable=True),
    "etcd": StoreKind(etcd_store, durable=True),
}


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[Any]:
    from testbed.etcd import start_cluster

    c = start_cluster(1)
    _ETCD["cluster"] = c
    yield c
    _ETCD.clear()
    c.destroy()


def _opener(kind: StoreKind, where: Path) -> Iterator[Callable[[], Store]]:
    opened: list[Store] = []

    def make() -> Store:
        s = kind.open(where)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture(params=sorted(STORES))
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens handles on one fresh store of each kind in STORES; closes them after the test."""
    if request.param == "etcd":
        request.getfixturevalue("etcd_cluster")
    yield from _opener(STORES[request.param], tmp_path)


@pytest.fixture(params=sorted(k for k, v in STORES.items() if v.durable))
def make_durable_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """As make_store, over the stores that keep their state across handles (not MemoryStore)."""
    if request.param == "etcd":
        request.getfixturevalue("etcd_cluster")
    yield from _opener(STORES[request.param], tmp_path)


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()
