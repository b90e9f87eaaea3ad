"""Plans: what `apply` and `remove` must do, computed from the observed state and the journal.

Pure: `observe` (in agent/engine.py) reads the kernel and OVSDB once; these functions turn that
picture into named steps of idempotent actions (agent/actions.py). Only what is still needed is
planned, so the same function serves a first apply, a re-apply (nothing to do), the repair of a
half-applied state after a crash, and the dry run, which prints exactly the plan `apply` would
run.

Apply, in this order (the node's default route is never absent: routes move with an atomic
`replace`, and the NIC keeps its addresses until the routes point at the bridge):
  snapshot -> prepare-nic (MTU, up) -> create-bridge (MAC = the NIC's, MTU, not ready)
  -> copy-addresses (to the bridge) -> attach-nic -> move-routes (replace, every table)
  -> move-rules -> clear-nic (its addresses) -> vlan-<if> (each VLAN interface to a tagged
  internal port) -> verify (the gateways answer ARP/NDP on the bridge) -> mark-ready.
Restore (rollback and remove) undoes it in the mirror order and ends with a check that the NIC
is exactly its snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from netaddr import IPAddress, IPNetwork

from agent import actions as A
from agent.config import NodeNetwork
from agent.journal import Journal, VlanPort
from agent.netmgr import Management
from core import bridges as B
from core import netstate
from core.bridges import BridgeInfo, BridgeSpec
from core.names import OWNER
from core.netstate import AF_INET6, Address, IfaceState, Route

IFNAME_MAX = 15
_VID_SUFFIX = re.compile(r"\.(\d{1,4})$")


class Refused(Exception):
    """The plan cannot be made: nothing was changed. The message says why and what to do."""


@dataclass(frozen=True)
class Observed:
    """The live state relevant to one provider network, read once."""

    nic: IfaceState | None
    nic_bridge: str | None  # the OVS bridge holding a port named like the NIC, if any
    bridge: BridgeInfo | None  # OVSDB view of br-<name> (with the NIC and VLAN ports looked up)
    bridge_state: IfaceState | None  # kernel view of the bridge's internal interface
    vlans: Mapping[str, IfaceState | None] = field(default_factory=dict)  # named VLAN interfaces
    vlan_ports: Mapping[str, IfaceState | None] = field(default_factory=dict)  # our internal ports
    managed: Mapping[str, Sequence[Management]] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    name: str
    why: str
    actions: tuple[A.Action, ...] = ()


@dataclass(frozen=True)
class Plan:
    network: NodeNetwork
    kind: str  # "apply", "rollback", "remove"
    state: str  # what the live state looked like ("not applied", "applied", "half-applied: ...")
    steps: tuple[Step, ...]
    snapshot: IfaceState | None  # the NIC as the journal (or the live state) has it
    vlan_snapshots: tuple[IfaceState, ...] = ()
    vlan_ports: tuple[VlanPort, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def work(self) -> bool:
        """True when some step has an action (a plan without any is "nothing to do")."""
        return any(s.actions for s in self.steps)


# ---------------------------------------------------------------------------------------------
# Helpers


def _ids(nn: NodeNetwork, mtu: int, ready: bool) -> dict[str, str]:
    return {B.NETWORK: nn.name, B.INTERFACE: nn.nic, B.MTU: str(mtu), B.READY: "true" if ready else "false"}


def _has_addr(state: IfaceState | None, a: Address) -> bool:
    return state is not None and any(x.key() == a.key() for x in state.addresses)


def _has_route(state: IfaceState | None, r: Route, from_index: int) -> bool:
    """Is `r` (going through `from_index`) present on `state`'s interface?"""
    if state is None:
        return False
    want = r.config({from_index: "<dev>"})
    return any(x.config({state.link.index: "<dev>"}) == want for x in state.routes)


