"""What ovs-underlay left behind on a node: the one judgment of "our orphans", shared by CNI GC
(cni/plugin.py) and ipamd's reconciler (ipamd/reconcile.py).

What counts as ours, and nothing else is ever judged:
- an OVS port whose Interface external_ids carry `owner=ovs-underlay` (core.vswitch finds only
  those), with the attachment's `container_id`, `ifname` and `netns`;
- a host link whose alias is `host_alias(container id, ifname[, network])` (core.names.parse_alias)
  AND whose name is `host_ifname(container id, ifname)` (`owner_of`): an alias that only looks
  like ours, on a link of another name, is not ours.

Two facts the judgments rest on:
1. A veth pair dies with either end's network namespace: once a pod's netns is destroyed the
   kernel deletes its host veth. So a host veth of ours that still exists proves that the pod's
   netns is alive (perhaps held by a process after the runtime removed its path), whatever the
   path says; and a missing path is only evidence when core.netns.netns_state says GONE.
2. ADD creates, in this order, the veth (inside the netns, which the runtime made first), the
   OVS port, the lease; DEL and ADD's rollback remove the lease, the port, the veth. So a veth
   without a port is either an ADD between its first two steps right now or the remains of one
   that crashed there; and a port or veth that exists makes its attachment present.

Pure: the listings come in as data (`scan` is the one function that asks core.vswitch and
core.netlink for them, through two small Protocols), so every rule is unit-tested without a
kernel or an OVS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from core.names import ALIAS_PREFIX, host_ifname, parse_alias
from core.netlink import HostLink
from core.netns import NetnsState
from core.vswitch import PortInfo


@dataclass(frozen=True)
class OurVeth:
    """A host link with our marks, and the attachment its alias names."""

    link: HostLink
    container_id: str
    ifname: str
    network_key: str | None = None  # the alias's network part (CNI GC filters by it); None: none


    @property
    def name(self) -> str:
        return self.link.name


@dataclass(frozen=True)
class DeadPort:
    port: PortInfo
    netns: str
    netns_state: NetnsState

    @property
    def attachment(self) -> tuple[str, str]:
        return attachment_of(self.port)


@dataclass(frozen=True)
class NodeObjects:
    """Our OVS ports and our host veths, as listed at one moment."""

    ports: tuple[PortInfo, ...]
    veths: tuple[OurVeth, ...]

    def ports_of(self, container_id: str, ifname: str) -> list[PortInfo]:
        return [p for p in self.ports if attachment_of(p) == (container_id, ifname)]

    def veth_named(self, name: str) -> OurVeth | None:
        return next((v for v in self.veths if v.name == name), None)

    def veths_of(self, container_id: str, ifname: str) -> list[OurVeth]:
        return [v for v in self.veths if (v.container_id, v.ifname) == (container_id, ifname)]

    def present(self, container_id: str, ifname: str) -> bool:
        """The attachment still has an OVS port or a host veth of ours on this node."""
        return bool(self.ports_of(container_id, ifname) or self.veths_of(container_id, ifname))


def attachment_of(port: PortInfo) -> tuple[str, str]:
    """(container id, ifname) recorded on our port (Interface ids, else Port ids)."""
    ids: Mapping[str, str] = port.iface_ids or port.port_ids
    return ids.get("container_id", ""), ids.get("ifname", "")


def owner_of(link: HostLink) -> OurVeth | None:
    """The attachment a host link belongs to when it carries our marks: an alias
    "ovs-underlay <container id> <ifname>[ <network>]" (core.names.parse_alias) and the name
    host_ifname derives from it."""
    alias = parse_alias(link.alias)
    if alias is None or host_ifname(alias.container_id, alias.ifname) != link.name:
        return None
    return OurVeth(link, alias.container_id, alias.ifname, alias.network_key)


def our_veths(links: Iterable[HostLink]) -> list[OurVeth]:
    return [v for v in map(owner_of, links) if v is not None]


def portless_veths(objs: NodeObjects) -> list[OurVeth]:
    """Our veths that no port of ours uses: neither a port of that name nor one recorded for
    the same attachment. Fact 2: an ADD in progress has one for a moment, so a caller that may
    run beside ADDs (the reconciler) must see it stay portless for a grace period; CNI GC only
    runs while the runtime makes no ADD or DEL of that network."""
    names = {p.name for p in objs.ports}
    return [v for v in objs.veths if v.name not in names and not objs.ports_of(v.container_id, v.ifname)]


def dead_ports(objs: NodeObjects, state_of: Callable[[str], NetnsState]) -> list[DeadPort]:
    """Our ports whose pod is gone: the netns recorded at ADD is not PRESENT and the port's
    veth no longer exists (fact 1: while it exists, the pod's netns is alive). A port without a
    recorded netns is never judged."""
    out = []
    for p in objs.ports:
        netns = p.iface_ids.get("netns", "")
        if not netns or objs.veth_named(p.name) is not None:
            continue
        st = state_of(netns)
        if st is not NetnsState.PRESENT:
            out.append(DeadPort(p, netns, st))
    return out


class PortLister(Protocol):
    def find_ports(self, want: Mapping[str, str]) -> list[PortInfo]: ...


class LinkLister(Protocol):
    def host_links(self, alias_prefix: str) -> list[HostLink]: ...


def scan(ovs: PortLister, nl: LinkLister) -> NodeObjects:
    """List our ports (on every bridge) and our host veths. A caller that judges leases lists
    them BEFORE calling this: by fact 2 the port and veth of an attachment exist before its
    lease, so a lease in that listing has its port and veth in this one unless they are really
    gone. Either order of the two listings here can make an ADD or DEL in flight look like a
    portless veth for a moment; that is what the reconciler's grace and re-check are for."""
    ports = tuple(ovs.find_ports({}))
    return NodeObjects(ports, tuple(our_veths(nl.host_links(ALIAS_PREFIX))))
