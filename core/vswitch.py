"""Open_vSwitch operations: our ports on a bridge, as RFC 7047 transactions (core/ovsdb.py).

What: pure builders that turn intent into `Step`s (add a port: `add_port_steps`; delete our
ports: `delete_steps`; wait for ovs-vswitchd to attach a port: `ofport_steps`; merge ids:
`set_ids_steps`) and `Vswitch`, which only looks rows up, calls the builders and sends, over one
`OvsdbClient(remote, "Open_vSwitch")`. Every call is one to three `transact`s whose `where`
clauses name the rows (by name, by _uuid, by `external_ids includes`), so no request or reply
grows with the bridge: ADD 1.6 ms + the ofport wait, DEL 2.3 ms, at 10 and at 1000 ports
(ovsdb-server still scans the Interface table for an `external_ids includes` where, in C, and
rewrites Bridge.ports on attach/detach: ~0.3 ms more per write at 1000 ports). The column names
used are stable in the Open_vSwitch schema.

Ownership: our Port and Interface rows carry external_ids `owner=ovs-underlay`, `container_id`,
`ifname` (Interface also netns, network, pod, attached MAC, IPs); ipamd's probe ports carry
`owner=ovs-underlay-ipamd` instead, and a `Vswitch(owner=...)` acts as that owner only. We
never delete a row whose owner is not ours: deletes are guarded in the same transaction by a
`wait` on the owning row still being ours (and unchanged since we looked), so a race aborts the
transaction instead of removing someone else's port. Replacing a stale port of ours is delete +
add in ONE transaction.

ADD waits until ovs-vswitchd has attached the port: an RFC 7047 `wait` on Interface.ofport
"!=" empty makes ovsdb-server hold the reply until ovs-vswitchd writes ofport (one round trip,
where ovs-cni polls). On the netdev datapath that wait is ~1 ms at 10 ports with ovs-vswitchd
idle (~12 ms right behind another change) and 30-60 ms at 1000 ports: it is ovs-vswitchd
reconfiguring the bridge, O(ports) inside OVS. ofport -1 means OVS could not open the device:
ADD fails with Interface.error and removes the port it just added (the caller's rollback only
covers an add_port that returned).

Errors (core.errors): a same-named row that is not ours is `NotOwned`, a missing bridge
`Missing`, an attach that does not come within OFPORT_WAIT_MS `Unavailable` (back-pressure, try
again), anything else from core/ovsdb.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import CoreError, Missing, NotOwned, Unavailable
from core.names import DEFAULT_OVSDB, OWNER
from core.ovsdb import (
    Changed,
    NamedUuid,
    OvsdbClient,
    Step,
    Uuid,
    eq,
    from_atom,
    includes,
    map_of,
    op_comment,
    op_delete,
    op_insert,
    op_mutate,
    op_select,
    op_wait,
    optional,
    rows_of,
    set_of,
    to_datum,
)

DEFAULT_REMOTE = DEFAULT_OVSDB
DB = "Open_vSwitch"
# Upper bound for ovs-vswitchd to attach a new port (ofport set). It reconfigures the bridge on
# every change, so during a burst of ADDs on a busy node this takes seconds, not milliseconds:
# that is back-pressure, not a broken port (a broken one gets ofport -1 at once). Within the
# client deadline (10 s); kubelet waits minutes.
OFPORT_WAIT_MS = 8000
_ATTEMPTS = 3  # a lookup-then-write raced with another writer: redo it this often
PORT_COLUMNS = ["_uuid", "name", "interfaces", "tag", "trunks", "vlan_mode", "external_ids"]
IFACE_COLUMNS = ["_uuid", "external_ids", "ofport"]
_log = logging.getLogger("ovs-underlay.ovsdb")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class PortSpec:
    """One access/trunk port to plug. `tag` alone = access port; `trunks` alone = trunk;
    both = trunk with native (untagged) VLAN `tag`; neither = carries every VLAN."""

    name: str
    bridge: str
    tag: int | None = None
    trunks: tuple[int, ...] = ()
    iface_ids: Mapping[str, str] = field(default_factory=dict)
    port_ids: Mapping[str, str] = field(default_factory=dict)
    ofport_request: int | None = None
    iface_type: str = ""  # Interface.type: "" (a system device: our veths), "internal" (probe ports)


@dataclass(frozen=True)
class BridgeView:
    """What the plugin checks of a bridge before plugging into it."""

    datapath_type: str
    external_ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PortInfo:
    name: str
    bridge: str | None
    tag: int | None
    trunks: tuple[int, ...]
    vlan_mode: str | None
    port_ids: Mapping[str, str]
    iface_ids: Mapping[str, str]
    ofport: int | None
    uuid: str = ""  # the Port row's _uuid: what `delete_port_if` compares


@dataclass(frozen=True)
class Found:
    """What OVSDB holds under one port name (see `lookup_steps`)."""

    name: str
    port: str | None = None  # Port._uuid
    port_ids: Mapping[str, str] = field(default_factory=dict)
    port_ifaces: tuple[str, ...] = ()  # Port.interfaces
    iface: str | None = None  # _uuid of the Interface with this name
    iface_ids: Mapping[str, str] = field(default_factory=dict)
    me: str = OWNER  # the owner we act as (ipamd's probe ports: names.PROBE_OWNER)

    @property
    def owner(self) -> str | None:
        """The Port's owner id, else that of its Interface of the same name."""
        iface_owner = None if self.stray_iface else self.iface_ids.get("owner")
        return self.port_ids.get("owner") or iface_owner or None

    @property
    def ours(self) -> bool:
        return self.port is not None and self.owner == self.me

    @property
    def stray_iface(self) -> bool:
        """An Interface of this name that is not in the Port of this name."""
        return self.iface is not None and self.iface not in self.port_ifaces


