"""ipamd's probe ports: one OVS internal port per L2 segment (bridge + VLAN), inside a network
namespace that ipamd owns, from which ipamd probes and watches that segment (issue 14).

Why a port of its own: a conflict probe from the pod's own interface can only start once the
pod's port exists and costs the ADD its whole wait (100 ms by default). A port of ipamd's on the
same bridge and VLAN sees the same L2 segment before any pod exists: ipamd probes the next
candidates there in the background (segments.py), hears the segment's broadcast ARP and
neighbour discovery (a foreign MAC claiming a leased address), and keeps the gateways' answers.

Why an internal port in a netns of ipamd's: it has no IP address and IPv6 is disabled on it
before it comes up, so the kernel never sends or answers anything from it (no ARP, no DAD, no
router or multicast listener traffic): every frame on it is one ipamd sent on purpose. ipamd's
own netns stays untouched. One netns holds all of one ipamd's probe ports.

VLAN: the port is an access port whose tag is the VLAN that the pods' untagged frames are in
(the access tag, or a trunk's native VLAN; 0 for untagged), so it works on access, trunk and
native-VLAN networks alike.

Names and marks, so it never leaks: the netns is `probeNetns` (default `ovu-probe-` + 8 hex
digits of sha256(ipamd's socket path)); the port is `ovp` + sha256(netns|bridge/vlan)[:12].
Both are deterministic, so a restarted ipamd (after a crash too) finds and reuses them. The Port
and Interface rows carry external_ids `owner=ovs-underlay-ipamd`, `probe_netns`, `segment`:
nothing that manages pods' ports ever looks at that owner (core.names), and ipamd touches only
rows of that owner AND of its own netns. A clean shutdown removes every port, then the netns;
at start, ports of segments no longer in use are removed (`prune`).

Robustness: if the device vanishes from the netns (ovs-vswitchd restarted and re-created it in
its own netns; someone deleted it), `ensure` notices (segments.py checks every few seconds) and
rebuilds it. On the userspace datapath ovs-vswitchd logs one warning per port when it can no
longer look the device up by name in its own netns; the port keeps forwarding (its tap fd).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from core import netns, rtnl
from core.errors import CoreError
from core.names import PROBE_OWNER, probe_port_name
from core.netlink import open_pod_rtnl
from core.spec import Segment
from core.vswitch import PortInfo, PortSpec, Vswitch

log = logging.getLogger("ipamd.probe_port")

MOVE_WAIT_S = 2.0  # for ovs-vswitchd to create the device after the port row is committed


def default_netns_name(socket_path: str) -> str:
    return "ovu-probe-" + hashlib.sha256(os.path.realpath(socket_path).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class PortHandle:
    """A probe port that is up in ipamd's netns."""

    segment: Segment
    name: str
    netns_path: str
    mac: str
    ifindex: int


