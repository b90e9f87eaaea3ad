"""The side-effect boundaries the verbs use, as Protocols, bundled in `Drivers`.

Why: verbs are plain functions `cmd_add(args, conf, drivers)`; production passes the real
netlink/OVSDB/ipamd/delegate implementations (built lazily by `default_drivers`), unit tests pass
fakes and inject faults at every step. The warm path (a fork server) reuses the same verbs with
the same drivers. stdlib + ipamd.spec types only at module level.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from netaddr import IPAddress

    from cni.netconf import NetConf
    from cni.netlink import PodLink, PodState
    from cni.ovsdb import PortInfo, PortSpec
    from cni.types import CmdArgs, IPConfig, Result, Route
    from ipamd.spec import Allocation, PodRef, PoolDef, ProbeResult


class NetlinkDriver(Protocol):
    def create_veth(self, *, host: str, netns: str, ifname: str, alias: str, mtu: int | None,
                    mac: str | None) -> PodLink: ...
    def set_pod_mac(self, *, netns: str, ifname: str, mac: str) -> None: ...
    def delete_host_link(self, name: str, alias: str) -> bool: ...
    def host_link_alias(self, name: str) -> str | None: ...
    def list_host_aliases(self) -> dict[str, str]: ...
    def configure(self, *, netns: str, ifname: str, ips: Sequence[IPConfig],
                  routes: Sequence[Route]) -> None: ...
    def pod_state(self, netns: str, ifname: str) -> PodState | None: ...
    def announce(self, *, netns: str, ifname: str, ips: Sequence[IPConfig], mac: str) -> None: ...


class OvsdbDriver(Protocol):
    def bridge_datapath(self, bridge: str) -> str | None: ...
    def add_port(self, spec: PortSpec) -> None: ...
    def set_iface_ids(self, name: str, ids: Mapping[str, str]) -> None: ...
    def get_port(self, name: str) -> PortInfo | None: ...
    def find_ports(self, want: Mapping[str, str]) -> list[PortInfo]: ...
    def delete_ports(self, names: Sequence[str]) -> None: ...
    def close(self) -> None: ...


class IpamClientDriver(Protocol):
    """The subset of ipamd.client.IpamClient the plugin uses (same signatures)."""

    def close(self) -> None: ...
    def allocate(self, *, network: str, pool: PoolDef, container_id: str, ifname: str,
                 pod: PodRef | None = None, requested_ips: Sequence[IPAddress] = (),
                 requested_mac: str | None = None, netns: str | None = None,
                 conflict_check: bool = False, conflict_check_wait_ms: int = 100) -> Allocation: ...
    def release(self, *, network: str, container_id: str, ifname: str) -> int: ...
    def get_lease(self, *, network: str, container_id: str, ifname: str) -> Allocation | None: ...
    def gc(self, *, network: str, valid: Sequence[tuple[str, str]]) -> list[tuple[str, str]]: ...
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
    _clients: list[Any] = field(default_factory=list)

    def ipam_client(self, conf: NetConf) -> IpamClientDriver:
        assert conf.ipam is not None
        client = self.ipam(conf.ipam.daemon_socket, conf.ipam.timeout_ms)
        self._clients.append(client)
        return client

    def close(self) -> None:
        getattr(self.netlink, "close", lambda: None)()  # cached netlink sockets (real Netlink only)
        for c in self._clients:
            c.close()
        self._clients.clear()
        self.ovsdb.close()


def default_drivers(conf: NetConf) -> Drivers:
    """The production drivers. Imports pyroute2 / ovs here (not at module import); grpc only
    when an ipamd client is actually created."""
    from cni.delegate import ExecDelegate
    from cni.netlink import Netlink
    from cni.ovsdb import OvsdbClient

    def ipam_factory(socket_path: str, timeout_ms: int) -> IpamClientDriver:
        from ipamd.client import IpamClient

        return IpamClient(socket_path, timeout_ms=timeout_ms)

    return Drivers(netlink=Netlink(), ovsdb=OvsdbClient(conf.ovsdb_socket), ipam=ipam_factory,
                   delegate=ExecDelegate())
