"""The `Store` interface the allocator's writes and reads go through, and an in-memory store.

Why small: the allocation policy (policy.py) never sees a store, and the commit pipeline
(pipeline.py, group_commit.py) only this Protocol, so SQLite (store_sqlite.py) today and a
cluster-wide store (etcd, later) plug in without touching either. Every store must pass the one
contract suite (tests/unit/test_ipamd_store_contract.py, parametrised over every store). The store
is the truth about uniqueness: `reserve` refuses to make an address ACTIVE twice in a network,
whatever the allocator's in-memory hints say, and `batch` makes a group of writes durable all or
nothing (the group commit's one transaction).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from netaddr import IPAddress

from core.spec import PoolDef
from ipamd.blocks import Placement
from ipamd.errors import StoreConflict
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, Entry


class Store(Protocol):
    max_batch: int  # writes per group commit at most (0: no limit); etcd caps a transaction's ops

    def get_pool(self, network: str) -> PoolDef | None:
        """The stored definition, None for an unknown network. Raises spec.ConfigError when the
        stored definition no longer parses (the allocator then quarantines that network only)."""
        ...

    def put_pool(self, network: str, pool: PoolDef) -> None: ...

    def networks(self) -> list[str]: ...

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Group the writes made inside the block (by the calling thread) into one transaction:
        durable when the block exits, all or nothing. A write that raises inside the block
        changes nothing by itself (as outside a batch); an exception leaving the block undoes
        every write made in it. Reads from other threads see the batch only once it is durable."""
        ...

    def reserve(self, entries: Sequence[Entry], *, advance_cursor: bool = True) -> None:
        """Atomically make every entry ACTIVE (replacing released/quarantined rows of the same
        address). Raise StoreConflict, changing nothing, if any address is already ACTIVE.
        With advance_cursor, the subnet's round-robin cursor moves to each entry's address in
        the same transaction. Durable when it returns (outside a batch)."""
        ...

    def quarantine(self, network: str, ip: str, *, conflict_mac: str, now_ms: int) -> Entry | None:
        """Mark an address QUARANTINED (whatever its state), keeping the row's other fields.
        Returns the new entry, or None when the address has no row."""
        ...

    def release_by_owner(self, network: str | None, container_id: str, ifname: str,
                         now_ms: int) -> list[Entry]:
        """ACTIVE -> RELEASED for the attachment (in every network when network is None).
        Returns the released entries; [] when there were none."""
        ...

    def get_by_owner(self, network: str, container_id: str, ifname: str) -> list[Entry]:
        """The attachment's ACTIVE entries, ordered by subnet index."""
        ...

    def get_entry(self, network: str, ip: str) -> Entry | None: ...

    def list_entries(self, network: str | None = None, states: Iterable[str] = (ACTIVE,),
                     node: str | None = None) -> list[Entry]:
        """Entries in `states` (of one network, of one node's leases when given)."""
        ...

    def get_cursor(self, network: str, subnet_index: int) -> str | None: ...

    def probe_write(self) -> None:
        """Make one durable write that nothing else reads (a heartbeat), at least as large as a
        commit of one request's writes, and raise like a failed commit when the store cannot
        make it durable. Readiness calls it only while commits fail, to notice that they would
        succeed again (ipamd/readiness.py). Changes nothing any other method returns."""
        ...

    def close(self) -> None: ...


_MISSING: Any = object()


# A cluster store tells the allocator about other nodes' writes: (network, changes), where changes
# are (address, its entry now or None when gone); None means "forget the network, read it again".
ChangeListener = Callable[[str, "list[tuple[IPAddress, Entry | None]] | None"], None]


@dataclass(frozen=True)
class BlockInfo:
    network: str
    subnet: str
    index: int
    first: str
    last: str


@dataclass(frozen=True)
class NodeInfo:
    name: str
    alive: bool
    blocks: tuple[BlockInfo, ...]
    leases: int
    reserved: int


@dataclass(frozen=True)
class NodeRelease:
    leases: int
    blocks: int
    reserved: int


class Cluster(Protocol):
    """What a store shared by every node (etcd) adds to `Store`. The allocator asks it where this
    node may pick (`placement`) and keeps its outage reserve through it (`reserve_target`,
    `hold`, `give_back`, called from writes in a batch); it reports other nodes' writes to the
    `subscribe`d listener."""

    node: str
    online: bool  # etcd answers (False: an outage: serving from this node's own addresses)
    replayed: int  # writes made during outages and replayed since start

    def placement(self, network: str, subnet_index: int) -> Placement | None: ...

    def subscribe(self, listener: ChangeListener) -> None: ...

    def reserve_target(self, network: str, subnet_index: int, free: int, total: int) -> int:
        """How many addresses this node should hold as its outage reserve in that subnet entry."""
        ...

    def reserved_by_me(self, network: str, subnet_index: int) -> list[Entry]: ...

    def hold(self, entries: Sequence[Entry]) -> None:
        """Record free addresses as this node's outage reserve (compare-and-swap)."""
        ...

    def give_back(self, network: str, ips: Sequence[str]) -> None:
        """Free addresses of this node's outage reserve."""
        ...

    def nodes(self) -> list[NodeInfo]: ...

    def release_node(self, node: str) -> NodeRelease: ...

    def serving(self) -> bool:
        """False only when this node can allocate nothing at all."""
        ...