class ProbePorts:
    """Makes, finds and removes one ipamd's probe ports. Thread-safe (one lock: ports are made
    rarely and each in a few milliseconds)."""

    def __init__(self, ovsdb_remote: str, netns_name: str,
                 vswitch: Callable[[], Vswitch] | None = None) -> None:
        self.remote = ovsdb_remote
        self.netns_name = netns_name
        self._vswitch = vswitch or (lambda: Vswitch(ovsdb_remote, owner=PROBE_OWNER))
        self._lock = threading.Lock()

    @property
    def netns_path(self) -> str:
        return os.path.join(netns.NETNS_RUN_DIR, self.netns_name)

    def name_of(self, seg: Segment) -> str:
        return probe_port_name(self.netns_name, seg.key)

    def _ids(self, seg: Segment) -> dict[str, str]:
        return {"owner": PROBE_OWNER, "probe_netns": self.netns_name, "segment": seg.key}

    # ---- make / reuse ------------------------------------------------------------------------

    def ensure(self, seg: Segment) -> PortHandle:
        """The segment's probe port, up in ipamd's netns: reused when it is there and right,
        else (re)made. Raises CoreError (or OSError) when it cannot be made."""
        with self._lock:
            path = netns.create_named(self.netns_name)
            name = self.name_of(seg)
            with self._vswitch() as ovs:
                info = ovs.get_port(name)
                dev = _link_in(path, name)
                if info is not None and dev is not None and self._fits(info, seg):
                    handle = self._up(seg, name, path, dev)
                    log.info("port=%s segment=%s netns=%s mac=%s msg=%s", name, seg.key, self.netns_name,
                             handle.mac, "probe port ready (found and reused)")
                    return handle
                if info is not None:
                    log.info("port=%s segment=%s msg=%s", name, seg.key,
                             "probe port not as expected: re-making it")
                    ovs.delete_ports([name])
                if dev is not None:
                    _delete_link_in(path, name)
                ovs.add_port(PortSpec(name=name, bridge=seg.bridge, tag=seg.vlan, iface_type="internal",
                                      iface_ids=self._ids(seg), port_ids=self._ids(seg)))
                try:
                    self._move_in(name, path)
                    handle = self._up(seg, name, path, _link_in(path, name))
                except BaseException:
                    ovs.delete_ports([name])
                    raise
            log.info("port=%s segment=%s netns=%s mac=%s msg=%s", name, seg.key, self.netns_name, handle.mac,
                     "probe port ready")
            return handle

    def _fits(self, info: PortInfo, seg: Segment) -> bool:
        ids = info.iface_ids
        return (info.bridge == seg.bridge and info.tag == seg.vlan and not info.trunks
                and ids.get("probe_netns") == self.netns_name and ids.get("segment") == seg.key
                and info.ofport is not None and info.ofport > 0)

    @staticmethod
    def _move_in(name: str, path: str) -> None:
        """Move the device ovs-vswitchd made (in ipamd's netns: the host's) into the probe netns."""
        deadline = time.monotonic() + MOVE_WAIT_S
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with rtnl.Rtnl() as host:
                while True:
                    try:
                        host.call(rtnl.link_set(name=name, netns_fd=fd))
                        return
                    except rtnl.RtnlError as exc:
                        if exc.errno not in (errno.ENODEV, errno.ENOENT) or time.monotonic() > deadline:
                            raise CoreError(f"cannot move probe port {name} into netns {path}: "
                                            f"{exc.strerror}") from exc
                    time.sleep(0.01)
        finally:
            os.close(fd)

    @staticmethod
    def _up(seg: Segment, name: str, path: str, dev: rtnl.Link | None) -> PortHandle:
        """IPv6 off before the link comes up (no link-local address, so no DAD, router or
        listener messages), no IPv4 address ever: the kernel sends nothing from this port."""
        if dev is None:
            raise CoreError(f"probe port {name} vanished from netns {path}")
        netns.write_sysctl(path, f"net.ipv6.conf.{name}.disable_ipv6", "1")
        if not dev.up:
            with open_pod_rtnl(path) as nl:
                nl.call(rtnl.link_set(index=dev.index, up=True))
        return PortHandle(seg, name, path, dev.mac, dev.index)

    def alive(self, h: PortHandle) -> bool:
        """The port's device is still in the netns, the same one, and up."""
        try:
            dev = _link_in(h.netns_path, h.name)
        except OSError:
            return False
        return dev is not None and dev.index == h.ifindex and dev.up

    # ---- remove --------------------------------------------------------------------------------

    def owned(self) -> list[PortInfo]:
        """Every probe port of this ipamd (its owner and its netns) in OVSDB, on any bridge."""
        with self._vswitch() as ovs:
            return ovs.find_ports({"probe_netns": self.netns_name})

    def prune(self, keep: set[str]) -> list[str]:
        """Remove this ipamd's probe ports whose segment key is not in `keep` (at start: the
        ones a previous run made for segments nobody uses now). Returns the removed names."""
        with self._lock:
            stale = [p.name for p in self.owned() if p.iface_ids.get("segment") not in keep]
            if stale:
                with self._vswitch() as ovs:
                    ovs.delete_ports(stale)
                log.info("ports=%s msg=%s", ",".join(stale),
                         "removed probe ports of segments no longer in use")
            return stale

    def remove_all(self) -> None:
        """Every probe port of this ipamd, then its netns (clean shutdown)."""
        with self._lock:
            try:
                names = [p.name for p in self.owned()]
                if names:
                    with self._vswitch() as ovs:
                        ovs.delete_ports(names)
            finally:
                netns.delete_named(self.netns_name)
        log.info("netns=%s msg=%s", self.netns_name, "probe ports and their netns removed")


def _link_in(path: str, name: str) -> rtnl.Link | None:
    with open_pod_rtnl(path) as nl:
        return nl.get_link(name=name)


def _delete_link_in(path: str, name: str) -> None:
    with open_pod_rtnl(path) as nl:
        try:
            nl.call(rtnl.link_del(name=name))
        except rtnl.RtnlError as exc:
            if exc.errno not in (errno.ENODEV, errno.ENOENT):
                raise