def _merge(snap: IfaceState, live: IfaceState | None) -> IfaceState:
    """The snapshot plus whatever movable configuration the live interface has that the snapshot
    lacks (after a reboot the host's own config puts addresses back on the NIC), expressed with
    the live interface's index."""
    if live is None:
        return snap
    idx = live.link.index
    base = netstate.movable(snap)
    routes = [r.moved(snap.link.index, idx) for r in base.routes]
    addrs = list(base.addresses)
    lm = netstate.movable(live)
    for a in lm.addresses:
        if all(a.key() != b.key() for b in addrs):
            addrs.append(a)
    for r in lm.routes:
        if all(r.config({idx: "d"}) != x.config({idx: "d"}) for x in routes):
            routes.append(r)
    rules = list(snap.rules) + [r for r in live.rules if r.config() not in {x.config() for x in snap.rules}]
    return IfaceState(live.link, tuple(addrs), tuple(routes), tuple(rules))


def default_gateways(state: IfaceState) -> list[IPAddress]:
    """The gateways of the interface's main-table default routes, one per family."""
    out: dict[int, IPAddress] = {}
    for r in state.routes:
        if r.table == netstate.RT_TABLE_MAIN and IPNetwork(r.dst).prefixlen == 0:
            gw = r.gateway or next((h.gateway for h in r.hops if h.gateway), "")
            if gw and r.family not in out:
                out[r.family] = IPAddress(gw)
    return [out[f] for f in sorted(out)]


def sender_for(gw: IPAddress, addrs: Sequence[Address]) -> IPAddress | None:
    """The address to probe `gw` from: one in the gateway's subnet, else any of its family."""
    same = [a for a in addrs if (a.family == AF_INET6) == (gw.version == 6)]
    for a in same:
        if gw in IPNetwork(a.address):
            return IPAddress(a.ip)
    return IPAddress(same[0].ip) if same else None


def vlan_id(name: str, st: IfaceState, nic: IfaceState) -> int:
    """The VLAN of interface `name`: its 802.1Q id when it is a VLAN device (whose parent must
    be the NIC), else the `.N` suffix of its name (Kube-OVN's convention)."""
    if st.link.kind == "vlan" and st.link.vlan_id is not None:
        if st.link.vlan_link != nic.link.index:
            raise Refused(
                f"VLAN interface {name} is not on {nic.link.name} (its parent is interface "
                f"index {st.link.vlan_link}); only VLAN interfaces of the bridged NIC can be kept"
            )
        return st.link.vlan_id
    m = _VID_SUFFIX.search(name)
    if not m or not 1 <= int(m.group(1)) <= 4094:
        raise Refused(
            f"{name} is not an 802.1Q interface and its name has no .<VLAN id> suffix: cannot tell its VLAN"
        )
    return int(m.group(1))


def vlan_port_name(bridge: str, vid: int) -> str:
    name = f"{bridge}.{vid}"
    if len(name) > IFNAME_MAX:
        raise Refused(
            f"the internal port for VLAN {vid} would be {name!r}, longer than {IFNAME_MAX} "
            "characters: use a shorter provider network name"
        )
    return name


def classify(nn: NodeNetwork, obs: Observed) -> str:
    nic_addrs = bool(obs.nic and netstate.movable(obs.nic).addresses)
    br_addrs = bool(obs.bridge_state and netstate.movable(obs.bridge_state).addresses)
    in_bridge = bool(obs.bridge and obs.bridge.has_port(nn.nic))
    if obs.bridge is None and not in_bridge:
        return "not applied"
    facts = []
    if in_bridge and nic_addrs and br_addrs:
        facts.append(f"addresses on both {nn.nic} and {nn.bridge}")
    elif in_bridge and nic_addrs:
        facts.append(f"{nn.nic} is in {nn.bridge} with its addresses left behind")
    elif nic_addrs and br_addrs:
        facts.append(f"addresses on both {nn.nic} and {nn.bridge}, {nn.nic} not in the bridge")
    if obs.bridge is not None and not in_bridge:
        facts.append(f"{nn.bridge} exists without {nn.nic}")
    if not facts and in_bridge and obs.bridge and obs.bridge.ready:
        return "applied"
    if not facts and in_bridge:
        return "applied, not marked ready"
    return "half-applied: " + "; ".join(facts)


# ---------------------------------------------------------------------------------------------
# Apply