class MemoryStore:
    """Reference implementation; also the fake for unit tests. Thread-safe; a batch holds the
    store's lock for its whole block and undoes its writes from a journal when it fails."""

    max_batch = 0

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pools: dict[str, PoolDef] = {}
        self._entries: dict[tuple[str, str], Entry] = {}
        self._cursors: dict[tuple[str, int], str] = {}
        # (network, container id, ifname) -> keys of its ACTIVE entries: no scans per call
        self._owners: dict[tuple[str, str, str], frozenset[tuple[str, str]]] = {}
        self._journal: list[tuple[dict[Any, Any], Any, Any]] | None = None  # (dict, key, old value)

    def _put(self, d: dict[Any, Any], key: Any, value: Any) -> None:
        """Every mutation goes through here (value _MISSING deletes), so a batch can undo it."""
        if self._journal is not None:
            self._journal.append((d, key, d.get(key, _MISSING)))
        if value is _MISSING:
            d.pop(key, None)
        else:
            d[key] = value

    def _index(self, e: Entry, key: tuple[str, str], add: bool) -> None:
        owner = (e.network, e.container_id, e.ifname)
        keys = self._owners.get(owner, frozenset())
        keys = keys | {key} if add else keys - {key}
        self._put(self._owners, owner, keys if keys else _MISSING)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock:
            if self._journal is not None:  # nested: part of the outer batch
                yield
                return
            self._journal = []
            try:
                yield
            except BaseException:
                for d, key, old in reversed(self._journal):
                    if old is _MISSING:
                        d.pop(key, None)
                    else:
                        d[key] = old
                raise
            finally:
                self._journal = None

    def get_pool(self, network: str) -> PoolDef | None:
        with self._lock:
            return self._pools.get(network)

    def put_pool(self, network: str, pool: PoolDef) -> None:
        with self._lock:
            self._put(self._pools, network, pool)

    def networks(self) -> list[str]:
        with self._lock:
            return sorted(self._pools)

    def reserve(self, entries: Sequence[Entry], *, advance_cursor: bool = True) -> None:
        with self._lock:
            keys = [(e.network, str(e.ip)) for e in entries]
            if len(set(keys)) != len(keys):
                raise StoreConflict(keys[0][0], "duplicate address in one reservation")
            for (net, ip) in keys:
                old = self._entries.get((net, ip))
                if old is not None and old.state == ACTIVE:
                    raise StoreConflict(net, ip)
            for key, e in zip(keys, entries, strict=True):
                old = self._entries.get(key)
                if old is not None:
                    self._index(old, key, add=False)
                self._put(self._entries, key, replace(e, state=ACTIVE))
                self._index(e, key, add=True)
                if advance_cursor:
                    self._put(self._cursors, (e.network, e.subnet_index), key[1])

    def quarantine(self, network: str, ip: str, *, conflict_mac: str, now_ms: int) -> Entry | None:
        with self._lock:
            old = self._entries.get((network, ip))
            if old is None:
                return None
            new = replace(old, state=QUARANTINED, conflict_mac=conflict_mac, changed_ms=now_ms)
            self._put(self._entries, (network, ip), new)
            self._index(old, (network, ip), add=False)
            return new

    def release_by_owner(self, network: str | None, container_id: str, ifname: str,
                         now_ms: int) -> list[Entry]:
        with self._lock:
            if network is None:
                owners = [o for o in self._owners if o[1:] == (container_id, ifname)]
            else:
                owners = [(network, container_id, ifname)]
            out = []
            for owner in owners:
                keys = self._owners.get(owner, frozenset())
                self._put(self._owners, owner, _MISSING)
                for key in sorted(keys):
                    e = replace(self._entries[key], state=RELEASED, changed_ms=now_ms)
                    self._put(self._entries, key, e)
                    out.append(e)
            return sorted(out, key=lambda e: (e.network, e.subnet_index))

    def get_by_owner(self, network: str, container_id: str, ifname: str) -> list[Entry]:
        with self._lock:
            keys = self._owners.get((network, container_id, ifname), ())
            return sorted((self._entries[k] for k in keys), key=lambda e: e.subnet_index)

    def get_entry(self, network: str, ip: str) -> Entry | None:
        with self._lock:
            return self._entries.get((network, ip))

    def list_entries(self, network: str | None = None, states: Iterable[str] = (ACTIVE,),
                     node: str | None = None) -> list[Entry]:
        wanted = set(states)
        with self._lock:
            return sorted((e for e in self._entries.values()
                           if e.state in wanted and (network is None or e.network == network)
                           and (node is None or e.node == node)),
                          key=lambda e: (e.network, e.subnet_index, int(e.ip)))

    def get_cursor(self, network: str, subnet_index: int) -> str | None:
        with self._lock:
            return self._cursors.get((network, subnet_index))

    def probe_write(self) -> None:
        self.heartbeats = getattr(self, "heartbeats", 0) + 1  # nothing to make durable in memory

    def close(self) -> None:
        pass
