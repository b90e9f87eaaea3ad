"""`status`: per provider network, is it ready on this node, on which interface, with which MTU.

Read-only: one OVSDB read and a few netlink dumps per network, no probe. "ready" means the last
apply succeeded (journal phase "applied"), the bridge carries `provider-ready=true` (what the CNI
plugin checks) and the live state still is the applied layout: the NIC in the bridge, the
node's addresses on the bridge and none left on the NIC. Anything else says what it is
(not applied, half-applied: ..., rolled back: <error>), so `serve` and an admin see the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from agent import plan as P
from agent.config import NodeNetwork, ProviderNetwork
from agent.drivers import Drivers
from agent.engine import Options, observe
from agent.journal import StateDir
from core import bridges as B
from core.errors import CoreError


@dataclass
class NetStatus:
    network: str
    bridge: str
    interface: str
    mtu: int | None
    ready: bool
    state: str
    phase: str = ""
    error: str = ""
    vlanPorts: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def network_status(nn: NodeNetwork, d: Drivers, store: StateDir, opts: Options) -> NetStatus:
    try:
        j = store.read(nn.name)
    except Exception as exc:  # a corrupt journal is moved aside; report it
        return NetStatus(nn.name, nn.bridge, nn.nic, None, False, "journal unreadable", error=str(exc))
    try:
        obs = observe(nn, d, j, Options(opts.host_run, False, opts.datapath_default))
    except CoreError as exc:
        return NetStatus(nn.name, nn.bridge, nn.nic, None, False, "unknown", j.phase if j else "", exc.msg)
    state = P.classify(nn, obs)
    mtu = obs.bridge_state.link.mtu if obs.bridge_state else (obs.nic.link.mtu if obs.nic else None)
    error = (j.error if j else "") or (obs.bridge.external_ids.get(B.ERROR, "") if obs.bridge else "")
    phase = j.phase if j else ""
    if phase == "rolled-back" and state == "not applied":
        state = "rolled back"
    elif phase in ("applying", "rolling-back", "removing"):
        state = f"interrupted {phase} at step {j.step if j else '?'} ({state})"
    ready = phase == "applied" and state == "applied"
    vports = [{"interface": v.interface, "port": v.port, "vlan": v.vlan} for v in (j.vlan_ports if j else ())]
    return NetStatus(nn.name, nn.bridge, nn.nic, mtu, ready, state, phase, error if not ready else "", vports)


def orphan_status(name: str, store: StateDir) -> NetStatus:
    """A network with a journal but not in the file (or excluding this node): still applied."""
    j = store.read(name)
    return NetStatus(
        name,
        j.bridge if j else f"br-{name}",
        j.nic if j else "",
        None,
        False,
        "not in the file for this node: run `remove` to give the NIC back",
        j.phase if j else "",
    )


def excluded(net: ProviderNetwork) -> NetStatus:
    return NetStatus(net.name, net.bridge, "", None, False, "this node is excluded (excludeNodes)")
