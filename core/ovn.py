"""OVN: the logical switch ports a small CMS writes, and the chassis side of a port on br-int.

Why in the core: the plugin creates and deletes LSPs, and a node reconciler (ipamd's, issue 11)
or the node agent garbage-collects them (`gc_logical_ports`).

Why the shared RFC 7047 client and not ovsdbapp: OVN_Northbound is just another database on
another endpoint for core.ovsdb (no schema fetch, no monitor, server-side `where` filters, every
reply checked). A pod ADD needs one lookup and one write transaction on the NB. ovsdbapp is an
IDL client (ovs.db.idl): before its first transaction it fetches the NB schema and replicates
every row of the tables it registers, i.e. every Logical_Switch_Port of the cluster, with the
ovs library's pure-Python JSON parser, per plugin exec: the cost that issue 6 measured at 29 ->
198 ms per call on Open_vSwitch (10 -> 1000 ports) and that an NB of a whole cluster makes
larger. It would also be the only user of its dependency tree (ovsdbapp pulls in oslo.*,
pbr, fixtures...), in a frozen binary that must stay lean.

Shape (as in core.vswitch): pure builders turn intent into `Step`s, checked by `check_reply`;
the classes at the bottom only look rows up, call the builders and send. Errors are the
core's neutral kinds (`NotOwned`, `Conflict`, `Unavailable`, `Changed`).

What we write on the NB (ownership is recorded, never assumed):
- Logical_Switch (only when the network's switch is missing): name, external_ids owner,
  network, topology. A switch someone else made is used as it is, never modified.
- its localnet port (topology localnet, on our switches only): `ln-<switch>`, type localnet,
  addresses unknown, options:network_name = the physical network, tag_request = vlanID.
- one Logical_Switch_Port per attachment: name (ovnPort, else `<container id>_<ifname>`),
  addresses and port_security "MAC IP...", options:requested-chassis = this node's chassis
  (only this node may bind it), external_ids owner, container_id, ifname, network, node, pod.
Every write runs with `wait` guards in the same transaction (the switch is still absent, the
stale port is still ours and unchanged), so a race aborts it and we look again; a stale port
of ours is replaced in the same transaction as the new one is added. We only ever delete LSPs
whose external_ids say they are ours, of this attachment (DEL) or of this node (GC).

On the node's Open_vSwitch DB: the chassis facts (system-id, ovn-bridge, ovn-bridge-mappings),
and the wait for `external_ids:ovn-installed=true`, which ovn-controller sets on the Interface
once the port is bound and its flows are installed: a `wait` op that ovsdb-server holds until
the row matches, as for the ofport (one round trip, no polling).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ovs.stream

from core.errors import Conflict, CoreError, Missing, NotOwned, Unavailable
from core.names import OWNER
from core.ovnsettings import Northbound
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
    to_datum,
)

NB_DB = "OVN_Northbound"
DEFAULT_INTEGRATION_BRIDGE = "br-int"
_ATTEMPTS = 3
_log = logging.getLogger("ovs-underlay.ovn")


# ---------------------------------------------------------------------------------------------
# The chassis: this node's Open_vSwitch row (pure)


@dataclass(frozen=True)
class Chassis:
    """What this node's OVS says about OVN (Open_vSwitch external_ids, read by ovn-controller)."""

    system_id: str | None = None  # the chassis name in the SB
    integration_bridge: str = DEFAULT_INTEGRATION_BRIDGE  # ovn-bridge
    bridge_mappings: Mapping[str, str] = field(default_factory=dict)  # physnet -> bridge
    remote: str | None = None  # ovn-remote (the SB)
    mappings_text: str = ""  # as written, for messages

    def bridge_for(self, physnet: str) -> str | None:
        return self.bridge_mappings.get(physnet)


