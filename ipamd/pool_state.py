"""The allocator's in-memory picture of each network: the definition in use and the occupancy of
its subnet entries.

Why: deciding against memory keeps a request's cost independent of the pool's size and of the
store's speed (occupancy.py). The picture is a hint, never the truth: it is built from the store
(at start, on first use, after a definition change), kept up to date by every decision, and
dropped (`clear`) when a batch fails, because the store then holds exactly the durable writes.
Not thread-safe by itself: every method runs under the commit pipeline's lock.

A changed definition is *staged*: used in memory at once, written only together with the
reservation of the request that brought it, so a request that then fails leaves the store as it
was (`unstage`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from netaddr import IPAddress

from core.spec import ConfigError, PoolDef
from ipamd import policy
from ipamd.errors import NetworkQuarantined
from ipamd.model import ACTIVE, QUARANTINED, RELEASED, RESERVED, Entry
from ipamd.occupancy import SubnetOccupancy
from ipamd.store import Store

log = logging.getLogger("ipamd.pool_state")


class PoolState:
    def __init__(self, store: Store, *, default_cooldown_s: int, quarantine_s: int,
                 now_ms: Callable[[], int]) -> None:
        self.store = store
        self.default_cooldown_s = default_cooldown_s
        self.quarantine_ms = quarantine_s * 1000
        self.now_ms = now_ms
        self._pools: dict[str, PoolDef] = {}
        self._occ: dict[str, list[SubnetOccupancy]] = {}
        self._staged: dict[str, PoolDef] = {}  # definitions in use but not yet queued for writing
        # Networks whose stored definition does not parse -> why. Kept until ipamd restarts: the
        # store is repaired with the daemon stopped (README Troubleshooting).
        self._broken: dict[str, str] = {}

    def clear(self, networks: Iterable[str] | None = None) -> None:
        """Forget everything (or these networks): rebuilt from the store on next use."""
        if networks is None:
            self._occ.clear()
            self._pools.clear()
            self._staged.clear()
            return
        for net in networks:
            self._occ.pop(net, None)
            self._pools.pop(net, None)
            self._staged.pop(net, None)

    def apply_external(self, network: str, changes: Iterable[tuple[IPAddress, Entry | None]]) -> None:
        """Another node's writes (a cluster store's watch): set their addresses' occupancy."""
        pool, occ_list = self._pools.get(network), self._occ.get(network)
        if pool is None or occ_list is None:
            return  # not built: it will be built from the store, which has them
        now = self.now_ms()
        for ip, e in changes:
            k = policy.subnet_of(pool, ip, e.subnet_index if e is not None else 0)
            off = occ_list[k].offset(ip) if k is not None else None
            if k is not None and off is not None:
                policy.load_entry(occ_list[k], off, e, now_ms=now, cooldown_ms=self.cooldown_ms(pool),
                                  quarantine_ms=self.quarantine_ms)

    def pool(self, network: str) -> PoolDef | None:
        """The definition in use (staged, else stored); None for a network never used. Raises
        NetworkQuarantined when its stored definition does not parse (that network only: every
        other one is served as usual)."""
        if network in self._broken:
            raise self._refusal(network)
        if network not in self._pools:
            try:
                pool = self.store.get_pool(network)
            except ConfigError as exc:
                self._broken[network] = str(exc)
                log.error("network=%s error=%s msg=%s", network, exc,
                          "stored definition does not parse: network quarantined (its allocations are "
                          "refused, its releases served; every other network is served)")
                raise self._refusal(network) from exc
            if pool is None:
                return None
            self._pools[network] = pool
        return self._pools[network]

    def _refusal(self, network: str) -> NetworkQuarantined:
        return NetworkQuarantined(
            f"network {network} is quarantined by ipamd: its stored definition does not parse "
            f"({self._broken[network]}); allocations in it are refused until it is repaired "
            "(README: Troubleshooting); releases still work")

    def usable_pool(self, network: str) -> PoolDef | None:
        """pool(), but None for a quarantined network (for what must serve the others)."""
        try:
            return self.pool(network)
        except NetworkQuarantined:
            return None

    def quarantined(self) -> dict[str, str]:
        """Quarantined networks -> why."""
        return dict(self._broken)

    def cooldown_ms(self, pool: PoolDef) -> int:
        return policy.cooldown_ms(pool, self.default_cooldown_s)

    def occupancy(self, network: str) -> list[SubnetOccupancy]:
        """Built once per network from the store (at start, or first use after a definition
        change or a failed commit, when no write of the network is queued), then kept up to date
        by every decision."""
        occ = self._occ.get(network)
        if occ is not None:
            return occ
        pool = self.pool(network)
        assert pool is not None
        occ = policy.build_occupancy(
            pool, self.store.list_entries(network, (ACTIVE, RELEASED, QUARANTINED, RESERVED)),
            [self.store.get_cursor(network, k) for k in range(len(pool.subnets))],
            now_ms=self.now_ms(), cooldown_ms=self.cooldown_ms(pool), quarantine_ms=self.quarantine_ms)
        self._occ[network] = occ
        return occ

    # ---- definitions -------------------------------------------------------------------------

    def stage(self, network: str, pool: PoolDef) -> bool:
        """Use `pool` in memory; True when it still has to be written to the store. A changed
        definition is checked against the network's live leases first (the caller runs
        quiesced, so the store lists them all)."""
        old = self.pool(network)
        if old is pool:
            return False
        if old == pool:
            self._pools[network] = pool  # the same definition: next time, identity says so
            return False
        if old is not None:
            policy.check_change(network, old, pool, self.store.list_entries(network, (ACTIVE,)))
            log.warning("network=%s msg=%s", network, "pool definition changed (safe change accepted)")
        self._pools[network] = pool
        self._occ.pop(network, None)
        self._staged[network] = pool
        return True

    def take_staged(self, network: str) -> PoolDef | None:
        """The staged definition, now to be queued for writing (no longer undone by `unstage`)."""
        return self._staged.pop(network, None)

    def unstage(self, network: str) -> None:
        """The request that staged a definition failed before queueing it: forget it."""
        if self._staged.pop(network, None) is not None:
            self._pools.pop(network, None)  # reload the stored definition (if any) next time
            self._occ.pop(network, None)

    # ---- occupancy updates once a write is durable -------------------------------------------

    def released(self, entries: Iterable[Entry]) -> None:
        """A release is durable: its addresses cool down."""
        now = self.now_ms()
        for e in entries:
            pool = self.usable_pool(e.network)
            occ_list = self._occ.get(e.network)
            if pool is None or occ_list is None:
                continue  # not built: it will be built from the store, which has the release
            k = policy.subnet_of(pool, e.ip, e.subnet_index)
            off = occ_list[k].offset(e.ip) if k is not None else None
            if k is not None and off is not None and occ_list[k].is_active(off):
                occ_list[k].mark_released(off, e.changed_ms + self.cooldown_ms(pool), now)
