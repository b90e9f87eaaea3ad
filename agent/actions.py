"""The agent's side effects as values: each action says what it does (`text`, the equivalent
`ip` / `ovs-vsctl` command shown by the dry run and logged) and does it through the drivers
(`run`). Every action is idempotent (adding what exists or deleting what is gone is success),
which is what lets a later `apply` re-run a plan that a crash interrupted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from netaddr import IPAddress

from agent.drivers import Drivers
from core.bridges import BridgeSpec
from core.errors import CoreError
from core.netstate import Address, Route, Rule

_log = logging.getLogger("ovs-underlay.agent")


class Action(Protocol):
    def text(self) -> str: ...

    def run(self, d: Drivers) -> None: ...


class VerifyFailed(CoreError):
    """The bridged NIC does not reach its gateway: the apply is rolled back."""


class NotRestored(CoreError):
    """After a rollback or remove the NIC still differs from its snapshot."""


def _ids(ids: Mapping[str, str | None]) -> str:
    return " ".join(f"external_ids:{k}={v}" for k, v in sorted(ids.items()) if v is not None)


@dataclass(frozen=True)
class EnsureBridge:
    spec: BridgeSpec
    create: bool

    def text(self) -> str:
        s = self.spec
        if not self.create:
            return f"ovs-vsctl set Bridge {s.name} {_ids(s.external_ids)}" + (
                f" -- set Interface {s.name} mtu_request={s.mtu}" if s.mtu else ""
            )
        mac = f" other_config:hwaddr={s.hwaddr}" if s.hwaddr else ""
        mtu = f" -- set Interface {s.name} mtu_request={s.mtu}" if s.mtu else ""
        return (
            f"ovs-vsctl add-br {s.name} -- set Bridge {s.name} datapath_type={s.datapath_type}{mac} "
            f"{_ids(s.external_ids)}{mtu}"
        )

    def run(self, d: Drivers) -> None:
        d.ovs.ensure_bridge(self.spec)


@dataclass(frozen=True)
class AttachPort:
    bridge: str
    port: str
    ids: Mapping[str, str] = field(default_factory=dict)

    def text(self) -> str:
        return f"ovs-vsctl add-port {self.bridge} {self.port} -- set Port {self.port} {_ids(self.ids)}"

    def run(self, d: Drivers) -> None:
        d.ovs.attach_port(self.bridge, self.port, self.ids)


@dataclass(frozen=True)
class AddInternalPort:
    bridge: str
    port: str
    tag: int | None
    mac: str
    mtu: int
    ids: Mapping[str, str] = field(default_factory=dict)

    def text(self) -> str:
        tag = f" tag={self.tag}" if self.tag is not None else ""
        return (
            f"ovs-vsctl add-port {self.bridge} {self.port}{tag} -- set Interface {self.port} type=internal "
            f"mac={self.mac} mtu_request={self.mtu}"
        )

    def run(self, d: Drivers) -> None:
        d.ovs.add_internal_port(
            self.bridge, self.port, tag=self.tag, mac=self.mac, mtu=self.mtu, ids=self.ids
        )


@dataclass(frozen=True)
class DetachPort:
    bridge: str
    port: str

    def text(self) -> str:
        return f"ovs-vsctl --if-exists del-port {self.bridge} {self.port}"

    def run(self, d: Drivers) -> None:
        d.ovs.detach_port(self.bridge, self.port)


@dataclass(frozen=True)
class DeleteBridge:
    bridge: str

    def text(self) -> str:
        return f"ovs-vsctl --if-exists del-br {self.bridge}"

    def run(self, d: Drivers) -> None:
        d.ovs.delete_bridge(self.bridge)


@dataclass(frozen=True)
class MarkBridge:
    bridge: str
    ids: Mapping[str, str | None]

    def text(self) -> str:
        gone = [k for k, v in self.ids.items() if v is None]
        out = (
            f"ovs-vsctl set Bridge {self.bridge} {_ids(self.ids)}"
            if any(v is not None for v in self.ids.values())
            else ""
        )
        if gone:
            out += (
                " -- " if out else "ovs-vsctl "
            ) + f"remove Bridge {self.bridge} external_ids {' '.join(gone)}"
        return out

    def run(self, d: Drivers) -> None:
        d.ovs.set_bridge_ids(self.bridge, self.ids)


@dataclass(frozen=True)
class SetLink:
    dev: str
    mac: str | None = None
    mtu: int | None = None
    up: bool | None = None

    def text(self) -> str:
        parts = [f"ip link set dev {self.dev}"]
        if self.mac:
            parts.append(f"address {self.mac}")
        if self.mtu:
            parts.append(f"mtu {self.mtu}")
        if self.up is not None:
            parts.append("up" if self.up else "down")
        return " ".join(parts)

    def run(self, d: Drivers) -> None:
        d.net.set_link(self.dev, mac=self.mac, mtu=self.mtu, up=self.up)


@dataclass(frozen=True)
class AddAddress:
    dev: str
    address: Address

    def text(self) -> str:
        return f"ip addr add {self.address.render(self.dev)}"

    def run(self, d: Drivers) -> None:
        d.net.add_address(self.dev, self.address)


@dataclass(frozen=True)
class DelAddress:
    dev: str
    address: Address

    def text(self) -> str:
        return f"ip addr del {self.address.address} dev {self.dev}"

    def run(self, d: Drivers) -> None:
        d.net.delete_address(self.dev, self.address)


@dataclass(frozen=True)
class ReplaceRoute:
    """Install `route` with whatever went through interface index `from_index` going through
    `dev` (resolved when run: the bridge may not exist yet when the plan is made). Replacing is
    atomic in the kernel: the route is never absent, which is what keeps the node's default
    route alive while it moves."""

    route: Route
    from_index: int
    dev: str

    def text(self) -> str:
        return f"ip route replace {self.route.render({self.from_index: self.dev})}"

    def run(self, d: Drivers) -> None:
        link = d.net.link(self.dev)
        if link is None:
            raise CoreError(f"cannot move route {self.route.dst}: interface {self.dev} does not exist")
        d.net.replace_route(self.route.moved(self.from_index, link.index))


@dataclass(frozen=True)
class AddRule:
    rule: Rule

    def text(self) -> str:
        return f"ip rule add {self.rule.render()}"

    def run(self, d: Drivers) -> None:
        d.net.add_rule(self.rule)


@dataclass(frozen=True)
class DelRule:
    rule: Rule

    def text(self) -> str:
        return f"ip rule del {self.rule.render()}"

    def run(self, d: Drivers) -> None:
        d.net.delete_rule(self.rule)


@dataclass(frozen=True)
class VerifyGateways:
    """Every gateway answers ARP (IPv4) / NDP (IPv6) sent from `dev` within `timeout_ms` (in
    total, retries included)."""

    dev: str
    gateways: tuple[tuple[IPAddress, IPAddress | None], ...]  # (gateway, sender address)
    timeout_ms: int

    def text(self) -> str:
        gws = ", ".join(str(g) for g, _ in self.gateways)
        return f"verify: {gws} answer ARP/NDP on {self.dev} within {self.timeout_ms} ms"

    def run(self, d: Drivers) -> None:
        deadline = time.monotonic() + self.timeout_ms / 1000
        for gw, sender in self.gateways:
            left = max(1, int((deadline - time.monotonic()) * 1000))
            t0 = time.monotonic()
            mac = d.probe.gateway(self.dev, gw, sender, left)
            if mac is None:
                raise VerifyFailed(
                    f"gateway {gw} did not answer {'ARP' if gw.version == 4 else 'NDP'} on "
                    f"{self.dev} within {self.timeout_ms} ms",
                    "is the NIC's switch port a trunk carrying the node's VLAN untagged?",
                )
            _log.info(
                "verify: gateway %s is at %s on %s (%.0f ms)",
                gw,
                mac,
                self.dev,
                (time.monotonic() - t0) * 1000,
            )


@dataclass(frozen=True)
class CheckRestored:
    """Compare the NIC (or a VLAN interface) with its snapshot; raise listing every difference."""

    name: str
    snapshot_json: object  # netstate.to_json(snapshot): hashable-free, compared by netstate
    compare_mac: bool = True

    def text(self) -> str:
        return f"check: {self.name} is exactly as in the snapshot (addresses, routes, rules, MAC, MTU, state)"

    def run(self, d: Drivers) -> None:
        from core import netstate

        assert isinstance(self.snapshot_json, dict)
        want = netstate.from_json(self.snapshot_json)
        have = d.net.iface_state(self.name)
        if have is None:
            raise NotRestored(f"{self.name} is gone")
        diffs = netstate.differences(want, have, mac=self.compare_mac)
        if diffs:
            raise NotRestored(f"{self.name} differs from its snapshot: " + "; ".join(diffs))