def parse_bridge_mappings(text: str) -> dict[str, str]:
    """ovn-bridge-mappings "physnet1:br-eth1,physnet2:br-eth2" -> {physnet: bridge} (as
    ovn-controller reads it: entries without a ':' are skipped)."""
    out: dict[str, str] = {}
    for entry in text.split(","):
        net, sep, bridge = entry.strip().partition(":")
        if sep and net.strip() and bridge.strip():
            out[net.strip()] = bridge.strip()
    return out


def chassis_steps() -> list[Step]:
    return [Step(op_select("Open_vSwitch", [], ["external_ids"]), "read Open_vSwitch external_ids")]


def parse_chassis(result: Mapping[str, Any]) -> Chassis:
    rows = rows_of(result)
    if not rows:
        return Chassis()
    ids = map_of(rows[0]["external_ids"])
    text = ids.get("ovn-bridge-mappings", "")
    return Chassis(system_id=ids.get("system-id") or None,
                   integration_bridge=ids.get("ovn-bridge") or DEFAULT_INTEGRATION_BRIDGE,
                   bridge_mappings=parse_bridge_mappings(text), remote=ids.get("ovn-remote") or None,
                   mappings_text=text)


def installed_steps(iface: str, timeout_ms: int, late: CoreError) -> list[Step]:
    """Hold the reply until OVS Interface `iface` has external_ids:ovn-installed=true (or
    `timeout_ms`): the `where` selects the row only once it carries the key, and `until ==`
    wants exactly that row."""
    where = [eq("name", iface), includes("external_ids", {"ovn-installed": "true"})]
    return [Step(op_wait("Interface", where, ["name"], "==", [{"name": iface}], timeout_ms),
                 f"wait for ovn-installed on {iface}", error=late)]


# ---------------------------------------------------------------------------------------------
# Northbound rows (pure)


@dataclass(frozen=True)
class Localnet:
    """The localnet port of a switch: which physical network, which VLAN."""

    physical_network: str
    vlan: int | None = None


@dataclass(frozen=True)
class LspSpec:
    """One attachment's logical switch port, and the switch it goes on (created if missing)."""

    name: str
    switch: str
    mac: str
    ips: tuple[str, ...] = ()  # bare addresses, no prefix
    port_security: bool = True
    ids: Mapping[str, str] = field(default_factory=dict)  # owner ids (owner added by the row builder)
    chassis: str | None = None  # options:requested-chassis
    localnet: Localnet | None = None  # create/check the switch's localnet port
    switch_ids: Mapping[str, str] = field(default_factory=dict)  # ids of a switch we create


def localnet_port_name(switch: str) -> str:
    return f"ln-{switch}"


def address_entry(mac: str, ips: Iterable[str]) -> str:
    """OVN's "MAC IP..." form (addresses, port_security)."""
    return " ".join([mac.lower(), *ips])


def lsp_row(spec: LspSpec) -> dict[str, Any]:
    entry = address_entry(spec.mac, spec.ips)
    row: dict[str, Any] = {"name": spec.name, "addresses": [entry],
                           "port_security": [entry] if spec.port_security else [],
                           "external_ids": {**spec.ids, "owner": OWNER}}
    if spec.chassis:
        row["options"] = {"requested-chassis": spec.chassis}
    return row


def localnet_row(switch: str, ln: Localnet) -> dict[str, Any]:
    return {"name": localnet_port_name(switch), "type": "localnet", "addresses": ["unknown"],
            "options": {"network_name": ln.physical_network},
            "tag_request": [ln.vlan] if ln.vlan is not None else [],
            "external_ids": {"owner": OWNER}}


def switch_row(spec: LspSpec, ports: Sequence[NamedUuid]) -> dict[str, Any]:
    return {"name": spec.switch, "external_ids": {**spec.switch_ids, "owner": OWNER}, "ports": list(ports)}


@dataclass(frozen=True)
class Lsp:
    """A Logical_Switch_Port row as looked up."""

    uuid: str
    name: str
    ids: Mapping[str, str] = field(default_factory=dict)
    type: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    tag_request: int | None = None

    @property
    def ours(self) -> bool:
        return self.ids.get("owner") == OWNER


