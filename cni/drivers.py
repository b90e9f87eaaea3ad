"""The side-effect boundaries the verbs use, as Protocols, bundled in `Drivers`.

Why: verbs are plain functions `cmd_add(args, conf, drivers)`; production passes the real
netlink/OVSDB/ipamd/delegate implementations (built lazily by `default_drivers`), unit tests pass
fakes and inject faults at every step. The warm path (a fork server) reuses the same verbs with
the same drivers. The real drivers are the shared core's boundaries (core.netlink.Netlink,
core.vswitch.Vswitch, core.ipamd_client.IpamClient); they raise neutral core errors, which the
verbs let through to skel (or map with cni.errors.as_cni where they collect errors). stdlib and
type names only at module level.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from netaddr import IPAddress, IPNetwork

    from cni.types import CmdArgs, Result
    from core.netlink import HostLink, PodLink, PodState, RouteLike
    from core.ovn import Chassis, Lsp, LspSpec, NodeView
    from core.ovnsettings import Northbound
    from core.spec import Allocation, IpamConf, PodRef, PoolDef, ProbeResult, Segment
    from core.vswitch import BridgeView, PortInfo, PortSpec


class NetlinkDriver(Protocol):
    def create_veth(self, *, host: str, netns: str, ifname: str, alias: str, mtu: int | None,
                    mac: str | None) -> PodLink: ...
    def set_pod_mac(self, *, netns: str, ifname: str, mac: str) -> None: ...
    def delete_host_link(self, name: str, alias: str, index: int | None = None) -> bool: ...
    def host_link_alias(self, name: str) -> str | None: ...
    def host_links(self, alias_prefix: str) -> list[HostLink]: ...
    def configure(self, *, netns: str, ifname: str, addresses: Sequence[IPNetwork],
                  routes: Sequence[RouteLike]) -> None: ...
    def pod_state(self, netns: str, ifname: str) -> PodState | None: ...
    def announce(self, *, netns: str, ifname: str, addresses: Sequence[IPAddress], mac: str) -> None: ...


class OvsdbDriver(Protocol):
    def bridge_view(self, bridge: str) -> BridgeView | None: ...
    def add_port(self, spec: PortSpec) -> None: ...
    def set_iface_ids(self, name: str, ids: Mapping[str, str]) -> None: ...
    def get_port(self, name: str) -> PortInfo | None: ...
    def find_ports(self, want: Mapping[str, str]) -> list[PortInfo]: ...
    def delete_ports(self, names: Sequence[str]) -> None: ...
    def close(self) -> None: ...


class NodeDriver(Protocol):
    """The chassis side of OVN on the node's OVS (core.ovn.OvnNode)."""

    def inspect(self) -> NodeView: ...
    def wait_installed(self, iface: str, logical_port: str, timeout_ms: int, chassis: Chassis) -> float: ...


class NbDriver(Protocol):
    """OVN_Northbound as a small CMS uses it (core.ovn.NbClient)."""

    def add_lsp(self, spec: LspSpec) -> None: ...
    def find_lsps(self, want: Mapping[str, str]) -> list[Lsp]: ...
    def delete_lsps(self, lsps: Sequence[Lsp]) -> None: ...
    def delete_attachment(self, want: Mapping[str, str]) -> list[str]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


class LeaseView(Protocol):
    """What the plugins read of a released lease (ipamd's Lease message)."""

    @property
    def container_id(self) -> str: ...
    @property
    def ifname(self) -> str: ...
    @property
    def ips(self) -> Sequence[Any]: ...


class PendingAllocationDriver(Protocol):
    """An Allocate in flight (core.ipamd_client.PendingAllocation)."""

    def result(self) -> Allocation: ...
    def settle(self) -> None: ...


