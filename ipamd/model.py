"""The daemon's record of one address: what the stores keep and the allocator reasons about.

Why a separate module: stores, allocator and the proto converter all speak this type, and none
of them should import another just to get it. Pure: netaddr and stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netaddr import IPAddress, IPNetwork

from core.spec import PodRef

ACTIVE = "active"
RELEASED = "released"  # cooling down before reuse
QUARANTINED = "quarantined"  # answered on the wire by someone else (conflict_mac)
RESERVED = "reserved"  # a cluster store's outage reserve: held for `node`, handed out only by it
STATES = (ACTIVE, RELEASED, QUARANTINED)  # what every store keeps; RESERVED only in a cluster store


@dataclass(frozen=True)
class Entry:
    """One address of one network. (network, ip) is unique in every store whatever the state:
    a released or quarantined address keeps its row until it is handed out again."""

    network: str
    address: IPNetwork  # host address with the subnet's prefix length
    subnet_index: int  # position of the subnet entry in the pool definition
    container_id: str
    ifname: str
    state: str = ACTIVE
    gateway: IPAddress | None = None
    pod: PodRef = field(default_factory=PodRef)
    mac: str = ""
    netns: str = ""
    created_ms: int = 0
    changed_ms: int = 0  # when it was released or quarantined
    conflict_mac: str = ""
    node: str = ""  # the node whose ipamd granted it (cluster-wide leases: only it may free it)

    @property
    def ip(self) -> IPAddress:
        return self.address.ip

    @property
    def owner(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)