@dataclass(frozen=True)
class NbFound:
    """What the NB holds for one LspSpec (see `nb_lookup_steps`)."""

    switches: tuple[tuple[str, Mapping[str, str]], ...] = ()  # (uuid, external_ids) named spec.switch
    port: Lsp | None = None  # the LSP named spec.name
    localnet: Lsp | None = None  # the LSP named ln-<switch>


LSP_COLUMNS = ["_uuid", "name", "external_ids", "type", "options", "tag_request"]


def nb_lookup_steps(spec: LspSpec) -> list[Step]:
    out = [Step(op_select("Logical_Switch", [eq("name", spec.switch)], ["_uuid", "external_ids"]),
                f"look up logical switch {spec.switch}"),
           Step(op_select("Logical_Switch_Port", [eq("name", spec.name)], LSP_COLUMNS),
                f"look up logical switch port {spec.name}")]
    if spec.localnet is not None:
        ln = localnet_port_name(spec.switch)
        out.append(Step(op_select("Logical_Switch_Port", [eq("name", ln)], LSP_COLUMNS),
                        f"look up localnet port {ln}"))
    return out


def lsp_of(row: Mapping[str, Any]) -> Lsp:
    return Lsp(uuid=str(from_atom(row["_uuid"])), name=str(row["name"]), ids=map_of(row["external_ids"]),
               type=str(row.get("type", "")), options=map_of(row["options"]) if "options" in row else {},
               tag_request=optional(row["tag_request"]) if "tag_request" in row else None)


def parse_nb_lookup(spec: LspSpec, results: Sequence[Mapping[str, Any]]) -> NbFound:
    switches = tuple((str(from_atom(r["_uuid"])), map_of(r["external_ids"])) for r in rows_of(results[0]))
    ports = rows_of(results[1])
    ln = rows_of(results[2]) if spec.localnet is not None else []
    return NbFound(switches, lsp_of(ports[0]) if ports else None, lsp_of(ln[0]) if ln else None)


