"""OVSDB boundary: the only module that imports `ovs` (the Open vSwitch python IDL).

Why the IDL and not `ovs-vsctl`: one process fork per pod is what overloads nodes in pod bursts
(kube-ovn #3210); the IDL speaks JSON-RPC on the OVSDB socket directly. It replicates only the
tables/columns registered below (REQUIRED), not the whole database, so sync stays in the tens of
milliseconds. Every change is one transaction whose commit status is checked (the IDL fails the
whole commit when any operation reply carries an error).

Rows as data: `port_columns`/`iface_columns` are pure builders (unit-tested); `OvsdbClient`
applies them. Ownership: our Port and Interface rows carry external_ids `owner=ovs-underlay`,
`container_id`, `ifname` (Interface also netns, network, pod, attached MAC, IPs). We never delete
a row whose owner is not ours.

vlog: the ovs library logs through its own `Vlog`; we initialise it once with syslog off and
route its console destination into our "ovs-underlay.ovsdb" logger.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ovs.db.idl
import ovs.jsonrpc
import ovs.poller
import ovs.stream
import ovs.vlog

from cni.errors import CniError, Code

OWNER = "ovs-underlay"
DEFAULT_REMOTE = "unix:/run/openvswitch/db.sock"
REQUIRED: dict[str, list[str]] = {
    "Bridge": ["name", "ports", "datapath_type"],
    "Port": ["name", "interfaces", "tag", "trunks", "vlan_mode", "external_ids"],
    "Interface": ["name", "type", "external_ids", "ofport", "ofport_request", "mtu_request"],
}
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
    mtu_request: int | None = None
    ofport_request: int | None = None


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


def port_columns(spec: PortSpec) -> dict[str, Any]:
    """Port row columns for `spec` (IDL python values: optional columns are lists)."""
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
    cols: dict[str, Any] = {"name": spec.name, "type": "", "external_ids": dict(spec.iface_ids)}
    if spec.mtu_request is not None:
        cols["mtu_request"] = [spec.mtu_request]
    if spec.ofport_request is not None:
        cols["ofport_request"] = [spec.ofport_request]
    return cols


def matches(ids: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(ids.get(k) == v for k, v in want.items())


# ---------------------------------------------------------------------------------------------
# vlog routing


class _ToOurLogger(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _log.log(record.levelno, "%s", record.getMessage())


_vlog_routed = False


def _route_vlog() -> None:
    global _vlog_routed
    if _vlog_routed:
        return
    _vlog_routed = True
    ovs.vlog.Vlog.init(None)
    ovs.vlog.Vlog.set_levels_from_string("syslog:off")
    ovs.vlog.Vlog.set_levels_from_string("file:off")
    console = logging.getLogger("console")
    for h in list(console.handlers):
        console.removeHandler(h)
    console.addHandler(_ToOurLogger())
    console.propagate = False
    logging.getLogger("syslog").disabled = True


# ---------------------------------------------------------------------------------------------
# Client


def _one(value: Any) -> Any:
    """Optional IDL column ([] or [x]) -> x or None."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


