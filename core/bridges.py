"""Open_vSwitch bridges for the node agent: create one with its internal port, attach a NIC,
add a tagged internal port, mark readiness, delete a bridge we own. RFC 7047 over core/ovsdb.py.

Why its own module next to core/vswitch.py (pods' ports): a provider network's bridge is the
node's uplink, so these operations are few, slow-changing and guarded differently: the bridge's
MAC is the NIC's (`other_config:hwaddr`, so neighbours' ARP caches stay right), the internal
interface's MTU follows the NIC (`mtu_request`), and deleting a bridge is refused unless it is
ours and nothing was attached to it since we looked (a pod's port makes it stay).

Readiness lives on the Bridge row's external_ids, written by the agent and read by the CNI
plugin on the `select` it already makes for the bridge (no extra round trip, no file to share):
`owner=ovs-underlay` (we created it), `provider-network=<name>`, `provider-interface=<nic>`,
`provider-mtu=<mtu>`, `provider-ready=true|false` and `provider-error=<why not>`.

Reads select rows by name and never list a bridge's ports: `bridge(name, ports=...)` looks up
only the ports asked for and counts the rest, so a bridge with 1000 pod ports costs the same as
an empty one. Errors are core.errors: a bridge of that name that is not ours is `NotOwned`, a
missing one `Missing`, a concurrent change `Changed` (look up again).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import CoreError, Missing, NotOwned
from core.names import (
    OWNER,
    PROVIDER_ERROR,
    PROVIDER_INTERFACE,
    PROVIDER_MTU,
    PROVIDER_NETWORK,
    PROVIDER_READY,
)
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
    op_insert,
    op_mutate,
    op_select,
    op_wait,
    optional,
    rows_of,
    set_of,
    to_datum,
)
from core.vswitch import DB, DEFAULT_REMOTE, OFPORT_WAIT_MS, PortSpec, Vswitch, ofport_steps

READY, NETWORK, INTERFACE, MTU, ERROR = (PROVIDER_READY, PROVIDER_NETWORK, PROVIDER_INTERFACE, PROVIDER_MTU,
                                         PROVIDER_ERROR)
_log = logging.getLogger("ovs-underlay.bridges")


@dataclass(frozen=True)
class BridgeSpec:
    name: str
    datapath_type: str  # "system" (kernel) or "netdev" (userspace)
    hwaddr: str | None  # the bridge's MAC (other_config:hwaddr); None leaves it to OVS
    mtu: int | None  # mtu_request of the bridge's internal interface
    external_ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BridgePort:
    name: str
    in_bridge: bool  # a port of the bridge asked about (else of another bridge)
    port_ids: Mapping[str, str] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        return self.port_ids.get("owner") == OWNER


@dataclass(frozen=True)
class BridgeInfo:
    name: str
    uuid: str
    datapath_type: str
    hwaddr: str
    external_ids: Mapping[str, str]
    port_count: int  # every port, the internal one included
    ports: Mapping[str, BridgePort]  # the ports asked about that exist (in this bridge or not)

    @property
    def ours(self) -> bool:
        return self.external_ids.get("owner") == OWNER

    @property
    def ready(self) -> bool:
        return self.external_ids.get(READY) == "true"

    def has_port(self, name: str) -> bool:
        p = self.ports.get(name)
        return p is not None and p.in_bridge


# ---------------------------------------------------------------------------------------------
# Steps (pure)


def read_bridge_steps(name: str, ports: Sequence[str]) -> list[Step]:
    steps = [
        Step(
            op_select(
                "Bridge",
                [eq("name", name)],
                ["_uuid", "datapath_type", "other_config", "external_ids", "ports"],
            ),
            f"read bridge {name}",
        )
    ]
    # A port's row is all the planner needs (is it in this bridge, is it ours): one select each.
    steps += [Step(op_select("Port", [eq("name", p)], ["_uuid", "external_ids"]), f"read port {p}")
              for p in ports]
    return steps


def parse_bridge(name: str, ports: Sequence[str], results: Sequence[Mapping[str, Any]]) -> BridgeInfo | None:
    rows = rows_of(results[0])
    if not rows:
        return None
    b = rows[0]
    members = set(set_of(b["ports"]))
    found: dict[str, BridgePort] = {}
    for i, p in enumerate(ports):
        prow = rows_of(results[1 + i])
        if not prow:
            continue
        found[p] = BridgePort(
            name=p,
            in_bridge=from_atom(prow[0]["_uuid"]) in members,
            port_ids=map_of(prow[0]["external_ids"]),
        )
    dp = str(b["datapath_type"]) or "system"
    return BridgeInfo(
        name=name,
        uuid=from_atom(b["_uuid"]),
        datapath_type=dp,
        hwaddr=map_of(b["other_config"]).get("hwaddr", "").strip('"'),
        external_ids=map_of(b["external_ids"]),
        port_count=len(members),
        ports=found,
    )


def create_bridge_steps(spec: BridgeSpec) -> list[Step]:
    """ONE transaction: the bridge, its internal port and interface, attached to the root row.
    Fails (constraint violation) if a bridge of that name appeared meanwhile."""
    iface: dict[str, Any] = {"name": spec.name, "type": "internal"}
    if spec.mtu:
        iface["mtu_request"] = [spec.mtu]
    bridge: dict[str, Any] = {
        "name": spec.name,
        "ports": [NamedUuid("port")],
        "datapath_type": spec.datapath_type,
        "external_ids": dict(spec.external_ids),
    }
    if spec.hwaddr:
        bridge["other_config"] = {"hwaddr": spec.hwaddr}
    return [
        Step(op_comment(f"ovs-underlay: create bridge {spec.name}"), "comment"),
        Step(op_insert("Interface", iface, "iface"), f"insert interface {spec.name}"),
        Step(
            op_insert("Port", {"name": spec.name, "interfaces": [NamedUuid("iface")]}, "port"),
            f"insert port {spec.name}",
        ),
        Step(op_insert("Bridge", bridge, "bridge"), f"insert bridge {spec.name}"),
        Step(
            op_mutate("Open_vSwitch", [], [["bridges", "insert", to_datum([NamedUuid("bridge")])]]),
            f"add bridge {spec.name} to the switch",
            count=1,
        ),
    ]


def update_bridge_steps(spec: BridgeSpec, info: BridgeInfo) -> list[Step]:
    """Bring an existing bridge to `spec`'s MAC (only when we own it: never re-MAC someone else's
    bridge), internal MTU and external_ids. Empty when nothing differs."""
    steps: list[Step] = []
    where = [eq("_uuid", Uuid(info.uuid))]
    if spec.hwaddr and info.ours and info.hwaddr.lower() != spec.hwaddr.lower():
        steps.append(
            Step(
                op_mutate(
                    "Bridge",
                    where,
                    [
                        ["other_config", "delete", to_datum(["hwaddr"])],
                        ["other_config", "insert", to_datum({"hwaddr": spec.hwaddr})],
                    ],
                ),
                f"set MAC of bridge {spec.name}",
                count=1,
            )
        )
    want = {k: v for k, v in spec.external_ids.items() if info.external_ids.get(k) != v}
    if want:
        steps += ids_steps(info.uuid, spec.name, want)
    if spec.mtu:
        steps.append(
            Step(
                {
                    "op": "update",
                    "table": "Interface",
                    "where": [eq("name", spec.name)],
                    "row": {"mtu_request": to_datum([spec.mtu])},
                },
                f"set MTU of {spec.name}",
            )
        )
    return steps


def ids_steps(uuid: str, name: str, ids: Mapping[str, str | None]) -> list[Step]:
    """Set (or with None, remove) external_ids keys of the bridge row `uuid`."""
    return [
        Step(
            op_mutate(
                "Bridge",
                [eq("_uuid", Uuid(uuid))],
                [
                    ["external_ids", "delete", to_datum(sorted(ids))],
                    ["external_ids", "insert", to_datum({k: v for k, v in ids.items() if v is not None})],
                ],
            ),
            f"update external_ids of bridge {name}",
            count=1,
        )
    ]


def internal_port_steps(
    bridge: str, name: str, tag: int | None, mac: str, mtu: int, ids: Mapping[str, str]
) -> list[Step]:
    """ONE transaction: an internal port `name` (MAC `mac`, MTU `mtu`, access port of `tag`)."""
    iface = {"name": name, "type": "internal", "mac": [mac], "mtu_request": [mtu], "external_ids": dict(ids)}
    port: dict[str, Any] = {
        "name": name,
        "interfaces": [NamedUuid("iface")],
        "external_ids": dict(ids),
        "tag": [tag] if tag is not None else [],
    }
    return [
        Step(
            op_wait("Bridge", [eq("name", bridge)], ["name"], "==", [{"name": bridge}], 0),
            f"bridge {bridge} exists",
            error=Missing(f"OVS bridge {bridge!r} does not exist"),
        ),
        Step(op_insert("Interface", iface, "iface"), f"insert interface {name}"),
        Step(op_insert("Port", port, "port"), f"insert port {name}"),
        Step(
            op_mutate("Bridge", [eq("name", bridge)], [["ports", "insert", to_datum([NamedUuid("port")])]]),
            f"attach port {name} to bridge {bridge}",
            count=1,
        ),
    ]


def delete_bridge_steps(info: BridgeInfo, ports: Sequence[str]) -> list[Step]:
    """ONE transaction removing our bridge, guarded: still ours and its ports exactly the
    `ports` uuids we saw (a pod port attached meanwhile aborts it). Port and Interface rows go
    with it (OVSDB garbage-collects rows no root row references)."""
    if not info.ours:
        raise NotOwned(f"OVS bridge {info.name} is not owned by {OWNER}; not deleting it")
    u = Uuid(info.uuid)
    return [
        Step(op_comment(f"ovs-underlay: delete bridge {info.name}"), "comment"),
        Step(
            op_wait(
                "Bridge",
                [eq("_uuid", u), includes("external_ids", {"owner": OWNER})],
                ["ports"],
                "==",
                [{"ports": to_datum([Uuid(p) for p in ports])}],
                0,
            ),
            f"bridge {info.name} unchanged and ours",
            error=Changed(f"bridge {info.name}"),
        ),
        Step(
            op_mutate("Open_vSwitch", [], [["bridges", "delete", to_datum([u])]]),
            f"remove bridge {info.name} from the switch",
            count=1,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Client


class Bridges:
    """The agent's OVSDB operations, over one connection (shared with a `Vswitch` for ports)."""

    def __init__(self, remote: str = DEFAULT_REMOTE, timeout_s: float = 10.0) -> None:
        self.db = OvsdbClient(remote, DB, timeout_s)
        self._ports = Vswitch(db=self.db)  # our port operations, on the same connection

    def close(self) -> None:
        self.db.close()

    # -- reads -----------------------------------------------------------------------------

    def bridge(self, name: str, ports: Sequence[str] = ()) -> BridgeInfo | None:
        """The bridge `name` (None if missing) with the ports named `ports` that exist."""
        ports = list(dict.fromkeys(ports))
        return parse_bridge(name, ports, self.db.transact(read_bridge_steps(name, ports)))

    def port_bridge(self, port: str) -> str | None:
        """The bridge holding a port named `port`, None when there is no such port (or it is in
        no bridge)."""
        info = self._ports.get_port(port)
        return info.bridge if info is not None else None

    # -- writes ----------------------------------------------------------------------------

    def ensure_bridge(self, spec: BridgeSpec) -> None:
        """Create the bridge (or bring ours to `spec`) and wait until ovs-vswitchd has made its
        internal interface (ofport set), so the kernel device exists when this returns."""
        deadline = self.db.deadline()
        info = self.bridge(spec.name)
        if info is None:
            self.db.transact(create_bridge_steps(spec), deadline)
            _log.info(
                "created OVS bridge %s (datapath %s, MAC %s)", spec.name, spec.datapath_type, spec.hwaddr
            )
        else:
            steps = update_bridge_steps(spec, info)
            if steps:
                self.db.transact(steps, deadline)
        self._await(spec.name, deadline)

    def attach_port(self, bridge: str, port: str, ids: Mapping[str, str]) -> None:
        """Add the system interface `port` (a NIC) to `bridge`, marked with `ids`, and wait until
        ovs-vswitchd has opened it."""
        self._ports.add_port(PortSpec(name=port, bridge=bridge, iface_ids=ids, port_ids=ids))

    def add_internal_port(
        self, bridge: str, name: str, *, tag: int | None, mac: str, mtu: int, ids: Mapping[str, str]
    ) -> None:
        deadline = self.db.deadline()
        self.db.transact(internal_port_steps(bridge, name, tag, mac, mtu, ids), deadline)
        self._await(name, deadline)

    def detach_port(self, bridge: str, port: str) -> None:
        """Remove OUR port `port` (missing is fine; one that is not ours is left, logged)."""
        self._ports.delete_ports([port])

    def set_bridge_ids(self, name: str, ids: Mapping[str, str | None]) -> None:
        info = self.bridge(name)
        if info is None:
            raise Missing(f"OVS bridge {name!r} does not exist")
        self.db.transact(ids_steps(info.uuid, name, ids))

    def delete_bridge(self, name: str) -> None:
        """Delete OUR bridge `name` if it exists (missing is fine)."""
        deadline = self.db.deadline()
        b = rows_of(
            self.db.transact(
                [
                    Step(
                        op_select("Bridge", [eq("name", name)], ["_uuid", "external_ids", "ports"]),
                        f"read bridge {name}",
                    )
                ],
                deadline,
            )[0]
        )
        if not b:
            return
        info = BridgeInfo(
            name,
            from_atom(b[0]["_uuid"]),
            "",
            "",
            map_of(b[0]["external_ids"]),
            len(set_of(b[0]["ports"])),
            {},
        )
        self.db.transact(delete_bridge_steps(info, [str(p) for p in set_of(b[0]["ports"])]), deadline)
        _log.info("deleted OVS bridge %s", name)
        self._await_gone(name, deadline)

    @staticmethod
    def _await_gone(name: str, deadline: float) -> None:
        """Wait until ovs-vswitchd has removed the bridge's kernel device. It does so after the
        transaction commits (a netdev bridge's tap lingers for some milliseconds), and a caller
        that reads the node right after a delete, or creates the bridge again, must not see the
        old device with its old addresses. Not finding it gone in time is logged, not fatal: the
        bridge is out of OVS either way."""
        end = min(deadline, time.monotonic() + OFPORT_WAIT_MS / 1000)
        while True:
            try:
                socket.if_nametoindex(name)
            except OSError:
                return
            if time.monotonic() >= end:
                _log.warning("the kernel device of deleted bridge %s is still there", name)
                return
            time.sleep(0.005)

    def _await(self, name: str, deadline: float) -> None:
        budget = min(OFPORT_WAIT_MS, int((deadline - time.monotonic()) * 1000) - 200)
        rows = rows_of(self.db.transact(ofport_steps(name, max(0, budget)), deadline)[1])
        ofport = optional(rows[0]["ofport"]) if rows else None
        if not isinstance(ofport, int) or ofport < 0:
            error = optional(rows[0]["error"]) if rows else None
            raise CoreError(
                f"OVS could not create interface {name} (ofport {ofport}): {error or 'no error given'}"
            )