def same_attachment(ids: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(ids.get(k) == want.get(k) for k in ("container_id", "ifname", "node"))


def _lsp_guard(lsp: Lsp) -> Step:
    """Abort unless LSP `lsp` is still the row we looked up, with the same external_ids."""
    return Step(op_wait("Logical_Switch_Port", [eq("_uuid", Uuid(lsp.uuid))], ["external_ids"], "==",
                        [{"external_ids": to_datum(dict(lsp.ids))}], 0),
                f"logical switch port {lsp.name} unchanged since lookup",
                error=Changed(f"logical switch port {lsp.name}"))


def _lsp_remove(lsp: Lsp) -> list[Step]:
    """Take `lsp` off whichever switch holds it, and delete the row."""
    u = Uuid(lsp.uuid)
    return [Step(op_mutate("Logical_Switch", [includes("ports", [u])], [["ports", "delete", to_datum([u])]]),
                 f"detach logical switch port {lsp.name}", count=1),
            Step(op_delete("Logical_Switch_Port", [eq("_uuid", u)]), f"delete logical switch port {lsp.name}",
                 count=1)]


def _check_localnet(spec: LspSpec, ln: Lsp) -> None:
    assert spec.localnet is not None
    want, net = spec.localnet, ln.options.get("network_name")
    if ln.type != "localnet" or net != want.physical_network or ln.tag_request != want.vlan:
        raise Conflict(f"logical switch {spec.switch}: its localnet port {ln.name} has type {ln.type!r}, "
                       f"network_name {net!r}, tag {ln.tag_request}; this network wants physical network "
                       f"{want.physical_network!r}, VLAN {want.vlan}",
                       "two network configs disagree about one logical switch; fix one (logicalSwitch, "
                       "physicalNetworkName, vlanID)")


def _absent(table: str, name: str, what: str) -> Step:
    """Abort unless no `table` row is named `name` (someone may have created it since lookup)."""
    return Step(op_wait(table, [eq("name", name)], ["name"], "==", [], 0), f"no {what} {name} yet",
                error=Changed(f"{what} {name}"))


def _replace_guard(spec: LspSpec, p: Lsp) -> list[Step]:
    """Steps removing a stale LSP of this same attachment; raises if the name is not ours."""
    if not p.ours:
        raise NotOwned(f"logical switch port {spec.name} exists and is not owned by {OWNER} "
                       f"(owner {p.ids.get('owner')!r}); not replacing it",
                       "to bind to a port your CMS made, give ovnPort without logicalSwitch")
    if not same_attachment(p.ids, spec.ids):
        raise NotOwned(f"logical switch port {spec.name} belongs to another attachment (container "
                       f"{p.ids.get('container_id')!r}, ifname {p.ids.get('ifname')!r}, "
                       f"node {p.ids.get('node')!r})",
                       "an ovnPort in the network config can serve one pod only")
    return [_lsp_guard(p), *_lsp_remove(p)]


def add_lsp_steps(spec: LspSpec, found: NbFound) -> list[Step]:
    """ONE NB transaction adding the attachment's LSP (and the switch + localnet port when the
    switch is missing). Raises (building nothing) when the name is held by a port that is not
    this attachment's, or the switch is ambiguous or disagrees with the network."""
    if len(found.switches) > 1:
        raise Conflict(f"{len(found.switches)} logical switches are named {spec.switch!r}; "
                       "ovs-underlay cannot tell which one is meant")
    steps = [Step(op_comment(f"ovs-underlay: add logical switch port {spec.name} to {spec.switch}"),
                  "comment")]
    if found.port is not None:
        steps += _replace_guard(spec, found.port)
    else:
        steps.append(_absent("Logical_Switch_Port", spec.name, "logical switch port"))
    new = [NamedUuid("lsp")]
    steps.append(Step(op_insert("Logical_Switch_Port", lsp_row(spec), "lsp"),
                      f"insert logical switch port {spec.name}"))
    ours_switch = not found.switches or found.switches[0][1].get("owner") == OWNER
    if spec.localnet is not None and ours_switch:
        if found.localnet is not None:
            _check_localnet(spec, found.localnet)
        else:
            ln_name = localnet_port_name(spec.switch)
            steps += [_absent("Logical_Switch_Port", ln_name, "localnet port"),
                      Step(op_insert("Logical_Switch_Port", localnet_row(spec.switch, spec.localnet), "ln"),
                           f"insert localnet port {ln_name}")]
            new.append(NamedUuid("ln"))
    if not found.switches:
        steps += [_absent("Logical_Switch", spec.switch, "logical switch"),
                  Step(op_insert("Logical_Switch", switch_row(spec, new), "ls"),
                       f"create logical switch {spec.switch}")]
    else:
        sw = Uuid(found.switches[0][0])
        still = op_wait("Logical_Switch", [eq("_uuid", sw)], ["_uuid"], "==", [{"_uuid": to_datum(sw)}], 0)
        steps += [Step(still, f"logical switch {spec.switch} still there",
                       error=Changed(f"logical switch {spec.switch}")),
                  Step(op_mutate("Logical_Switch", [eq("_uuid", sw)], [["ports", "insert", to_datum(new)]]),
                       f"attach {spec.name} to logical switch {spec.switch}", count=1)]
    return steps


def find_lsp_steps(want: Mapping[str, str]) -> list[Step]:
    return [Step(op_select("Logical_Switch_Port", [includes("external_ids", {**want, "owner": OWNER})],
                           ["_uuid", "name", "external_ids"]), "find our logical switch ports")]


def delete_lsp_steps(lsps: Sequence[Lsp]) -> list[Step]:
    """ONE transaction removing every LSP in `lsps` that is ours (each guarded: unchanged)."""
    steps: list[Step] = []
    for lsp in lsps:
        if lsp.ours:
            steps += [_lsp_guard(lsp), *_lsp_remove(lsp)]
    if steps:
        names = ", ".join(lsp.name for lsp in lsps if lsp.ours)
        steps.insert(0, Step(op_comment(f"ovs-underlay: delete logical switch ports {names}"), "comment"))
    return steps


# ---------------------------------------------------------------------------------------------
# Clients


def set_tls(nb: Northbound) -> None:
    """Point the ovs library's (process-wide) TLS settings at `nb`'s files; they are read when
    an ssl: stream opens. A missing or unreadable file is a config error naming it."""
    if nb.private_key is None or nb.certificate is None or nb.ca_cert is None:
        return
    for key, path in (("ovnNbPrivateKey", nb.private_key), ("ovnNbCertificate", nb.certificate),
                      ("ovnNbCaCert", nb.ca_cert)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise Missing(f"{key}: cannot read {path}: {exc.strerror}") from exc
    ovs.stream.Stream.ssl_set_private_key_file(nb.private_key)
    ovs.stream.Stream.ssl_set_certificate_file(nb.certificate)
    ovs.stream.Stream.ssl_set_ca_cert_file(nb.ca_cert)


class NbClient(OvsdbClient):
    """The JSON-RPC client on OVN_Northbound. With several remotes (a clustered NB), the first
    that accepts a connection is used; a clustered member forwards writes to its leader."""

    def __init__(self, nb: Northbound, timeout_s: float = 10.0) -> None:
        super().__init__(nb.remotes()[0], NB_DB, timeout_s)
        self.nb = nb
        set_tls(nb)

    def _connect(self, deadline: float) -> Any:
        if self._conn is not None:
            return self._conn
        last: CoreError | None = None
        for remote in self.nb.remotes():
            self.remote = remote
            try:
                return super()._connect(deadline)
            except CoreError as exc:
                last = exc
            except (OSError, ssl.SSLError) as exc:  # ovs.stream's ssl: open loads the TLS files
                last = Unavailable(f"OVN northbound DB at {remote}: TLS: {exc}",
                                   "check ovnNbPrivateKey, ovnNbCertificate and ovnNbCaCert")
        assert last is not None
        raise last

    # -- the CMS verbs ---------------------------------------------------------------------

    def add_lsp(self, spec: LspSpec) -> None:
        """Create the attachment's LSP (and the switch / localnet port when missing) in one
        transaction, replacing a stale one of this same attachment."""
        deadline = self._deadline()
        for attempt in range(1, _ATTEMPTS + 1):
            found = parse_nb_lookup(spec, self.transact(nb_lookup_steps(spec), deadline))
            try:
                self.transact(add_lsp_steps(spec, found), deadline)
                break
            except Changed:
                if attempt == _ATTEMPTS:
                    raise
                _log.info("OVN NB rows for %s changed while adding it; retrying", spec.name)
        if found.port is not None:
            _log.info("replaced stale logical switch port %s", spec.name)
        if not found.switches:
            _log.info("created logical switch %s%s", spec.switch,
                      f" with localnet port {localnet_port_name(spec.switch)}" if spec.localnet else "")

    def find_lsps(self, want: Mapping[str, str]) -> list[Lsp]:
        """Our LSPs whose external_ids contain all of `want`."""
        return [lsp_of(r) for r in rows_of(self.transact(find_lsp_steps(want))[0])]

    def delete_lsps(self, lsps: Sequence[Lsp]) -> None:
        """Delete the given LSPs that are ours, in one transaction (re-looked up on a race)."""
        deadline = self._deadline()
        for attempt in range(1, _ATTEMPTS + 1):
            steps = delete_lsp_steps(lsps)
            if not steps:
                return
            try:
                self.transact(steps, deadline)
                return
            except Changed:
                if attempt == _ATTEMPTS:
                    raise
                _log.info("logical switch ports %s changed while deleting them; retrying",
                          ", ".join(lsp.name for lsp in lsps))
                lsps = self._relookup(lsps, deadline)

    def _relookup(self, lsps: Sequence[Lsp], deadline: float) -> list[Lsp]:
        """The current rows of `lsps` (by name, an index), kept only if they still belong to
        the same attachment: a row re-created for another one is not what we meant to delete."""
        steps = [Step(op_select("Logical_Switch_Port", [eq("name", lsp.name)], LSP_COLUMNS),
                      f"look up logical switch port {lsp.name}") for lsp in lsps]
        out = []
        for lsp, r in zip(lsps, self.transact(steps, deadline), strict=True):
            out += [now for now in map(lsp_of, rows_of(r)) if same_attachment(now.ids, lsp.ids)]
        return out

    def delete_attachment(self, want: Mapping[str, str]) -> list[str]:
        """DEL: remove our LSPs of one attachment (container_id, ifname and, when known, node).
        Idempotent."""
        lsps = self.find_lsps(want)
        self.delete_lsps(lsps)
        return [lsp.name for lsp in lsps]

    def ping(self) -> None:
        """One cheap request: raises when the NB is unreachable (STATUS)."""
        self.transact([Step(op_select("NB_Global", [], ["_uuid"]), "read NB_Global")])


class LspStore(Protocol):
    def find_lsps(self, want: Mapping[str, str]) -> list[Lsp]: ...
    def delete_lsps(self, lsps: Sequence[Lsp]) -> None: ...


def gc_logical_ports(nb: LspStore, *, node: str, keep: Callable[[str, str], bool],
                     network: str | None = None) -> list[str]:
    """Remove our LSPs on chassis `node` (of `network`, if given) whose attachment
    (container_id, ifname) `keep` rejects; returns their names. For CNI GC (keep = in the
    runtime's valid attachments) and for a node reconciler (keep = the attachment still has
    its OVS port or its netns). Never touches LSPs of other nodes or of other owners."""
    want = {"node": node, **({"network": network} if network else {})}
    stale = [lsp for lsp in nb.find_lsps(want)
             if not keep(lsp.ids.get("container_id", ""), lsp.ids.get("ifname", ""))]
    nb.delete_lsps(stale)
    for lsp in stale:
        _log.info("GC: removed logical switch port %s (container %s, ifname %s)", lsp.name,
                  lsp.ids.get("container_id"), lsp.ids.get("ifname"))
    return [lsp.name for lsp in stale]


@dataclass(frozen=True)
class NodeView:
    """This node's OVS as OVN sees it: the chassis facts and every bridge's datapath type."""

    chassis: Chassis
    bridges: Mapping[str, str]  # name -> datapath_type ("system" when empty)


def node_steps() -> list[Step]:
    return [*chassis_steps(), Step(op_select("Bridge", [], ["name", "datapath_type"]), "read bridges")]


def parse_node(results: Sequence[Mapping[str, Any]]) -> NodeView:
    bridges = {str(r["name"]): str(r["datapath_type"]) or "system" for r in rows_of(results[1])}
    return NodeView(parse_chassis(results[0]), bridges)


class OvnNode:
    """The chassis side, on the node's Open_vSwitch DB (shares the plugin's OVSDB connection)."""

    def __init__(self, client: OvsdbClient) -> None:
        self.client = client

    def inspect(self) -> NodeView:
        return parse_node(self.client.transact(node_steps()))

    def wait_installed(self, iface: str, logical_port: str, timeout_ms: int, chassis: Chassis) -> float:
        """Return once ovn-controller has bound and installed `iface` (ovn-installed=true), in
        ms waited; past `timeout_ms` raise Unavailable naming the logical port."""
        late = Unavailable(f"ovn-controller did not bind and install logical port {logical_port} (OVS "
                           f"interface {iface}) within {timeout_ms} ms",
                        f"does logical switch port {logical_port} exist in the OVN northbound DB, and is "
                        f"ovn-controller running on this node (chassis {chassis.system_id or '?'})? "
                        "ovnInstalledTimeoutMs sets the bound")
        t0 = time.monotonic()
        deadline = t0 + timeout_ms / 1000 + 5  # the server answers at timeout_ms at the latest
        self.client.transact(installed_steps(iface, timeout_ms, late), deadline)
        return (time.monotonic() - t0) * 1000