class OvsdbClient:
    """A short-lived IDL session (one per plugin invocation)."""

    def __init__(self, remote: str = DEFAULT_REMOTE, timeout_s: float = 10.0) -> None:
        _route_vlog()
        self.remote = remote
        self.timeout_s = timeout_s
        self._idl: Any = None

    # -- connection ------------------------------------------------------------------------

    def _fail(self, what: str, detail: str = "", code: int = Code.TRY_AGAIN_LATER) -> CniError:
        return CniError(code, f"OVSDB {self.remote}: {what}", detail)

    def _schema(self) -> Any:
        deadline_ms = int(self.timeout_s * 1000)
        err, stream = ovs.stream.Stream.open_block(ovs.stream.Stream.open(self.remote), deadline_ms)
        if err:
            raise self._fail(f"cannot connect: {os.strerror(err)}")
        conn = ovs.jsonrpc.Connection(stream)
        try:
            request = ovs.jsonrpc.Message.create_request("get_schema", ["Open_vSwitch"])
            err, reply = conn.transact_block(request)
        finally:
            conn.close()
        if err or reply is None or reply.error is not None:
            raise self._fail("get_schema failed", str(err or (reply.error if reply else "no reply")))
        helper = ovs.db.idl.SchemaHelper(schema_json=reply.result)
        for table, cols in REQUIRED.items():
            helper.register_columns(table, cols)
        return helper

    @property
    def idl(self) -> Any:
        if self._idl is None:
            idl = ovs.db.idl.Idl(self.remote, self._schema(), probe_interval=0)
            self._idl = idl
            self._wait(lambda: idl.has_ever_connected() and idl.change_seqno > 0, "initial sync")
        return self._idl

    def _wait(self, done: Any, what: str) -> None:
        idl = self._idl
        deadline = time.monotonic() + self.timeout_s
        while True:
            idl.run()
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"timed out waiting for {what} after {self.timeout_s:.1f}s")
            poller = ovs.poller.Poller()
            idl.wait(poller)
            poller.timer_wait(int(min(left, 1.0) * 1000))
            poller.block()

    def close(self) -> None:
        if self._idl is not None:
            self._idl.close()
            self._idl = None

    def __enter__(self) -> OvsdbClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -----------------------------------------------------------------------------

    def _bridge_row(self, name: str) -> Any:
        for row in self.idl.tables["Bridge"].rows.values():
            if row.name == name:
                return row
        return None

    def bridge_datapath(self, bridge: str) -> str | None:
        """The bridge's datapath type ("system" when empty), or None when it does not exist."""
        row = self._bridge_row(bridge)
        if row is None:
            return None
        return row.datapath_type or "system"

    def _port_bridges(self) -> dict[Any, str]:
        out: dict[Any, str] = {}
        for br in self.idl.tables["Bridge"].rows.values():
            for p in br.ports:
                out[p.uuid] = br.name
        return out

    def _info(self, port: Any, bridges: Mapping[Any, str]) -> PortInfo:
        iface = port.interfaces[0] if port.interfaces else None
        return PortInfo(
            name=port.name, bridge=bridges.get(port.uuid), tag=_one(port.tag),
            trunks=tuple(sorted(port.trunks)), vlan_mode=_one(port.vlan_mode),
            port_ids=dict(port.external_ids), iface_ids=dict(iface.external_ids) if iface else {},
            ofport=_one(iface.ofport) if iface else None)

    def get_port(self, name: str) -> PortInfo | None:
        bridges = self._port_bridges()
        for p in self.idl.tables["Port"].rows.values():
            if p.name == name:
                return self._info(p, bridges)
        return None

    def find_ports(self, want: Mapping[str, str]) -> list[PortInfo]:
        """Ports whose Interface external_ids contain all of `want` (plus owner=ovs-underlay)."""
        want = {"owner": OWNER, **want}
        bridges = self._port_bridges()
        out = []
        for p in self.idl.tables["Port"].rows.values():
            for iface in p.interfaces:
                if matches(iface.external_ids, want):
                    out.append(self._info(p, bridges))
                    break
        return out

    # -- writes ----------------------------------------------------------------------------

    def _commit(self, build: Any, what: str) -> None:
        """Run `build(txn)` in a transaction and commit; retry on TRY_AGAIN (the IDL has new
        data then). Any other non-success status is an error naming `what`."""
        for _attempt in range(5):
            idl = self.idl
            txn = ovs.db.idl.Transaction(idl)
            txn.add_comment(f"ovs-underlay: {what}")
            try:
                changed = build(txn)
            except BaseException:
                txn.abort()
                raise
            if not changed:
                txn.abort()
                return
            status = txn.commit_block()
            if status in (ovs.db.idl.Transaction.SUCCESS, ovs.db.idl.Transaction.UNCHANGED):
                _log.debug("OVSDB %s: %s", what, status)
                return
            if status != ovs.db.idl.Transaction.TRY_AGAIN:
                raise self._fail(f"{what} failed: {txn.get_error()}", code=Code.INTERNAL)
            _log.info("OVSDB %s: try again", what)
            self._wait(lambda: True, "resync")
        raise self._fail(f"{what}: transaction kept conflicting")

    def add_port(self, spec: PortSpec) -> None:
        """Delete a port of this name if it exists and is ours, then add `spec`, in ONE
        transaction. A same-named port we do not own is an error (never touched)."""

        def build(txn: Any) -> bool:
            bridge = self._bridge_row(spec.bridge)
            if bridge is None:
                raise CniError(Code.INVALID_NETWORK_CONFIG, f"OVS bridge {spec.bridge!r} does not exist")
            self._delete_named(txn, [spec.name], strict=True)
            iface = txn.insert(self.idl.tables["Interface"])
            for col, val in iface_columns(spec).items():
                setattr(iface, col, val)
            port = txn.insert(self.idl.tables["Port"])
            for col, val in port_columns(spec).items():
                setattr(port, col, val)
            port.interfaces = [iface]
            bridge.addvalue("ports", port)
            return True

        self._commit(build, f"add port {spec.name} to {spec.bridge}")

    def _delete_named(self, txn: Any, names: Iterable[str], strict: bool) -> bool:
        names = set(names)
        found = False
        for p in list(self.idl.tables["Port"].rows.values()):
            if p.name not in names:
                continue
            owner = p.external_ids.get("owner") or next(
                (i.external_ids.get("owner") for i in p.interfaces if i.external_ids.get("owner")), None)
            if owner != OWNER:
                if strict:
                    raise CniError(Code.INVALID_NETWORK_CONFIG,
                                   f"OVS port {p.name} exists and is not owned by {OWNER}")
                _log.warning("not deleting OVS port %s: owner is %r", p.name, owner)
                continue
            for br in self.idl.tables["Bridge"].rows.values():
                if any(x.uuid == p.uuid for x in br.ports):
                    br.delvalue("ports", p)
            for i in p.interfaces:
                i.delete()
            p.delete()
            found = True
        return found

    def delete_ports(self, names: Sequence[str]) -> None:
        """Delete the named ports that we own (missing ones are fine), in one transaction."""
        if names:
            self._commit(lambda txn: self._delete_named(txn, names, strict=False),
                         f"delete ports {', '.join(names)}")

    def set_iface_ids(self, name: str, ids: Mapping[str, str]) -> None:
        """Set (merge) external_ids keys on our Interface `name` in one transaction."""

        def build(txn: Any) -> bool:
            for i in self.idl.tables["Interface"].rows.values():
                if i.name == name:
                    if i.external_ids.get("owner") != OWNER:
                        raise CniError(Code.INTERNAL, f"OVS interface {name} is not owned by {OWNER}")
                    for k, v in ids.items():
                        i.setkey("external_ids", k, v)
                    return True
            raise CniError(Code.INTERNAL, f"OVS interface {name} vanished")

        self._commit(build, f"update external_ids of {name}")
