"""The cluster-wide `Store`: leases in etcd, one key per address, every write a compare-and-swap.

Why this shape (issue 10): an underlay subnet spans every node, so uniqueness must be decided in
one place that every node's ipamd writes to, and the hot path must stay local. The rules:
- an address's key is the one point of truth: a reservation compares the key's revision with the
  one this node last saw (0: absent) and refuses (StoreConflict) when the key is active, another
  node's outage reserve, or has changed since; so does a static request, whichever node's block
  holds the address, and so does a borrow from another node's block: every path serialises on
  the same key. A block claim rides in the lease's transaction (create-if-absent);
- one etcd transaction per group commit (`batch`): the steady state costs one etcd write per
  allocation, or less; the pool definition's revision is compared in it, so no lease is written
  against a definition that changed under the decision;
- reads come from a mirror of the prefix, kept by a watch: no read on the hot path. Other nodes'
  writes go to the allocator's listener (its occupancy stays current);
- every lease records its node; `release_by_owner` and GC touch only this node's leases;
- the journal (etcd_journal.py) keeps this node's keys, the writes made during an outage and the
  writes whose reply was lost.

Outage (no member answers): the store goes offline and accepts only writes on keys that etcd
records as this node's own (its outage reserve, its own leases), which no other node can take,
so they replay (compare-and-swap) without conflict when etcd returns; everything else (a static
address, a new block, a borrow, a new network) fails with STORE_UNAVAILABLE (CNI 11). Recovery
re-reads the prefix, replays the outbox, undoes lost-reply writes of failed requests, and only
then goes back online.

Keys under the prefix P:
    P/pools/<network>              {"pool": <canonical ipam>, "blockSize": 16}
    P/blocks/<network>/<k>/<n>     {"node": N, "claimedMs": t}     block n of subnet entry k
    P/ips/<network>/<ip>           the lease record (model.Entry as JSON, with "node")
    P/nodes/<node>                 heartbeat, bound to an etcd lease
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, unquote

from netaddr import IPAddress, IPNetwork

from core import etcd, wire
from core.spec import ConfigError, PodRef, PoolDef
from ipamd.blocks import DEFAULT_BLOCK_SIZE, Blocks, Placement
from ipamd.errors import NodeAlive, StoreConflict, StoreUnavailable
from ipamd.etcd_journal import Journal, Pending, Uncertain
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, RESERVED, Entry
from ipamd.store import BlockInfo, ChangeListener, NodeInfo, NodeRelease

log = logging.getLogger("ipamd.store_etcd")

HEARTBEAT_TTL_S = 10
MAX_TXN_OPS = 100  # etcd's --max-txn-ops default is 128
RECOVERY_PERIOD_S = 1.0
MINE = (ACTIVE, RESERVED)  # states in which a key of this node can be taken by nobody else


# ---- values ------------------------------------------------------------------------------------


def entry_to_json(e: Entry) -> bytes:
    return json.dumps({
        "node": e.node, "address": str(e.address), "subnetIndex": e.subnet_index, "state": e.state,
        "containerID": e.container_id, "ifname": e.ifname,
        "gateway": str(e.gateway) if e.gateway is not None else "", "podNamespace": e.pod.namespace,
        "podName": e.pod.name, "podUID": e.pod.uid, "mac": e.mac, "netns": e.netns,
        "createdMs": e.created_ms, "changedMs": e.changed_ms, "conflictMAC": e.conflict_mac,
    }, separators=(",", ":"), sort_keys=True).encode()


def entry_from_json(network: str, raw: bytes) -> Entry:
    d = json.loads(raw)
    return Entry(
        network=network, address=IPNetwork(d["address"]), subnet_index=int(d["subnetIndex"]),
        container_id=d.get("containerID", ""), ifname=d.get("ifname", ""), state=d["state"],
        gateway=IPAddress(d["gateway"]) if d.get("gateway") else None,
        pod=PodRef(d.get("podNamespace", ""), d.get("podName", ""), d.get("podUID", "")),
        mac=d.get("mac", ""), netns=d.get("netns", ""), created_ms=int(d.get("createdMs", 0)),
        changed_ms=int(d.get("changedMs", 0)), conflict_mac=d.get("conflictMAC", ""), node=d.get("node", ""))


def _mine(e: Entry | None, node: str) -> bool:
    return e is not None and e.node == node and e.state in MINE


@dataclass
class _Batch:
    writes: dict[str, tuple[bytes | None, int]] = field(default_factory=dict)  # key -> (value, base mod)
    entries: dict[str, Entry | None] = field(default_factory=dict)  # decoded new values of ips keys
    old: dict[str, bytes | None] = field(default_factory=dict)  # values before the batch
    compares: dict[str, etcd.Compare] = field(default_factory=dict)  # extra: pool revisions, claims
    pools: dict[str, PoolDef] = field(default_factory=dict)
    claims: set[tuple[str, int, int]] = field(default_factory=set)
    cursors: dict[tuple[str, int], str] = field(default_factory=dict)
    unsafe: str = ""  # why the batch needs etcd ("" = it may be applied while etcd is down)


class EtcdStore:
    max_batch = 40  # requests per transaction: ~2 compares + 2 puts each, under etcd's 128 ops

    def __init__(self, client: etcd.EtcdClient, *, prefix: str, node: str, journal_path: str,
                 block_size: int = DEFAULT_BLOCK_SIZE, outage_reserve: int = 4,
                 clock: Callable[[], float] = time.time, machine: str = "") -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.node = node
        self.block_size = block_size
        self.outage_reserve = outage_reserve
        self.clock = clock
        self.machine = machine or _machine_id()
        self.journal = Journal(journal_path)
        self._mu = threading.RLock()  # the mirror
        self._batch_lock = threading.RLock()  # one batch (or recovery) at a time
        self._batch: _Batch | None = None
        self._batch_owner: int | None = None
        self._listeners: list[ChangeListener] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._hb_lease = 0
        self.online = True
        self._online_event = threading.Event()
        self.offline_since = 0.0
        self.replayed = 0  # outbox writes replayed after outages (tests, metrics)
        self._clear_mirror()
        self._load()

    # ---- keys ------------------------------------------------------------------------------

    def _ip_key(self, network: str, ip: str) -> str:
        return f"{self.prefix}/ips/{quote(network, safe='')}/{ip}"

    def _pool_key(self, network: str) -> str:
        return f"{self.prefix}/pools/{quote(network, safe='')}"

    def _block_key(self, network: str, k: int, n: int) -> str:
        return f"{self.prefix}/blocks/{quote(network, safe='')}/{k}/{n}"

    def _node_key(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}"

    # ---- the mirror ------------------------------------------------------------------------

    def _clear_mirror(self) -> None:
        self._mods: dict[str, int] = {}
        self._raw: dict[str, bytes] = {}
        self._ips: dict[str, dict[str, Entry]] = {}
        self._owners: dict[tuple[str, str, str], set[str]] = {}
        # this node's outage reserve and released entries, by (network, subnet entry): the
        # placement of every allocation reads them, so they are indexed, never scanned for
        self._mine: dict[tuple[str, int, str], set[str]] = {}
        self._pools: dict[str, tuple[PoolDef, int]] = {}
        # Networks whose stored definition does not parse -> why: get_pool raises ConfigError for
        # them (the Store contract), so the allocator quarantines that network only.
        self._broken_pools: dict[str, str] = {}
        self._geo: dict[tuple[str, int], Blocks] = {}
        self._claims: dict[tuple[str, int], dict[int, str]] = {}
        self._own_blocks: dict[tuple[str, int], tuple[int, ...]] = {}
        self._hb: dict[str, dict[str, Any]] = {}
        self._dirty: dict[str, Pending] = {}  # offline writes not yet replayed
        self._rev = 0

    def _apply(self, key: str, value: bytes | None, mod: int) -> tuple[str, IPAddress, Entry | None] | None:
        """Set one key of the mirror (caller holds _mu); returns the change of an address key."""
        rest = key[len(self.prefix) + 1:].split("/")
        if value is None:
            self._mods.pop(key, None)
            self._raw.pop(key, None)
        else:
            self._mods[key] = mod
            self._raw[key] = value
        kind = rest[0]
        if kind == "ips" and len(rest) == 3:
            net, ip = unquote(rest[1]), rest[2]
            old = self._ips.get(net, {}).get(ip)
            new: Entry | None = None
            if value is not None:
                try:
                    new = entry_from_json(net, value)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("key=%s error=%s msg=%s", key, exc, "undecodable lease record ignored")
            self._index(net, ip, old, new)
            return net, IPAddress(ip), new
        if kind == "pools" and len(rest) == 2:
            net = unquote(rest[1])
            for gk in [g for g in self._geo if g[0] == net]:
                del self._geo[gk]
            self._broken_pools.pop(net, None)
            if value is None:
                self._pools.pop(net, None)
                return None
            try:
                d = json.loads(value)
                size = int(d.get("blockSize", DEFAULT_BLOCK_SIZE))
                self._pools[net] = (wire.pool_from_dict(d["pool"]), size)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError, ConfigError) as exc:
                log.error("network=%s error=%s msg=%s", net, exc, "stored pool definition does not parse")
                self._pools.pop(net, None)
                self._broken_pools[net] = f"stored definition does not parse: {exc}"
        elif kind == "blocks" and len(rest) == 4:
            net, k, n = unquote(rest[1]), int(rest[2]), int(rest[3])
            claims = dict(self._claims.get((net, k), {}))  # copy on write: placements hold snapshots
            if value is None:
                claims.pop(n, None)
            else:
                claims[n] = str(json.loads(value).get("node", ""))
            self._claims[(net, k)] = claims
            self._own_blocks[(net, k)] = tuple(sorted(b for b, who in claims.items() if who == self.node))
        elif kind == "nodes" and len(rest) == 2:
            if value is None:
                self._hb.pop(rest[1], None)
            else:
                with contextlib.suppress(ValueError):
                    self._hb[rest[1]] = json.loads(value)
        return None

    def _index(self, net: str, ip: str, old: Entry | None, new: Entry | None) -> None:
        ips = self._ips.setdefault(net, {})
        if old is not None and old.node == self.node and old.state in (RESERVED, RELEASED):
            self._mine.get((net, old.subnet_index, old.state), set()).discard(ip)
        if new is not None and new.node == self.node and new.state in (RESERVED, RELEASED):
            self._mine.setdefault((net, new.subnet_index, new.state), set()).add(ip)
        if old is not None and old.state == ACTIVE and old.node == self.node:
            owner = (net, old.container_id, old.ifname)
            held = self._owners.get(owner)
            if held is not None:
                held.discard(ip)
                if not held:
                    del self._owners[owner]
        if new is None:
            ips.pop(ip, None)
            return
        ips[ip] = new
        if new.state == ACTIVE and new.node == self.node:
            self._owners.setdefault((net, new.container_id, new.ifname), set()).add(ip)

    def _load(self) -> None:
        """The mirror from etcd (online) or from the journal (etcd unreachable at start)."""
        pending = self.journal.outbox()
        try:
            kvs, rev = self.client.range(self.prefix.encode() + b"/", prefix=True)
        except etcd.EtcdUnavailable as exc:
            own = self.journal.own()
            if not own:  # never been online here: nothing of its own to serve
                self.journal.close()
                raise StoreUnavailable(f"{exc.msg}; and this node has no journal of its own addresses yet "
                                       f"({self.journal.path}): nothing to serve until etcd answers") from exc
            log.warning("error=%s msg=%s", exc, "etcd unreachable at start: offline from the journal")
            with self._mu:
                for key, value, mod in own:
                    self._apply(key, value.encode(), mod)
                for p in pending:
                    self._dirty[p.key] = p
                    self._apply(p.key, p.value.encode() if p.value is not None else None, p.base_mod)
            self._set_offline()
            return
        with self._mu:
            for kv in kvs:
                self._apply(kv.key.decode(), kv.value, kv.mod_revision)
            self._rev = rev
        self._online_event.set()
        if pending or self.journal.uncertain():
            self._recover()  # an outage was not replayed before the daemon stopped
        else:
            self._adopt_own()

    def _adopt_own(self) -> None:
        """The journal's copy of this node's keys := etcd's (trusted while it answers)."""
        with self._mu:
            rows = [(k, v.decode(), self._mods[k]) for k, v in self._raw.items() if self._is_own(k, v)]
        self.journal.replace_own(rows)

    def _is_own(self, key: str, value: bytes | None) -> bool:
        rest = key[len(self.prefix) + 1:]
        if rest.startswith("pools/"):
            return True  # every node keeps the definitions it has seen: it may start offline
        if value is None or not rest.startswith(("ips/", "blocks/")):
            return False
        try:
            return bool(json.loads(value).get("node") == self.node)
        except ValueError:
            return False

    # ---- threads: watch, heartbeat, recovery -----------------------------------------------

    def start(self) -> None:
        """Heartbeat, watch and recovery threads (the daemon calls this; unit tests need not)."""
        self._claim_node_name()
        for name, target in (("etcd-watch", self._watch_loop), ("etcd-heartbeat", self._heartbeat_loop),
                             ("etcd-recovery", self._recovery_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _notify(self, changes: dict[str, list[tuple[IPAddress, Entry | None]] | None]) -> None:
        for net, ch in changes.items():
            for fn in self._listeners:
                try:
                    fn(net, ch)
                except Exception:  # a listener bug must not stop the watch
                    log.exception("network=%s msg=%s", net, "change listener failed")

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            if not self._online_event.wait(0.5):
                continue
            with self._mu:
                start = self._rev + 1
            try:
                self.client.watch(self.prefix.encode() + b"/", start, self._on_events, self._stop)
            except etcd.Compacted:
                log.warning("msg=%s", "etcd compacted the history the watch needed: re-reading the prefix")
                self._resync()
            except etcd.EtcdUnavailable as exc:
                if not exc.answered:
                    self._set_offline(exc)
                else:
                    time.sleep(0.5)
            except Exception:
                log.exception("msg=%s", "etcd watch failed: restarting it")
                time.sleep(1)

    def _on_events(self, events: list[etcd.Event], rev: int) -> None:
        changes: dict[str, list[tuple[IPAddress, Entry | None]] | None] = {}
        with self._mu:
            for ev in events:
                key = ev.kv.key.decode()
                mod = int(ev.kv.mod_revision)
                if self._mods.get(key, 0) >= mod or key in self._dirty:
                    continue  # our own write (applied at commit), or one we will replay
                old_raw = self._raw.get(key)
                value = ev.kv.value if ev.type == etcd.PUT else None
                ch = self._apply(key, value, mod)
                if ch is not None:
                    net, ip, new = ch
                    if new is not None and new.node == self.node:
                        continue  # this node's own record (the allocator decided it)
                    if new is None and old_raw is not None and self._is_own(key, old_raw):
                        changes[net] = None  # our key deleted by someone else: read it again
                        continue
                    lst = changes.setdefault(net, [])
                    if lst is not None:
                        lst.append((ip, new))
                elif key.startswith(f"{self.prefix}/pools/"):
                    changes[unquote(key.rsplit("/", 1)[1])] = None
            self._rev = max(self._rev, rev)
        if changes:
            self._notify(changes)

    def _resync(self) -> None:
        with self._batch_lock:
            kvs, rev = self.client.range(self.prefix.encode() + b"/", prefix=True)
            with self._mu:
                dirty = self._dirty
                self._clear_mirror()
                self._dirty = dirty
                for kv in kvs:
                    self._apply(kv.key.decode(), kv.value, kv.mod_revision)
                self._rev = rev
                nets = set(self._ips) | set(self._pools)
        self._notify(dict.fromkeys(nets))

    def _claim_node_name(self) -> None:
        """Refuse to run as a node name that a live ipamd on another machine uses."""
        if not self.online:
            return
        kvs, _ = self.client.range(self._node_key(self.node).encode())
        for kv in kvs:
            with contextlib.suppress(ValueError):
                other = json.loads(kv.value)
                if other.get("machine") and other.get("machine") != self.machine:
                    raise StoreUnavailable(
                        f"node name {self.node} is in use by a live ipamd on another machine "
                        f"({other.get('machine')}): give this node its own --node-name")
            self.client.lease_revoke(kv.lease)  # our own previous life (kill -9, restart)
        self._beat()

    def _beat(self) -> None:
        ttl = self.client.lease_keepalive(self._hb_lease) if self._hb_lease else 0
        if ttl > 0:
            return
        self._hb_lease = self.client.lease_grant(HEARTBEAT_TTL_S)
        value = json.dumps({"node": self.node, "machine": self.machine, "pid": os.getpid(),
                            "startedMs": int(self.clock() * 1000)}).encode()
        self.client.put(self._node_key(self.node).encode(), value, lease=self._hb_lease)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_TTL_S / 3):
            if not self.online:
                continue
            try:
                self._beat()
            except Exception as exc:
                log.warning("error=%s msg=%s", exc, "heartbeat failed (retrying)")

    def _recovery_loop(self) -> None:
        while not self._stop.wait(RECOVERY_PERIOD_S):
            if self.online:
                continue
            try:
                self.client.range(self._node_key(self.node).encode())
            except etcd.EtcdUnavailable:
                continue
            except Exception as exc:
                log.warning("error=%s msg=%s", exc, "etcd probe failed")
                continue
            try:
                self._recover()
            except Exception:
                log.exception("msg=%s", "recovery from the etcd outage failed: trying again")

    # ---- online / offline ------------------------------------------------------------------

    def _set_offline(self, exc: BaseException | None = None) -> None:
        if self.online:
            self.online = False
            self._online_event.clear()
            self.offline_since = time.monotonic()
            log.error("error=%s msg=%s", exc, "etcd unreachable: serving from this node's own addresses "
                      "only, queueing releases")

    def _recover(self) -> None:
        """Back from an outage: re-read, replay the outbox, undo lost-reply writes, go online."""
        with self._batch_lock:
            kvs, rev = self.client.range(self.prefix.encode() + b"/", prefix=True)
            current = {kv.key.decode(): kv for kv in kvs}
            pending = {p.key: p for p in self.journal.outbox()}
            uncertain = self.journal.uncertain()
            writes: list[tuple[str, bytes | None, int]] = []  # key, value, expected mod
            lost: list[str] = []
            for key, p in pending.items():
                cur = current.get(key)
                want = p.value.encode() if p.value is not None else None
                have = cur.value if cur is not None else None
                if have == want:
                    continue  # the write landed before the reply was lost
                cur_mod = cur.mod_revision if cur is not None else 0
                cur_entry = self._decode_ip(key, have)
                if cur_mod == p.base_mod or (p.base_mine and _mine(cur_entry, self.node)):
                    writes.append((key, want, cur_mod))
                else:
                    lost.append(key)  # only `nodes release` of this node can do that
            undone = 0
            for u in uncertain:
                if u.key in pending:
                    continue  # the outbox decides the key's value
                cur = current.get(u.key)
                have = cur.value if cur is not None else None
                if cur is not None and u.new is not None and have == u.new.encode():
                    # it landed, but its request was failed: put the key back as it was
                    writes.append((u.key, u.old.encode() if u.old is not None else None, cur.mod_revision))
                    undone += 1
            for key in lost:
                log.error("key=%s msg=%s", key, "an offline write could not be replayed: the key is no "
                          "longer this node's (was the node released while it was offline?)")
            for i in range(0, len(writes), MAX_TXN_OPS):
                chunk = writes[i:i + MAX_TXN_OPS]
                r = self.client.txn([etcd.mod_is(k.encode(), m) for k, _, m in chunk],
                                    [etcd.put(k.encode(), v) if v is not None else etcd.delete(k.encode())
                                     for k, v, _ in chunk])
                if not r.succeeded:
                    raise StoreConflict("*", "a key changed during the replay; replaying again")
            self.replayed += len(writes) - undone
            kvs, rev = self.client.range(self.prefix.encode() + b"/", prefix=True)
            with self._mu:
                self._clear_mirror()
                for kv in kvs:
                    self._apply(kv.key.decode(), kv.value, kv.mod_revision)
                self._rev = rev
                nets = set(self._ips) | set(self._pools)
            self.journal.write(drop_outbox=list(pending), drop_uncertain=[u.key for u in uncertain])
            self._adopt_own()
            was = time.monotonic() - self.offline_since if not self.online else 0.0
            self.online = True
            self._online_event.set()
        log.warning("replayed=%d undone=%d lost=%d offline_s=%.1f msg=%s", len(writes) - undone, undone,
                    len(lost), was, "etcd reachable again: offline writes replayed, back online")
        with contextlib.suppress(Exception):
            self._beat()
        self._notify(dict.fromkeys(nets))

    def _decode_ip(self, key: str, raw: bytes | None) -> Entry | None:
        rest = key[len(self.prefix) + 1:].split("/")
        if raw is None or rest[0] != "ips" or len(rest) != 3:
            return None
        try:
            return entry_from_json(unquote(rest[1]), raw)
        except (ValueError, KeyError, TypeError):
            return None

    def serving(self) -> bool:
        if self.online:
            return True
        with self._mu:  # offline: only while an address of its own is left to hand out
            return any(e.node == self.node and (e.state == RESERVED or self._released_offline(net, e))
                       for net, ips in self._ips.items() for e in ips.values())

    # ---- batches ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if self._batch_owner == threading.get_ident():
            yield  # nested: part of the outer batch
            return
        with self._batch_lock:
            self._batch = _Batch()
            self._batch_owner = threading.get_ident()
            try:
                yield
                self._commit(self._batch)
            finally:
                self._batch = None
                self._batch_owner = None

    @contextlib.contextmanager
    def _op(self) -> Iterator[_Batch]:
        """The running batch of this thread, or a batch of one operation."""
        if self._batch_owner == threading.get_ident():
            assert self._batch is not None
            yield self._batch
            return
        with self.batch():
            assert self._batch is not None
            yield self._batch

    def _view(self, b: _Batch, network: str, ip: str) -> tuple[Entry | None, int]:
        """The entry at an address as the batch sees it, and the revision a write must compare."""
        key = self._ip_key(network, ip)
        if key in b.writes:
            return b.entries.get(key), b.writes[key][1]
        with self._mu:
            return self._ips.get(network, {}).get(ip), self._mods.get(key, 0)

    def _base_mine(self, key: str) -> bool:
        with self._mu:
            p = self._dirty.get(key)
            if p is not None:
                return p.base_mine
            return _mine(self._decode_ip(key, self._raw.get(key)), self.node)

    def _write(self, b: _Batch, key: str, value: bytes | None, base: int, entry: Entry | None = None,
               offline_ok: bool = False) -> None:
        if key not in b.writes:
            with self._mu:
                b.old[key] = self._raw.get(key)
        else:
            base = b.writes[key][1]
        b.writes[key] = (value, base)
        b.entries[key] = entry
        if not offline_ok and not b.unsafe:
            b.unsafe = key

    def _pool_of(self, b: _Batch, network: str) -> tuple[PoolDef, int] | None:
        if network in b.pools:
            return b.pools[network], self._pools.get(network, (None, self.block_size))[1]
        with self._mu:
            return self._pools.get(network)

    def _commit(self, b: _Batch) -> None:
        if not b.writes:
            if b.cursors:
                self.journal.write(cursors=[(n, k, ip) for (n, k), ip in b.cursors.items()])
            return
        if self.online:
            keys = list(b.writes)
            compares = [etcd.mod_is(k.encode(), b.writes[k][1]) for k in keys] + list(b.compares.values())
            success = [etcd.put(k.encode(), v) if v is not None else etcd.delete(k.encode())
                       for k, (v, _) in b.writes.items()]
            extra = [k for k in b.compares if k not in b.writes]
            failure = [etcd.get(k.encode()) for k in keys + extra]
            try:
                r = self.client.txn(compares, success, failure)
            except etcd.EtcdUnavailable as exc:
                if exc.answered and self._refresh(keys + extra):
                    # An election, not an outage: the transaction may or may not have landed;
                    # the keys are read back, and the requests decide again on what etcd holds
                    # (one whose write landed finds its lease).
                    net = next((e.network for e in b.entries.values() if e is not None), "*")
                    raise StoreConflict(net, f"not confirmed: {exc.msg}") from exc
                self._set_offline(exc)
                if b.unsafe:
                    # The transaction may have landed (reply lost): undone on recovery if it did.
                    # Its requests decide again, now offline (from this node's own addresses).
                    self.journal.write(uncertain=[Uncertain(k, base, _text(b.old.get(k)), _text(v))
                                                  for k, (v, base) in b.writes.items()])
                    net = next((e.network for e in b.entries.values() if e is not None), "*")
                    raise StoreConflict(net, f"not written: {exc.msg}") from exc
            else:
                if not r.succeeded:
                    with self._mu:
                        for k, found in zip(keys + extra, r.ranges, strict=True):
                            if found:
                                self._apply(k, found[0].value, found[0].mod_revision)
                            else:
                                self._apply(k, None, 0)
                    net = next((e.network for e in b.entries.values() if e is not None), "*")
                    raise StoreConflict(net, "changed in etcd since this node last saw it")
                own: list[tuple[str, str, int]] = []
                drop: list[str] = []
                with self._mu:
                    for k, (v, _) in b.writes.items():
                        self._apply(k, v, r.revision)
                        if v is not None and self._is_own(k, v):
                            own.append((k, v.decode(), r.revision))
                        else:
                            drop.append(k)
                try:
                    self.journal.write(own=own, drop_own=drop,
                                       cursors=[(n, k, ip) for (n, k), ip in b.cursors.items()])
                except Exception:
                    self._undo(b, r.revision)
                    raise
                return
        if b.unsafe:
            raise StoreUnavailable(f"etcd at {self.client.endpoints_text} unreachable: this change needs "
                                   "etcd (a static address, a new block, an address of another node, a "
                                   "new network); try again later")
        pend: list[Pending] = []
        with self._mu:
            for k, (v, base) in b.writes.items():
                p = self._dirty.get(k) or Pending(k, base, _mine(self._decode_ip(k, self._raw.get(k)),
                                                                 self.node), None)
                p = p._replace(value=_text(v))
                self._dirty[k] = p
                pend.append(p)
                self._apply(k, v, base)
        self.journal.write(outbox=pend, cursors=[(n, k, ip) for (n, k), ip in b.cursors.items()])

    def _refresh(self, keys: list[str], deadline_s: float = 20.0) -> bool:
        """Read `keys` back into the mirror (retrying through an election); False when etcd
        stopped answering altogether."""
        end = time.monotonic() + deadline_s
        while True:
            try:
                r = self.client.txn([], [etcd.get(k.encode()) for k in keys])
            except etcd.EtcdUnavailable as exc:
                if not exc.answered or time.monotonic() > end:
                    return False
                continue
            with self._mu:
                for k, found in zip(keys, r.ranges, strict=True):
                    self._apply(k, found[0].value if found else None, found[0].mod_revision if found else 0)
            return True

    def _undo(self, b: _Batch, revision: int) -> None:
        """The journal refused a committed batch: put etcd back as it was (best effort)."""
        try:
            keys = list(b.writes)
            r = self.client.txn([etcd.mod_is(k.encode(), revision) for k in keys],
                                [etcd.put(k.encode(), b.old[k]) if b.old.get(k) is not None  # type: ignore[arg-type]
                                 else etcd.delete(k.encode()) for k in keys])
            with self._mu:
                for k in keys:
                    self._apply(k, b.old.get(k), r.revision)
        except Exception:
            log.exception("msg=%s", "could not undo a batch the journal refused")

    # ---- pools -----------------------------------------------------------------------------

    def get_pool(self, network: str) -> PoolDef | None:
        with self._mu:
            rec = self._pools.get(network)
            broken = self._broken_pools.get(network)
        if broken is not None:
            raise ConfigError(broken)
        return rec[0] if rec else None

    def put_pool(self, network: str, pool: PoolDef) -> None:
        with self._op() as b:
            key = self._pool_key(network)
            with self._mu:
                old = self._pools.get(network)
                base = self._mods.get(key, 0)
            size = old[1] if old else self.block_size
            b.pools[network] = pool
            value = json.dumps({"pool": wire.pool_to_dict(pool), "blockSize": size},
                               separators=(",", ":"), sort_keys=True).encode()
            self._write(b, key, value, base)
            if old is not None and old[0] != pool:
                # block boundaries follow the allocatable addresses: claims start over (affinity only)
                with self._mu:
                    claimed = [(k, n) for (net, k), c in self._claims.items() if net == network for n in c]
                for k, n in claimed:
                    bk = self._block_key(network, k, n)
                    self._write(b, bk, None, self._mods.get(bk, 0))

    def probe_write(self) -> None:
        """Store.probe_write: the local journal's heartbeat (what a full disk stops; etcd's own
        writes are the node heartbeat's business, and an etcd outage is Cluster.serving's)."""
        self.journal.probe_write()

    def networks(self) -> list[str]:
        with self._mu:
            return sorted({*self._pools, *self._broken_pools})

    # ---- entries ---------------------------------------------------------------------------

    def reserve(self, entries: Sequence[Entry], *, advance_cursor: bool = True) -> None:
        with self._op() as b:
            seen: set[tuple[str, str]] = set()
            for e in entries:
                ip = str(e.ip)
                if (e.network, ip) in seen:
                    raise StoreConflict(e.network, "duplicate address in one reservation")
                seen.add((e.network, ip))
                cur, base = self._view(b, e.network, ip)
                if cur is not None and (cur.state == ACTIVE or (cur.state == RESERVED
                                                                and cur.node != self.node)):
                    raise StoreConflict(e.network, ip)
                key = self._ip_key(e.network, ip)
                self._check_pool(b, e)
                new = replace(e, state=ACTIVE, node=self.node, conflict_mac="")
                self._write(b, key, entry_to_json(new), base, new, offline_ok=self._base_mine(key))
                if advance_cursor:
                    b.cursors[(e.network, e.subnet_index)] = ip

    def _check_pool(self, b: _Batch, e: Entry) -> None:
        """The address must be grantable by the stored definition, compared in the transaction;
        an address in a block nobody claimed claims it in the same transaction."""
        rec = self._pool_of(b, e.network)
        if rec is None:
            return
        pool, size = rec
        if e.subnet_index >= len(pool.subnets) or not pool.subnets[e.subnet_index].grantable(e.ip):
            raise StoreConflict(e.network, f"{e.ip} is not grantable by the stored definition")
        pkey = self._pool_key(e.network)
        if pkey not in b.writes and pkey not in b.compares:
            with self._mu:
                b.compares[pkey] = etcd.mod_is(pkey.encode(), self._mods.get(pkey, 0))
        geo = self._blocks(e.network, e.subnet_index, pool, size)
        n = geo.of(e.ip)
        if n is None:
            return
        with self._mu:
            claimed = n in self._claims.get((e.network, e.subnet_index), {})
        if claimed or (e.network, e.subnet_index, n) in b.claims:
            return
        b.claims.add((e.network, e.subnet_index, n))
        bkey = self._block_key(e.network, e.subnet_index, n)
        b.compares[bkey] = etcd.absent(bkey.encode())
        value = json.dumps({"node": self.node, "claimedMs": int(self.clock() * 1000)}).encode()
        self._write(b, bkey, value, 0)  # the base compare (mod 0) is create-if-absent too

    def _blocks(self, network: str, k: int, pool: PoolDef, size: int) -> Blocks:
        with self._mu:
            geo = self._geo.get((network, k))
            if geo is None or geo.spec != pool.subnets[k] or geo.size != size:
                geo = self._geo[(network, k)] = Blocks(pool.subnets[k], size)
            return geo

    def quarantine(self, network: str, ip: str, *, conflict_mac: str, now_ms: int) -> Entry | None:
        with self._op() as b:
            cur, base = self._view(b, network, ip)
            if cur is None:
                return None
            new = replace(cur, state=QUARANTINED, conflict_mac=conflict_mac, changed_ms=now_ms)
            key = self._ip_key(network, ip)
            self._write(b, key, entry_to_json(new), base, new, offline_ok=self._base_mine(key))
            return new

    def release_by_owner(self, network: str | None, container_id: str, ifname: str,
                         now_ms: int) -> list[Entry]:
        with self._op() as b:
            out = []
            for net, ip in self._held(b, network, container_id, ifname):
                cur, base = self._view(b, net, ip)
                if cur is None or cur.state != ACTIVE or cur.node != self.node:
                    continue
                new = replace(cur, state=RELEASED, changed_ms=now_ms)
                self._write(b, self._ip_key(net, ip), entry_to_json(new), base, new, offline_ok=True)
                out.append(new)
            return sorted(out, key=lambda e: (e.network, e.subnet_index))

    def _held(self, b: _Batch, network: str | None, container_id: str, ifname: str) -> list[tuple[str, str]]:
        """(network, ip) of the attachment's active entries of this node, the batch included."""
        with self._mu:
            found = {(o[0], ip) for o, ips in self._owners.items()
                     if o[1:] == (container_id, ifname) and (network is None or o[0] == network)
                     for ip in ips}
        for key, e in b.entries.items():
            if e is not None and e.container_id == container_id and e.ifname == ifname and \
                    (network is None or e.network == network) and key.startswith(f"{self.prefix}/ips/"):
                found.add((e.network, str(e.ip)))
        return sorted(found)

    def get_by_owner(self, network: str, container_id: str, ifname: str) -> list[Entry]:
        b = self._batch if self._batch_owner == threading.get_ident() else None
        if b is not None:
            out = [e for n, ip in self._held(b, network, container_id, ifname)
                   if (e := self._view(b, n, ip)[0]) is not None and e.state == ACTIVE]
            return sorted(out, key=lambda e: e.subnet_index)
        with self._mu:
            ips = self._owners.get((network, container_id, ifname), set())
            out = [self._ips[network][ip] for ip in ips]
        return sorted(out, key=lambda e: e.subnet_index)

    def get_entry(self, network: str, ip: str) -> Entry | None:
        b = self._batch if self._batch_owner == threading.get_ident() else None
        if b is not None:
            return self._view(b, network, ip)[0]
        with self._mu:
            return self._ips.get(network, {}).get(ip)

    def list_entries(self, network: str | None = None, states: Iterable[str] = (ACTIVE,),
                     node: str | None = None) -> list[Entry]:
        wanted = set(states)
        with self._mu:
            nets = [network] if network is not None else list(self._ips)
            out = [e for n in nets for e in self._ips.get(n, {}).values()
                   if e.state in wanted and (node is None or e.node == node)]
        out.sort(key=lambda e: (e.network, e.subnet_index, int(e.ip)))
        return out

    def get_cursor(self, network: str, subnet_index: int) -> str | None:
        b = self._batch if self._batch_owner == threading.get_ident() else None
        if b is not None and (network, subnet_index) in b.cursors:
            return b.cursors[(network, subnet_index)]
        return self.journal.cursor(network, subnet_index)

    # ---- the cluster side (ipamd.store.Cluster) --------------------------------------------

    def placement(self, network: str, subnet_index: int) -> Placement | None:
        with self._mu:
            rec = self._pools.get(network)
            if rec is None:
                return None
            geo = self._blocks(network, subnet_index, rec[0], rec[1])
            ips = self._ips.get(network, {})
            held = self._mine.get((network, subnet_index, RESERVED), ())
            reserve = tuple(sorted((IPAddress(ip) for ip in held), key=int))
            outage: tuple[IPAddress, ...] = ()
            if not self.online:  # its reserve, and its own leases released since the outage began
                released = [ips[ip] for ip in self._mine.get((network, subnet_index, RELEASED), ())]
                back = [e.ip for e in released if self._released_offline(network, e)]
                outage = tuple(sorted([*reserve, *back], key=int))
            key = (network, subnet_index)
            return Placement(node=self.node, blocks=geo, own=self._own_blocks.get(key, ()),
                             claimed=self._claims.get(key, {}), offline=not self.online,
                             outage=outage, reserve=reserve)

    def _released_offline(self, network: str, e: Entry) -> bool:
        p = self._dirty.get(self._ip_key(network, str(e.ip)))
        return e.state == RELEASED and p is not None and p.base_mine

    def reserve_target(self, network: str, subnet_index: int, free: int, total: int) -> int:
        """Hold `outage_reserve` addresses while the subnet entry is roomy; give them back when
        it runs low (free addresses < 4 x reserve x live nodes), so that the reserves never make
        the pool look exhausted while addresses are free. Unchanged while offline."""
        if not self.online:
            return len(self.reserved_by_me(network, subnet_index))
        with self._mu:
            live = max(1, len(self._hb))
        want = self.outage_reserve
        if want == 0 or total < 8 * want * live or free < 4 * want * live:
            return 0
        return want

    def reserved_by_me(self, network: str, subnet_index: int) -> list[Entry]:
        with self._mu:
            ips = self._ips.get(network, {})
            return sorted((ips[ip] for ip in self._mine.get((network, subnet_index, RESERVED), ())),
                          key=lambda e: int(e.ip))

    def hold(self, entries: Sequence[Entry]) -> None:
        with self._op() as b:
            for e in entries:
                cur, base = self._view(b, e.network, str(e.ip))
                if cur is not None and cur.state in (ACTIVE, RESERVED, QUARANTINED):
                    raise StoreConflict(e.network, str(e.ip))
                self._check_pool(b, e)
                new = replace(e, state=RESERVED, node=self.node)
                self._write(b, self._ip_key(e.network, str(e.ip)), entry_to_json(new), base, new)

    def give_back(self, network: str, ips: Sequence[str]) -> None:
        with self._op() as b:
            for ip in ips:
                cur, base = self._view(b, network, ip)
                if cur is None or cur.state != RESERVED or cur.node != self.node:
                    continue
                self._write(b, self._ip_key(network, ip), None, base, None)

    def nodes(self) -> list[NodeInfo]:
        with self._mu:
            names = set(self._hb)
            counts: dict[str, list[int]] = {}
            for ips in self._ips.values():
                for e in ips.values():
                    c = counts.setdefault(e.node, [0, 0])
                    c[0] += e.state == ACTIVE
                    c[1] += e.state == RESERVED
            blocks: dict[str, list[BlockInfo]] = {}
            for (net, k), claims in self._claims.items():
                rec = self._pools.get(net)
                for n, who in sorted(claims.items()):
                    first = last = ""
                    if rec is not None and k < len(rec[0].subnets):
                        geo = self._blocks(net, k, rec[0], rec[1])
                        if n < geo.count:
                            a, z = geo.first_last(n)
                            first, last = str(a), str(z)
                    known = rec is not None and k < len(rec[0].subnets)
                    subnet = str(rec[0].subnets[k].subnet) if rec is not None and known else ""
                    blocks.setdefault(who, []).append(BlockInfo(net, subnet, n, first, last))
            names |= {n for n in counts if n} | set(blocks)
            return [NodeInfo(n, n in self._hb, tuple(blocks.get(n, ())), counts.get(n, [0, 0])[0],
                             counts.get(n, [0, 0])[1]) for n in sorted(names)]

    def release_node(self, node: str) -> NodeRelease:
        """Free a dead node's blocks, leases (released: they cool down) and outage reserve."""
        if not self.online:
            raise StoreUnavailable(f"etcd at {self.client.endpoints_text} unreachable: try again later")
        if node == self.node:
            raise NodeAlive(f"node {node} is this ipamd's own node: it is alive")
        kvs, _ = self.client.range(self._node_key(node).encode())
        if kvs:
            raise NodeAlive(f"node {node} is alive (its heartbeat key {self._node_key(node)} holds an etcd "
                            "lease): stop its ipamd first, or wait for the lease to expire")
        now = int(self.clock() * 1000)
        with self._batch_lock:
            with self._mu:
                ops: list[tuple[str, bytes | None, int]] = []
                leases = reserved = blocks = 0
                for net, ips in self._ips.items():
                    for ip, e in ips.items():
                        key = self._ip_key(net, ip)
                        if e.node != node:
                            continue
                        if e.state == ACTIVE:
                            ops.append((key, entry_to_json(replace(e, state=RELEASED, changed_ms=now)),
                                        self._mods[key]))
                            leases += 1
                        elif e.state == RESERVED:
                            ops.append((key, None, self._mods[key]))
                            reserved += 1
                for (net, k), claims in self._claims.items():
                    for n, who in claims.items():
                        if who == node:
                            bk = self._block_key(net, k, n)
                            ops.append((bk, None, self._mods[bk]))
                            blocks += 1
            changed: dict[str, list[tuple[IPAddress, Entry | None]] | None] = {}
            for i in range(0, len(ops), MAX_TXN_OPS):
                chunk = ops[i:i + MAX_TXN_OPS]
                r = self.client.txn([etcd.mod_is(k.encode(), m) for k, _, m in chunk],
                                    [etcd.put(k.encode(), v) if v is not None else etcd.delete(k.encode())
                                     for k, v, _ in chunk])
                if not r.succeeded:
                    raise StoreConflict("*", f"node {node}'s keys changed while releasing them; try again")
                with self._mu:
                    for key, v, _ in chunk:
                        ch = self._apply(key, v, r.revision)
                        if ch is not None:
                            lst = changed.setdefault(ch[0], [])
                            if lst is not None:
                                lst.append((ch[1], ch[2]))
        self._notify(changed)
        log.warning("node=%s leases=%d reserved=%d blocks=%d msg=%s", node, leases, reserved, blocks,
                    "released a dead node's leases, outage reserve and blocks")
        return NodeRelease(leases, blocks, reserved)

    def counts(self) -> dict[str, int]:
        return self.client.request_counts()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        if self._hb_lease and self.online:
            with contextlib.suppress(Exception):
                self.client.lease_revoke(self._hb_lease)
        self.client.close()
        self.journal.close()


def _text(v: bytes | None) -> str | None:
    return v.decode() if v is not None else None


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError), open(path, encoding="ascii") as f:
            mid = f.read().strip()
            if mid:
                return mid
    return os.uname().nodename