def port_columns(spec: PortSpec) -> dict[str, Any]:
    """Port row columns for `spec` (python values: optional columns are lists)."""
    cols: dict[str, Any] = {"name": spec.name, "external_ids": dict(spec.port_ids)}
    cols["tag"] = [spec.tag] if spec.tag is not None else []
    cols["trunks"] = sorted(set(spec.trunks))
    if spec.trunks and spec.tag is not None:
        cols["vlan_mode"] = ["native-untagged"]
    elif spec.trunks:
        cols["vlan_mode"] = ["trunk"]
    elif spec.tag is not None:
        cols["vlan_mode"] = ["access"]
    else:
        cols["vlan_mode"] = []
    return cols


def iface_columns(spec: PortSpec) -> dict[str, Any]:
    cols: dict[str, Any] = {"name": spec.name, "type": spec.iface_type, "external_ids": dict(spec.iface_ids)}
    if spec.ofport_request is not None:
        cols["ofport_request"] = [spec.ofport_request]
    return cols


def matches(ids: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(ids.get(k) == v for k, v in want.items())


# ---------------------------------------------------------------------------------------------
# Steps (pure)


def bridge_steps(bridge: str) -> list[Step]:
    return [Step(op_select("Bridge", [eq("name", bridge)], ["datapath_type", "external_ids"]),
                 f"read bridge {bridge}")]


def lookup_steps(names: Sequence[str]) -> list[Step]:
    """Two selects per name: the Port and the Interface of that name (ownership, uuids)."""
    out: list[Step] = []
    for n in names:
        out.append(Step(op_select("Port", [eq("name", n)], ["_uuid", "external_ids", "interfaces"]),
                        f"look up port {n}"))
        out.append(Step(op_select("Interface", [eq("name", n)], ["_uuid", "external_ids"]),
                        f"look up interface {n}"))
    return out


def parse_lookup(names: Sequence[str], results: Sequence[Mapping[str, Any]], me: str = OWNER) -> list[Found]:
    out = []
    for i, n in enumerate(names):
        ports, ifaces = rows_of(results[2 * i]), rows_of(results[2 * i + 1])
        f = Found(n, me=me)
        if ports:
            p = ports[0]
            f = Found(n, port=from_atom(p["_uuid"]), port_ids=map_of(p["external_ids"]),
                      port_ifaces=tuple(set_of(p["interfaces"])), me=me)
        if ifaces:
            f = Found(n, f.port, f.port_ids, f.port_ifaces, iface=from_atom(ifaces[0]["_uuid"]),
                      iface_ids=map_of(ifaces[0]["external_ids"]), me=me)
        out.append(f)
    return out


def _unchanged_guard(found: Found) -> list[Step]:
    """`wait` ops that abort the transaction unless the Port and the Interface named
    `found.name` are exactly the rows we looked up (or still absent)."""
    changed = Changed(f"port {found.name}")
    out = []
    for table, uuid in (("Port", found.port), ("Interface", found.iface)):
        rows = [{"_uuid": to_datum(Uuid(uuid))}] if uuid else []
        out.append(Step(op_wait(table, [eq("name", found.name)], ["_uuid"], "==", rows, 0),
                        f"{table} {found.name} unchanged since lookup", error=changed))
    return out


def _owned_guard(found: Found) -> Step:
    """A `wait` that aborts the transaction unless the row proving our ownership still does."""
    assert found.port is not None
    by_port = found.port_ids.get("owner") == found.me
    table, uuid = ("Port", found.port) if by_port else ("Interface", found.iface)
    assert uuid is not None
    return Step(op_wait(table, [eq("_uuid", Uuid(uuid)), includes("external_ids", {"owner": found.me})],
                        ["_uuid"], "==", [{"_uuid": to_datum(Uuid(uuid))}], 0),
                f"port {found.name} still owned by {found.me}", error=Changed(f"port {found.name}"))


def _remove(found: Found) -> list[Step]:
    """Detach our port from whichever bridge holds it and delete its Port and Interface rows."""
    assert found.port is not None
    port = Uuid(found.port)
    out = [Step(op_mutate("Bridge", [includes("ports", [port])], [["ports", "delete", to_datum([port])]]),
                f"detach port {found.name} from its bridge", count=1),
           Step(op_delete("Port", [eq("_uuid", port)]), f"delete port {found.name}", count=1)]
    out += [Step(op_delete("Interface", [eq("_uuid", Uuid(i))]), f"delete interface of {found.name}", count=1)
            for i in found.port_ifaces]
    return out


def add_port_steps(spec: PortSpec, found: Found) -> list[Step]:
    """ONE transaction: the bridge must exist, the name's rows must be as looked up, a stale
    port of ours is removed, and the new Interface + Port are inserted and attached. Raises
    NotOwned (and builds nothing) when the name is held by a row that is not ours; the bridge
    guard fails with Missing."""
    if found.port is not None and not found.ours:
        raise NotOwned(f"OVS port {spec.name} exists and is not owned by {found.me} (owner {found.owner!r}); "
                       "not replacing it")
    if found.stray_iface:
        raise NotOwned(f"OVS interface {spec.name} exists in another port (owner "
                       f"{found.iface_ids.get('owner')!r}); not replacing it")
    no_bridge = Missing(f"OVS bridge {spec.bridge!r} does not exist")
    steps = [Step(op_comment(f"ovs-underlay: add port {spec.name} to {spec.bridge}"), "comment"),
             Step(op_wait("Bridge", [eq("name", spec.bridge)], ["name"], "==", [{"name": spec.bridge}], 0),
                  f"bridge {spec.bridge} exists", error=no_bridge),
             *_unchanged_guard(found)]
    if found.port is not None:
        steps += _remove(found)
    port_row = {**port_columns(spec), "interfaces": [NamedUuid("iface")]}
    steps += [Step(op_insert("Interface", iface_columns(spec), "iface"), f"insert interface {spec.name}"),
              Step(op_insert("Port", port_row, "port"), f"insert port {spec.name}"),
              Step(op_mutate("Bridge", [eq("name", spec.bridge)],
                             [["ports", "insert", to_datum([NamedUuid("port")])]]),
                   f"attach port {spec.name} to bridge {spec.bridge}", count=1)]
    return steps


def ofport_steps(name: str, timeout_ms: int) -> list[Step]:
    """Hold the reply until ovs-vswitchd has set Interface.ofport (or `timeout_ms`), then read it."""
    late = Unavailable(f"ovs-vswitchd did not attach OVS port {name} within {timeout_ms} ms",
                       "is ovs-vswitchd running and keeping up?")
    return [Step(op_wait("Interface", [eq("name", name)], ["ofport"], "!=", [{"ofport": to_datum([])}],
                         timeout_ms), f"wait for ofport of {name}", error=late),
            Step(op_select("Interface", [eq("name", name)], ["ofport", "error"]), f"read ofport of {name}")]


def delete_steps(found: Sequence[Found]) -> list[Step]:
    """ONE transaction removing every port in `found` that is ours; each removal is guarded by
    its ownership still holding. Empty when nothing is ours."""
    steps: list[Step] = []
    for f in found:
        if f.ours:
            steps += [_owned_guard(f), *_remove(f)]
    if steps:
        names = ", ".join(f.name for f in found if f.ours)
        steps.insert(0, Step(op_comment(f"ovs-underlay: delete ports {names}"), "comment"))
    return steps


def set_ids_steps(name: str, ids: Mapping[str, str], owner: str = OWNER) -> list[Step]:
    """Merge `ids` into external_ids of OUR Interface `name` (delete the keys, insert the pairs)."""
    return [Step(op_mutate("Interface", [eq("name", name), includes("external_ids", {"owner": owner})],
                           [["external_ids", "delete", to_datum(sorted(ids))],
                            ["external_ids", "insert", to_datum(dict(ids))]]),
                 f"update external_ids of {name}")]


def port_info(port: Mapping[str, Any], bridge: str | None, iface: Mapping[str, Any] | None) -> PortInfo:
    return PortInfo(
        name=str(port["name"]), bridge=bridge, tag=optional(port["tag"]),
        trunks=tuple(sorted(set_of(port["trunks"]))), vlan_mode=optional(port["vlan_mode"]),
        port_ids=map_of(port["external_ids"]), iface_ids=map_of(iface["external_ids"]) if iface else {},
        ofport=optional(iface["ofport"]) if iface else None, uuid=str(from_atom(port["_uuid"])))


# ---------------------------------------------------------------------------------------------
# Client


class Vswitch:
    """Our ports in the Open_vSwitch database, over one OVSDB connection (opened on first use,
    closed by close()). Every public call has a deadline of `timeout_s` seconds."""

    def __init__(self, remote: str = DEFAULT_REMOTE, timeout_s: float = 10.0,
                 db: OvsdbClient | None = None, owner: str = OWNER) -> None:
        # `db`: share a connection with other Open_vSwitch operations (core/bridges.py).
        self.db = db if db is not None else OvsdbClient(remote, DB, timeout_s)
        self.owner = owner  # the external_ids:owner we act as: we touch only rows of this owner

    @property
    def remote(self) -> str:
        return self.db.remote

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Vswitch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -----------------------------------------------------------------------------

    def bridge_view(self, bridge: str) -> BridgeView | None:
        """The bridge's datapath type and external_ids (provider-network readiness), in one
        select; None when it does not exist."""
        rows = rows_of(self.db.transact(bridge_steps(bridge))[0])
        if not rows:
            return None
        return BridgeView(str(rows[0]["datapath_type"]) or "system", map_of(rows[0]["external_ids"]))

    def bridge_datapath(self, bridge: str) -> str | None:
        """The bridge's datapath type ("system" when empty), or None when it does not exist."""
        view = self.bridge_view(bridge)
        return view.datapath_type if view else None

    def _infos(self, ports: list[dict[str, Any]], ifaces: Mapping[str, dict[str, Any]],
               deadline: float) -> list[PortInfo]:
        """PortInfos for Port rows, in ONE request: each port's bridge (Bridge where ports
        includes it) and, unless `ifaces` holds one of its interfaces, its first Interface."""
        steps: list[Step] = []
        chosen: list[str | None] = []
        for p in ports:
            members = set_of(p["interfaces"])
            pick = next((i for i in members if i in ifaces), members[0] if members else None)
            chosen.append(pick)
            steps.append(Step(op_select("Bridge", [includes("ports", [from_atom(p["_uuid"])])], ["name"]),
                              f"find bridge of port {p['name']}"))
            if pick is not None and pick not in ifaces:
                steps.append(Step(op_select("Interface", [eq("_uuid", pick)], IFACE_COLUMNS),
                                  f"read interface of port {p['name']}"))
        if not steps:
            return []
        results = iter(self.db.transact(steps, deadline))
        out = []
        for p, pick in zip(ports, chosen, strict=True):
            bridges = rows_of(next(results))
            iface: dict[str, Any] | None = None
            if pick is not None and pick in ifaces:
                iface = ifaces[pick]
            elif pick is not None:
                rows = rows_of(next(results))
                iface = rows[0] if rows else None
            out.append(port_info(p, str(bridges[0]["name"]) if bridges else None, iface))
        return out

    def get_port(self, name: str) -> PortInfo | None:
        deadline = self.db.deadline()
        rows = rows_of(self.db.transact([Step(op_select("Port", [eq("name", name)], PORT_COLUMNS),
                                           f"read port {name}")], deadline)[0])
        return self._infos(rows, {}, deadline)[0] if rows else None

    def find_ports(self, want: Mapping[str, str]) -> list[PortInfo]:
        """Ports whose Interface external_ids contain all of `want` (plus our owner)."""
        deadline = self.db.deadline()
        want = {"owner": self.owner, **want}
        ifaces = rows_of(self.db.transact([Step(
            op_select("Interface", [includes("external_ids", want)], IFACE_COLUMNS),
            "find interfaces by external_ids")], deadline)[0])
        if not ifaces:
            return []
        by_uuid = {from_atom(i["_uuid"]): i for i in ifaces}
        results = self.db.transact([Step(op_select("Port", [includes("interfaces", [u])], PORT_COLUMNS),
                                      "find port of interface") for u in by_uuid], deadline)
        ports: dict[str, dict[str, Any]] = {}
        for r in results:
            for p in rows_of(r):
                ports.setdefault(from_atom(p["_uuid"]), p)
        return self._infos(list(ports.values()), by_uuid, deadline)

    # -- writes ----------------------------------------------------------------------------

    def _lookup(self, names: Sequence[str], deadline: float) -> list[Found]:
        return parse_lookup(names, self.db.transact(lookup_steps(names), deadline), self.owner)

    def add_port(self, spec: PortSpec) -> None:
        """Delete a port of this name if it exists and is ours, then add `spec`, in ONE
        transaction; then wait until ovs-vswitchd has attached it (ofport set). A same-named
        port we do not own is an error (never touched). If OVS cannot attach the port, it is
        removed again and ADD fails with Interface.error.

        One round trip in the usual case: the add assumes that no row has the name (its guard
        says so, and fails the transaction otherwise) and the ofport wait is pipelined behind
        it. Only when a row of that name exists does it look up, then replace or refuse."""
        deadline = self.db.deadline()
        optimistic = Found(spec.name, me=self.owner)
        add, wait = self.db.transact_all([add_port_steps(spec, optimistic),
                                          ofport_steps(spec.name, self._ofport_budget(deadline))], deadline)
        if isinstance(add, Changed):
            self._replace_port(spec, deadline)
            wait = self._await(spec.name, deadline)
        elif isinstance(add, CoreError):
            raise add
        try:
            if isinstance(wait, CoreError):
                raise wait
            self._check_ofport(spec.name, wait)
        except CoreError:
            try:
                self.delete_ports([spec.name])
            except CoreError as exc:
                _log.warning("could not remove OVS port %s after the failed attach: %s", spec.name, exc.msg)
            raise

    def _replace_port(self, spec: PortSpec, deadline: float) -> None:
        """The name is taken: look it up and replace a stale port of ours in one transaction."""
        for attempt in range(1, _ATTEMPTS + 1):
            (found,) = self._lookup([spec.name], deadline)
            try:
                self.db.transact(add_port_steps(spec, found), deadline)
                break
            except Changed:
                if attempt == _ATTEMPTS:
                    raise
                _log.info("OVS port %s changed while adding it; retrying", spec.name)
        if found.port is not None:
            _log.info("replaced stale OVS port %s (owner %s, container %s)", spec.name, found.owner,
                      found.iface_ids.get("container_id") or found.port_ids.get("container_id"))

    @staticmethod
    def _ofport_budget(deadline: float) -> int:
        return max(0, min(OFPORT_WAIT_MS, int((deadline - time.monotonic()) * 1000) - 200))

    def _await(self, name: str, deadline: float) -> list[dict[str, Any]] | CoreError:
        try:
            return self.db.transact(ofport_steps(name, self._ofport_budget(deadline)), deadline)
        except CoreError as exc:
            return exc

    @staticmethod
    def _check_ofport(name: str, results: Sequence[Mapping[str, Any]]) -> int:
        rows = rows_of(results[1])
        if not rows:
            raise CoreError(f"OVS interface {name} vanished while waiting for its ofport")
        ofport, error = optional(rows[0]["ofport"]), optional(rows[0]["error"])
        if not isinstance(ofport, int) or ofport <= 0:
            raise CoreError(f"OVS could not attach port {name} (ofport {ofport}): "
                            f"{error or 'no error given'}")
        return ofport

    def delete_ports(self, names: Sequence[str]) -> None:
        """Delete the named ports that we own (missing ones are fine), in one transaction. A
        same-named port we do not own is left alone (logged)."""
        if not names:
            return
        deadline = self.db.deadline()
        for attempt in range(1, _ATTEMPTS + 1):
            found = self._lookup(list(dict.fromkeys(names)), deadline)
            for f in found:
                if f.port is not None and not f.ours:
                    _log.warning("not deleting OVS port %s: owner is %r", f.name, f.owner)
            steps = delete_steps(found)
            if not steps:
                return
            try:
                self.db.transact(steps, deadline)
                return
            except Changed:
                if attempt == _ATTEMPTS:
                    raise
                _log.info("OVS ports %s changed while deleting them; retrying", ", ".join(names))

    def delete_port_if(self, name: str, port_uuid: str) -> bool:
        """Delete our port `name` only if its Port row is still `port_uuid`, the row the caller
        judged (a reconciler): a port replaced since then, e.g. by a new ADD of the same
        attachment, is a new row and is left alone. The check and the delete are ONE
        transaction. True if deleted; False when it is gone, replaced or not ours."""
        deadline = self.db.deadline()
        (found,) = self._lookup([name], deadline)
        if found.port != port_uuid or not found.ours:
            return False
        try:
            self.db.transact([*_unchanged_guard(found), *delete_steps([found])], deadline)
        except Changed:
            return False
        return True

    def set_iface_ids(self, name: str, ids: Mapping[str, str]) -> None:
        """Set (merge) external_ids keys on our Interface `name` in one transaction."""
        deadline = self.db.deadline()
        (r,) = self.db.transact(set_ids_steps(name, ids, self.owner), deadline)
        if r.get("count") == 1:
            return
        rows = rows_of(self.db.transact([Step(op_select("Interface", [eq("name", name)], ["external_ids"]),
                                           f"read interface {name}")], deadline)[0])
        if not rows:
            raise CoreError(f"OVS interface {name} vanished")
        owner = map_of(rows[0]["external_ids"]).get("owner")
        raise NotOwned(f"OVS interface {name} is not owned by {self.owner} (owner {owner!r})")