class IpamClientDriver(Protocol):
    """The subset of core.ipamd_client.IpamClient the plugins use (same signatures)."""

    def close(self) -> None: ...
    def allocate(self, *, network: str, pool: PoolDef, container_id: str, ifname: str,
                 pod: PodRef | None = None, requested_ips: Sequence[IPAddress] = (),
                 requested_mac: str | None = None, netns: str | None = None,
                 conflict_check: bool = False, conflict_check_wait_ms: int = 100,
                 segment: Segment | None = None, interface_mac: str = "",
                 probe_held: bool = False) -> Allocation: ...
    def start_allocate(self, *, network: str, pool: PoolDef, container_id: str, ifname: str,
                       pod: PodRef | None = None, requested_ips: Sequence[IPAddress] = (),
                       requested_mac: str | None = None, netns: str | None = None,
                       conflict_check: bool = False, conflict_check_wait_ms: int = 100,
                       segment: Segment | None = None,
                       interface_mac: str = "") -> PendingAllocationDriver: ...
    def release(self, *, network: str, container_id: str, ifname: str) -> Sequence[LeaseView]: ...
    def get_lease(self, *, network: str, container_id: str, ifname: str) -> Allocation | None: ...
    def gc(self, *, network: str, valid: Sequence[tuple[str, str]]) -> Sequence[LeaseView]: ...
    def probe_gateway(self, *, netns: str, ifname: str, gateway: IPAddress, sender_ip: IPAddress | None,
                      timeout_ms: int, cache_key: str) -> ProbeResult: ...
    def health(self) -> bool: ...


class DelegateDriver(Protocol):
    def run(self, plugin: str, command: str, args: CmdArgs) -> Result | None:
        """Exec `plugin` from CNI_PATH with CNI_COMMAND=`command`, the same env and config."""
        ...


@dataclass
class Drivers:
    netlink: NetlinkDriver
    ovsdb: OvsdbDriver
    ipam: Callable[[str, int], IpamClientDriver]  # (socket path, timeout ms) -> client
    delegate: DelegateDriver
    node: NodeDriver | None = None  # OVN chassis side (None: unit tests that never touch OVN)
    northbound: Callable[[Northbound], NbDriver] | None = None
    _clients: list[Any] = field(default_factory=list)
    _ipam_clients: dict[tuple[str, int], IpamClientDriver] = field(default_factory=dict)

    def ipam_client(self, ipam: IpamConf) -> IpamClientDriver:
        return self.ipam_at(ipam.daemon_socket, ipam.timeout_ms)

    def ipam_at(self, socket_path: str, timeout_ms: int) -> IpamClientDriver:
        """THE client of the ipamd at `socket_path` for this verb (one connection for all its
        calls: its calls are sequential, an Allocate in flight is read or settled before the
        next call), closed with the drivers."""
        key = (socket_path, timeout_ms)
        client = self._ipam_clients.get(key)
        if client is None:
            client = self._ipam_clients[key] = self.ipam(socket_path, timeout_ms)
            self._clients.append(client)
        return client

    def nb(self, nb: Northbound) -> NbDriver:
        assert self.northbound is not None, "no OVN northbound driver"
        client = self.northbound(nb)
        self._clients.append(client)
        return client

    def chassis(self) -> NodeDriver:
        assert self.node is not None, "no OVN node driver"
        return self.node

    def close(self) -> None:
        getattr(self.netlink, "close", lambda: None)()  # cached netlink sockets (real Netlink only)
        for c in self._clients:
            c.close()
        self._clients.clear()
        self.ovsdb.close()


def default_drivers(ovsdb_socket: str) -> Drivers:
    """The production drivers. Imports the netlink and OVSDB modules here (not at module
    import); grpc only when an ipamd client is actually created."""
    from cni.delegate import ExecDelegate
    from core.netlink import Netlink
    from core.ovn import NbClient, OvnNode
    from core.vswitch import Vswitch

    def ipam_factory(socket_path: str, timeout_ms: int) -> IpamClientDriver:
        from core.ipamd_client import IpamClient

        return IpamClient(socket_path, timeout_ms=timeout_ms)

    vswitch = Vswitch(ovsdb_socket)
    return Drivers(netlink=Netlink(), ovsdb=vswitch, ipam=ipam_factory, delegate=ExecDelegate(),
                   node=OvnNode(vswitch.db), northbound=NbClient)
