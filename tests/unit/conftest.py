"""The stores every ipamd store-level test runs over: one table, one fixture.

Adding a store (etcd) is one row in STORES; the contract suite (test_ipamd_store_contract.py) and
the group-commit tests (test_ipamd_group_commit.py) then run over it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from ipamd.store import MemoryStore, Store
from ipamd.store_sqlite import SqliteStore


class StoreKind(NamedTuple):
    open: Callable[[Path], Store]  # open the store kept under this directory (a new handle each call)
    durable: bool  # a second handle opened on the same directory sees what the first one wrote


STORES: dict[str, StoreKind] = {
    "memory": StoreKind(lambda d: MemoryStore(), durable=False),
    "sqlite": StoreKind(lambda d: SqliteStore(str(d / "ipam.db")), durable=True),
}


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
    yield from _opener(STORES[request.param], tmp_path)


@pytest.fixture(params=sorted(k for k, v in STORES.items() if v.durable))
def make_durable_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """As make_store, over the stores that keep their state across handles (not MemoryStore)."""
    yield from _opener(STORES[request.param], tmp_path)


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()