def plan_apply(nn: NodeNetwork, obs: Observed, j: Journal | None, datapath_default: str = "system") -> Plan:
    net, br, nic = nn.network, nn.bridge, nn.nic
    warnings: list[str] = []
    if obs.nic is None:
        raise Refused(f"interface {nic} does not exist on this node")
    if obs.nic_bridge not in (None, br):
        raise Refused(f"{nic} is a port of OVS bridge {obs.nic_bridge}, not {br}: remove it from there first")
    for iface, mgrs in obs.managed.items():
        for m in mgrs:
            if not net.manage:
                raise Refused(
                    f"{iface} is managed by {m.manager} ({m.detail}): it would undo the bridge. "
                    f'Set "manage": true for provider network {nn.name} to take it over, and '
                    "persist the layout with the configuration `apply --dry-run` prints"
                )
            warnings.append(
                f"{iface} is managed by {m.manager} ({m.detail}); taking it over because of "
                "manage: true. Persist the configuration printed below or it will fight the bridge"
            )
    if obs.bridge is not None and net.datapath_type and obs.bridge.datapath_type != net.datapath_type:
        raise Refused(
            f"bridge {br} exists with datapath_type {obs.bridge.datapath_type}, the file says "
            f"{net.datapath_type}"
        )
    if obs.bridge is not None and not obs.bridge.ours and (j is None or not j.bridge_created):
        warnings.append(
            f"bridge {br} exists and was not created by the agent: using it as it is "
            "(its MAC is left alone; remove will not delete it)"
        )
    if obs.nic.link.kind in ("tun", "openvswitch") or obs.nic.link.name == br:
        raise Refused(f"{nic} is an OVS device, not a NIC")

    resume = j is not None and j.phase in ("applying", "applied") and j.nic_snapshot is not None
    snap = j.nic_snapshot if resume and j is not None and j.nic_snapshot else obs.nic
    carry = _merge(snap, obs.nic)
    idx = obs.nic.link.index
    mtu = net.mtu or snap.link.mtu
    mac = snap.link.mac

    # VLAN interfaces: snapshot (from the journal when resuming), VLAN id, port name.
    vlan_snaps: list[IfaceState] = []
    vports: list[VlanPort] = []
    jvs = {s.link.name: s for s in (j.vlan_snapshots if resume and j else ())}
    for v in net.vlan_interfaces:
        live = obs.vlans.get(v)
        vs = jvs.get(v) or live
        if vs is None:
            warnings.append(f"VLAN interface {v} does not exist on this node: skipped")
            continue
        vid = vlan_id(v, vs, snap)
        vlan_snaps.append(vs)
        vports.append(VlanPort(v, vlan_port_name(br, vid), vid))

    steps: list[Step] = [Step("snapshot", f"record {nic} as it is before any change")]

    prep: list[A.Action] = []
    if obs.nic.link.mtu != mtu:
        prep.append(A.SetLink(nic, mtu=mtu))
    if not obs.nic.link.up:
        prep.append(A.SetLink(nic, up=True))
    steps.append(Step("prepare-nic", f"{nic} up with MTU {mtu}", tuple(prep)))

    create: list[A.Action] = []
    bstate = obs.bridge_state
    need_bridge = (
        obs.bridge is None
        or (obs.bridge.ours and obs.bridge.hwaddr.lower() != mac.lower())
        or bstate is None
        or bstate.link.mtu != mtu
        or any(obs.bridge.external_ids.get(k) != v for k, v in _ids(nn, mtu, True).items() if k != B.READY)
    )
    ids = _ids(nn, mtu, ready=False)
    if obs.bridge is None:
        ids["owner"] = OWNER
    if need_bridge:
        dp = net.datapath_type or (obs.bridge.datapath_type if obs.bridge else datapath_default)
        create.append(A.EnsureBridge(BridgeSpec(br, dp, mac, mtu, ids), create=obs.bridge is None))
    if bstate is None or not bstate.link.up:
        create.append(A.SetLink(br, up=True))
    steps.append(Step("create-bridge", f"OVS bridge {br} with {nic}'s MAC {mac}", tuple(create)))

    steps.append(
        Step(
            "copy-addresses",
            f"{nic}'s addresses also on {br} (both hold them for a moment)",
            tuple(A.AddAddress(br, a.on(nic, br)) for a in carry.addresses if not _has_addr(bstate, a)),
        )
    )

    attach: list[A.Action] = []
    if obs.bridge is None or not obs.bridge.has_port(nic):
        attach.append(A.AttachPort(br, nic, {"owner": OWNER, B.NETWORK: nn.name}))
    steps.append(Step("attach-nic", f"{nic} becomes a port of {br} (a trunk of every VLAN)", tuple(attach)))

    steps.append(
        Step(
            "move-routes",
            f"routes through {nic}, every table, now through {br} (atomic replace)",
            tuple(A.ReplaceRoute(r, idx, br) for r in carry.routes if not _has_route(bstate, r, idx)),
        )
    )

    rules: list[A.Action] = []
    have_rules = {r.config() for r in (bstate.rules if bstate else ())}
    for r in carry.rules:
        moved = r.renamed(nic, br)
        if moved.config() not in have_rules:
            rules.append(A.AddRule(moved))
    rules += [A.DelRule(r) for r in obs.nic.rules]
    steps.append(Step("move-rules", f"policy rules naming {nic} now name {br}", tuple(rules)))

    steps.append(
        Step(
            "clear-nic",
            f"{nic} keeps no addresses (they live on {br})",
            tuple(A.DelAddress(nic, a) for a in netstate.movable(obs.nic).addresses),
        )
    )

    for vs, vp in zip(vlan_snaps, vports, strict=True):
        steps.append(_vlan_apply_step(nn, vs, vp, obs))

    verify: list[A.Action] = []
    if net.verify.enabled:
        gws = list(net.verify.gateways) if net.verify.gateways is not None else default_gateways(carry)
        if gws:
            verify.append(
                A.VerifyGateways(
                    br, tuple((g, sender_for(g, carry.addresses)) for g in gws), net.verify.timeout_ms
                )
            )
        else:
            warnings.append(f"{nic} has no default route and the file names no gateway: nothing to verify")
    else:
        warnings.append("verify is off: a broken uplink will not be rolled back")

    work = any(s.actions for s in steps)
    ready = obs.bridge is not None and obs.bridge.ready and not work
    mark = (
        ()
        if ready
        else (A.MarkBridge(br, {B.READY: "true", B.MTU: str(mtu), B.INTERFACE: nic, B.ERROR: None}),)
    )
    steps.append(Step("verify", "the gateways answer from the bridge", tuple(verify) if not ready else ()))
    steps.append(Step("mark-ready", f"{br} is ready (the CNI plugin may attach pods)", mark))
    return Plan(
        nn, "apply", classify(nn, obs), tuple(steps), snap, tuple(vlan_snaps), tuple(vports), tuple(warnings)
    )


