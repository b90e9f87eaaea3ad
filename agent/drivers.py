"""The side effects the agent needs, as Protocols: the host's netlink, OVSDB, the gateway probe.

Why Protocols: plans are computed from observed state and executed through these three, so the
planner and the executor are unit-tested with in-memory fakes (tests/unit/test_agent_*.py)
while the integration tests run the same code on real namespaces and a real OVS. The real
implementations are the shared core's (`core.hostnet.HostNet`, `core.bridges.Bridges`,
`core.gateway.GatewayProbe`): neutral, raising `core.errors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from netaddr import IPAddress

from core.bridges import BridgeInfo, BridgeSpec
from core.netstate import Address, IfaceState, Link, Route, Rule


class HostNet(Protocol):
    def link(self, name: str) -> Link | None: ...

    def iface_state(self, name: str) -> IfaceState | None: ...

    def addresses(self, name: str) -> list[Address]: ...

    def add_address(self, dev: str, a: Address) -> None: ...

    def delete_address(self, dev: str, a: Address) -> None: ...

    def replace_route(self, r: Route) -> None: ...

    def add_rule(self, r: Rule) -> None: ...

    def delete_rule(self, r: Rule) -> None: ...

    def set_link(
        self, name: str, *, mac: str | None = None, mtu: int | None = None, up: bool | None = None
    ) -> None: ...

    def close(self) -> None: ...


class Switch(Protocol):
    def bridge(self, name: str, ports: Sequence[str] = ()) -> BridgeInfo | None: ...

    def port_bridge(self, port: str) -> str | None: ...

    def ensure_bridge(self, spec: BridgeSpec) -> None: ...

    def attach_port(self, bridge: str, port: str, ids: Mapping[str, str]) -> None: ...

    def add_internal_port(
        self, bridge: str, name: str, *, tag: int | None, mac: str, mtu: int, ids: Mapping[str, str]
    ) -> None: ...

    def detach_port(self, bridge: str, port: str) -> None: ...

    def delete_bridge(self, name: str) -> None: ...

    def set_bridge_ids(self, name: str, ids: Mapping[str, str | None]) -> None: ...

    def close(self) -> None: ...


class Prober(Protocol):
    def gateway(self, dev: str, gateway: IPAddress, sender: IPAddress | None, timeout_ms: int) -> str | None:
        """The MAC that answered for `gateway` on `dev` within `timeout_ms`, else None."""
        ...


@dataclass
class Drivers:
    net: HostNet
    ovs: Switch
    probe: Prober

    def close(self) -> None:
        self.net.close()
        self.ovs.close()