def _vlan_apply_step(nn: NodeNetwork, vs: IfaceState, vp: VlanPort, obs: Observed) -> Step:
    live = obs.vlans.get(vp.interface)
    port = obs.vlan_ports.get(vp.port)
    carry = _merge(vs, live)
    acts: list[A.Action] = []
    if obs.bridge is None or not obs.bridge.has_port(vp.port):
        acts.append(
            A.AddInternalPort(
                nn.bridge, vp.port, vp.vlan, vs.link.mac, vs.link.mtu, {"owner": OWNER, B.NETWORK: nn.name}
            )
        )
    if port is None or not port.link.up:
        acts.append(A.SetLink(vp.port, up=True))
    acts += [
        A.AddAddress(vp.port, a.on(vp.interface, vp.port)) for a in carry.addresses if not _has_addr(port, a)
    ]
    idx = carry.link.index
    acts += [A.ReplaceRoute(r, idx, vp.port) for r in carry.routes if not _has_route(port, r, idx)]
    have = {r.config() for r in (port.rules if port else ())}
    acts += [
        A.AddRule(r.renamed(vp.interface, vp.port))
        for r in carry.rules
        if r.renamed(vp.interface, vp.port).config() not in have
    ]
    if live is not None:
        acts += [A.DelRule(r) for r in live.rules]
        acts += [A.DelAddress(vp.interface, a) for a in netstate.movable(live).addresses]
        if live.link.up:
            acts.append(A.SetLink(vp.interface, up=False))
    return Step(
        f"vlan-{vp.interface}",
        f"VLAN {vp.vlan} interface {vp.interface} carried by {vp.port} (tag {vp.vlan} on {nn.bridge})",
        tuple(acts),
    )


# ---------------------------------------------------------------------------------------------
# Restore (rollback, remove)


def plan_restore(nn: NodeNetwork, obs: Observed, j: Journal, kind: str) -> Plan:
    """Put the NIC (and its VLAN interfaces) back as in the journal's snapshot, take our ports out
    of the bridge, and delete the bridge if we created it and nothing else uses it."""
    br, nic = nn.bridge, nn.nic
    snap = j.nic_snapshot
    warnings: list[str] = []
    if snap is None:
        raise Refused(f"the journal of {nn.name} has no snapshot of {nic}: nothing to restore from")
    if obs.nic is None:
        raise Refused(f"interface {nic} does not exist on this node: cannot restore it")
    live = obs.nic
    idx = live.link.index
    base = netstate.movable(snap)
    bstate = obs.bridge_state
    steps: list[Step] = []

    link: list[A.Action] = []
    if live.link.mtu != snap.link.mtu:
        link.append(A.SetLink(nic, mtu=snap.link.mtu))
    if live.link.mac.lower() != snap.link.mac.lower():
        link.append(A.SetLink(nic, mac=snap.link.mac))
    if not live.link.up:
        link.append(A.SetLink(nic, up=True))
    steps.append(Step("restore-nic-link", f"{nic}'s MTU and MAC as in the snapshot", tuple(link)))

    steps.append(
        Step(
            "restore-addresses",
            f"{nic}'s addresses back",
            tuple(A.AddAddress(nic, a) for a in base.addresses if not _has_addr(live, a)),
        )
    )
    routes = [r.moved(snap.link.index, idx) for r in base.routes]
    steps.append(
        Step(
            "restore-routes",
            f"routes through {nic} again (atomic replace)",
            tuple(A.ReplaceRoute(r, idx, nic) for r in routes if not _has_route(live, r, idx)),
        )
    )
    rules: list[A.Action] = []
    have = {r.config() for r in live.rules}
    rules += [A.AddRule(r) for r in snap.rules if r.config() not in have]
    bridge_rules = {r.config() for r in (bstate.rules if bstate else ())}
    rules += [
        A.DelRule(r.renamed(nic, br)) for r in snap.rules if r.renamed(nic, br).config() in bridge_rules
    ]
    steps.append(Step("restore-rules", f"policy rules name {nic} again", tuple(rules)))

    vports = {vp.interface: vp for vp in j.vlan_ports}
    for vs in j.vlan_snapshots:
        vp = vports.get(vs.link.name)
        if vp is not None:
            steps.append(_vlan_restore_step(nn, vs, vp, obs))

    detach: list[A.Action] = []
    nic_port = obs.bridge.ports.get(nic) if obs.bridge else None
    if obs.bridge is not None and nic_port is not None and nic_port.in_bridge:
        if nic_port.ours:
            detach.append(A.DetachPort(br, nic))
        else:
            warnings.append(f"{nic} was a port of {br} before the agent: left there")
    steps.append(Step("detach-nic", f"{nic} out of {br}", tuple(detach)))

    release: list[A.Action] = []
    if obs.bridge is not None:
        ours_left = sum(
            1
            for p in (nic, *(vp.port for vp in j.vlan_ports))
            if obs.bridge.has_port(p) and obs.bridge.ports[p].ours
        )
        others = obs.bridge.port_count - 1 - ours_left
        if obs.bridge.ours and j.bridge_created and others == 0:
            release.append(A.DeleteBridge(br))
        else:
            if others:
                warnings.append(f"bridge {br} is kept: {others} other port(s) use it")
            elif not (obs.bridge.ours and j.bridge_created):
                warnings.append(f"bridge {br} is kept: the agent did not create it")
            release += [A.DelAddress(br, a) for a in base.addresses if _has_addr(bstate, a)]
            release.append(
                A.MarkBridge(br, {B.READY: "false", B.NETWORK: None, B.INTERFACE: None, B.MTU: None})
            )
    steps.append(
        Step("release-bridge", f"{br} deleted if the agent made it and nothing else uses it", tuple(release))
    )

    final: list[A.Action] = []
    if not snap.link.up:
        final.append(A.SetLink(nic, up=False))
    steps.append(
        Step(
            "restore-link-state", f"{nic} {'up' if snap.link.up else 'down'} as in the snapshot", tuple(final)
        )
    )
    checks: list[A.Action] = [A.CheckRestored(nic, netstate.to_json(snap))]
    checks += [A.CheckRestored(vs.link.name, netstate.to_json(vs)) for vs in j.vlan_snapshots]
    steps.append(Step("check", "the NIC is exactly as in the snapshot", tuple(checks)))
    return Plan(
        nn, kind, classify(nn, obs), tuple(steps), snap, j.vlan_snapshots, j.vlan_ports, tuple(warnings)
    )


def _vlan_restore_step(nn: NodeNetwork, vs: IfaceState, vp: VlanPort, obs: Observed) -> Step:
    live = obs.vlans.get(vp.interface)
    port = obs.vlan_ports.get(vp.port)
    acts: list[A.Action] = []
    if live is not None:
        base = netstate.movable(vs)
        if not live.link.up:
            acts.append(A.SetLink(vp.interface, up=True))
        acts += [A.AddAddress(vp.interface, a) for a in base.addresses if not _has_addr(live, a)]
        idx = live.link.index
        acts += [
            A.ReplaceRoute(r.moved(vs.link.index, idx), idx, vp.interface)
            for r in base.routes
            if not _has_route(live, r.moved(vs.link.index, idx), idx)
        ]
        have = {r.config() for r in live.rules}
        acts += [A.AddRule(r) for r in vs.rules if r.config() not in have]
        port_rules = {r.config() for r in (port.rules if port else ())}
        acts += [
            A.DelRule(r.renamed(vp.interface, vp.port))
            for r in vs.rules
            if r.renamed(vp.interface, vp.port).config() in port_rules
        ]
        if not vs.link.up:
            acts.append(A.SetLink(vp.interface, up=False))
    if obs.bridge is not None and obs.bridge.has_port(vp.port):
        acts.append(A.DetachPort(nn.bridge, vp.port))
    return Step(
        f"restore-vlan-{vp.interface}",
        f"{vp.interface} holds its VLAN {vp.vlan} configuration again",
        tuple(acts),
    )


# ---------------------------------------------------------------------------------------------
# Rendering (the dry run)


def render(plan: Plan) -> str:
    nn = plan.network
    out = [f"provider network {nn.name}: {nn.nic} -> {nn.bridge} ({plan.kind}; now: {plan.state})"]
    if plan.snapshot is not None:
        s = plan.snapshot
        out.append(
            f"  snapshot of {s.link.name}: MAC {s.link.mac}, MTU {s.link.mtu}, "
            f"{'up' if s.link.up else 'down'}"
        )
        names = s.names()
        for a in s.addresses:
            out.append(
                f"    address {a.render(s.link.name)}"
                + ("" if netstate.movable_address(a) else "  (kernel-made: not moved)")
            )
        for r in s.routes:
            moved = netstate.movable_route(r, s.addresses)
            out.append(f"    route {r.render(names)}" + ("" if moved else "  (follows the address / kernel)"))
        for ru in s.rules:
            out.append(f"    rule {ru.render()}")
    if not plan.work:
        out.append("  nothing to do")
    n = 0
    for step in plan.steps:
        if not step.actions:
            continue
        n += 1
        out.append(f"  {n}. {step.name}: {step.why}")
        out += [f"       {a.text()}" for a in step.actions]
    for w in plan.warnings:
        out.append(f"  warning: {w}")
    return "\n".join(out)
