"""The `ovs-underlay` verbs: ADD, DEL, CHECK, STATUS, GC over (args, conf, drivers).

Why: each verb is a plain function over a typed config and injected drivers, so unit tests run
it with fakes (fault injection at every step) and the warm path runs exactly this code. The
skel-facing wrappers (`add`, `delete`, ...) only parse the config, build the default drivers
and close them. Nothing here writes to stdout.

Identity without state (core.names): the host veth is `ovu` + sha256(container_id/ifname)[:12]
with alias "ovs-underlay <container_id> <ifname> <network>"; the OVS port has the same name and carries
owner ids, so DEL/GC/CHECK find everything from (container id, ifname) alone. ADD also records
the network and the IPAM backend on the OVS Interface (core.attachment), so DEL reads the config
only leniently (cni.netconf.parse_del) and never fails on it.

IPAM is one typed backend chosen at parse time (cni.netconf: IpamdBackend, DelegateBackend,
NoIpam); the verbs `match` on it. The ipamd result mapping and the gateway check are shared
with the IPAM plugin (cni.ipam). The core's neutral errors pass through to skel, which maps
them (cni.errors); DEL and GC, which collect errors and go on, map them with `as_cni`.

Where the port goes (bridge, tag) is resolved on the node (cni.ovn_attach.resolve): the
config's bridge, OVN's integration bridge, or the bridge ovn-bridge-mappings names.

ADD order (each creating step pushes its undo; cleanup failures are logged, never raised),
with ipamd on a plain OVS port (issue 14): preflight (where the port goes) -> [Allocate sent,
with the port's L2 segment and the pod's MAC, chosen here; undo: release once it has answered]
-> veth (pod end created in the netns with that MAC) [undo: delete veth] -> ipamd's answer (it
probed from its own port on the segment, or took a pre-probed address) -> lease MAC -> the OVS
port in ONE transaction with MAC and addresses [undo: delete port] -> (only when ipamd could not
probe: the held addresses probed now, from the pod's interface) -> addresses + routes -> gateway
check (answered by what ipamd's probe port saw, else probed from the pod) -> gratuitous ARP /
unsolicited NA -> result. Why: the Allocate and the veth overlap, and the port is written once,
so ovs-vswitchd and ovsdb-server see one change per pod.
Otherwise the port comes before IPAM: OVN (bind: wait for ovn-installed, so that the probes
from the pod see the logical network; managed: the logical switch port in one NB transaction
after the allocation [undo: delete it], then the wait) and a delegated IPAM plugin (dhcp needs
the interface on the bridge); the MAC and addresses are then recorded on the port in a second
write.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from cni import ovn_attach
from cni.drivers import Drivers, default_drivers
from cni.errors import CniError, Code, as_cni
from cni.ipam import Addressing, addressing, conflict_macs, gateway_check
from cni.netconf import (
    DelConf,
    DelegateBackend,
    DelIpam,
    IpamdBackend,
    IpamdSocket,
    NetConf,
    NoIpam,
    parse_del,
    parse_netconf,
)
from cni.ovn_attach import Target, undo
from cni.ovnconf import NodeNorthbound
from cni.types import CmdArgs, Interface, IPConfig, Result, addr_key
from core.attachment import IPAMD, NO_IPAM, Record, read_record, record_ids
from core.errors import CoreError
from core.frames import random_mac
from core.names import OWNER, host_alias, host_ifname, network_key, same_attachment
from core.ovnsettings import load_northbound
from core.spec import ConfigError, Segment

if TYPE_CHECKING:
    from cni.drivers import PendingAllocationDriver as PendingAllocation

_log = logging.getLogger("ovs-underlay.plugin")


# ---------------------------------------------------------------------------------------------
# phase timings (observability only: a verb run without `_run`, as in unit tests, records nothing)


class _Phases:
    """Wall time per phase of one verb: a DEBUG line per phase, one INFO summary line."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.done: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.done.append((name, (now - self.last) * 1000))
        self.last = now
        _log.debug("phase %s: %.1f ms", name, self.done[-1][1])

    def summary(self) -> str:
        total = (time.perf_counter() - self.start) * 1000
        return " ".join(f"{n}={ms:.1f}ms" for n, ms in self.done) + f" total={total:.1f}ms"


_PHASES: contextvars.ContextVar[_Phases | None] = contextvars.ContextVar("ovs_underlay_phases", default=None)


def _phase(name: str) -> None:
    ph = _PHASES.get()
    if ph is not None:
        ph.mark(name)


# ---------------------------------------------------------------------------------------------
# skel entry points


C = TypeVar("C", NetConf, DelConf)


def _run(args: CmdArgs, verb: Callable[[CmdArgs, C, Drivers], Result | None],
         parse: Callable[[CmdArgs, NodeNorthbound], C]) -> Result | None:
    ph = _Phases()
    token = _PHASES.set(ph)
    try:
        conf = parse(args, lambda: _node_northbound(args))
        ph.mark("parse")
        d = default_drivers(conf.ovsdb_socket)
        ph.mark("drivers")
        try:
            return verb(args, conf, d)
        finally:
            with contextlib.suppress(Exception):
                d.close()
            ph.mark("close")
    finally:
        _PHASES.reset(token)
        if args.command in ("ADD", "DEL"):
            _log.info("%s phases: %s", args.command, ph.summary())


def _node_northbound(args: CmdArgs) -> Any:
    try:
        return load_northbound(args.env)
    except ConfigError as exc:
        raise CniError(Code.INVALID_NETWORK_CONFIG, str(exc)) from exc


def add(args: CmdArgs) -> Result | None:
    return _run(args, cmd_add, parse_netconf)


def delete(args: CmdArgs) -> Result | None:
    return _run(args, cmd_del, parse_del)


def check(args: CmdArgs) -> Result | None:
    return _run(args, cmd_check, parse_netconf)


def status(args: CmdArgs) -> Result | None:
    return _run(args, cmd_status, parse_netconf)


def gc(args: CmdArgs) -> Result | None:
    return _run(args, cmd_gc, parse_netconf)


# ---------------------------------------------------------------------------------------------
# ADD


def preflight_bridge(conf: NetConf, d: Drivers, code: int) -> Target:
    """Where the port goes on this node (cni.ovn_attach.resolve); `code` when it cannot."""
    return ovn_attach.resolve(conf, d, code)


def port_spec(args: CmdArgs, conf: NetConf, target: Target, host: str, mac: str,
              ips: tuple[IPConfig, ...] = ()) -> Any:
    from core.vswitch import PortSpec

    socket = conf.ipam.conf.daemon_socket if isinstance(conf.ipam, IpamdBackend) else None
    iface_id = ovn_attach.logical_port(args, conf)
    managed = conf.ovn is not None and conf.ovn.managed
    ids = record_ids(container_id=args.container_id, ifname=args.ifname, netns=args.netns,
                     network=conf.name, ipam=_ipam_kind(conf), ipamd_socket=socket,
                     ovn_lsp=iface_id if managed else None)
    ids.update({"pod_namespace": conf.pod.namespace, "pod_name": conf.pod.name, "pod_uid": conf.pod.uid,
                "attached_mac": mac, "ip_addresses": ",".join(str(ip.address) for ip in ips)})
    if iface_id:  # in the transaction that creates the port: ovn-controller never sees it unbound
        ids["iface-id"] = iface_id
    return PortSpec(name=host, bridge=target.bridge, tag=target.tag, trunks=target.trunks,
                    iface_ids=ids, ofport_request=conf.ofport_request,
                    port_ids={"owner": OWNER, "container_id": args.container_id, "ifname": args.ifname})


def _ipam_kind(conf: NetConf) -> str:
    """What ADD records as `ipam` (core.attachment), so DEL knows the backend without the config."""
    match conf.ipam:
        case IpamdBackend():
            return IPAMD
        case DelegateBackend(plugin):
            return plugin
        case NoIpam():
            return NO_IPAM


def cmd_add(args: CmdArgs, conf: NetConf, d: Drivers) -> Result:
    host = host_ifname(args.container_id, args.ifname)
    alias = host_alias(args.container_id, args.ifname, conf.name)
    with contextlib.ExitStack() as stack:
        target = preflight_bridge(conf, d, Code.INVALID_NETWORK_CONFIG)
        _phase("preflight")
        mac = conf.mac or random_mac()  # known before the interface exists: ipamd records it
        early = conf.ovn is None and isinstance(conf.ipam, IpamdBackend | NoIpam)
        pending = _start_ipamd(args, conf, target, d, stack, mac) if early else None
        _phase("allocate_sent")
        link = d.netlink.create_veth(host=host, netns=args.netns, ifname=args.ifname, alias=alias,
                                     mtu=conf.mtu, mac=mac)
        stack.callback(undo, f"delete veth {host}", d.netlink.delete_host_link, host, alias)
        _phase("veth")
        if early:
            addr, mac = _lease_and_port(args, conf, target, d, stack, host, link.mac, pending)
        else:
            addr, mac = _port_then_ipam(args, conf, target, d, stack, host, link.mac)
        d.netlink.configure(netns=args.netns, ifname=args.ifname, addresses=[ip.address for ip in addr.ips],
                            routes=addr.routes)
        _phase("configure")
        if isinstance(conf.ipam, IpamdBackend) and conf.ipam.conf.gateway_check:
            gateway_check(
                d.ipam_client(conf.ipam.conf), netns=args.netns, ifname=args.ifname, ips=addr.ips,
                timeout_ms=conf.ipam.conf.gateway_check_timeout_ms,
                cache_key=_segment(conf, target),
                where=f"on {_segment_text(conf, target)} via OVS bridge {target.bridge} (host port {host})",
                hint="check the uplink trunk, the VLAN on the switch and the gateway; "
                     "set ipam.gatewayCheck=false to skip", seen=addr.gateways)
        _phase("probes")
        d.netlink.announce(netns=args.netns, ifname=args.ifname, addresses=[ip.address.ip for ip in addr.ips],
                           mac=mac)
        _phase("announce")
        result = Result(
            cni_version=conf.cni_version,
            interfaces=(Interface(name=host, mac=link.host_mac),
                        Interface(name=args.ifname, mac=mac, mtu=link.mtu, sandbox=args.netns)),
            ips=addr.ips, routes=addr.routes, dns=addr.dns)
        stack.pop_all()
    _log.info("ADD done: %s on %s VLAN %s%s, ips %s", host, target.bridge, target.vlan_text(),
              f", logical port {ovn_attach.logical_port(args, conf)}" if conf.ovn else "",
              ",".join(str(i.address) for i in addr.ips) or "none")
    return result


def _l2(target: Target, conf: NetConf) -> Segment:
    """The L2 segment of a plain port: where ipamd's probe port for it goes (the VLAN that the
    port's untagged frames are in: access tag, native VLAN, else 0)."""
    return Segment(bridge=target.bridge, vlan=target.tag if target.tag is not None else 0,
                   trunks=target.trunks, ovsdb=conf.ovsdb_socket)


def _start_ipamd(args: CmdArgs, conf: NetConf, target: Target, d: Drivers, stack: contextlib.ExitStack,
                 mac: str) -> PendingAllocation | None:
    """Send the Allocate before the veth exists, so that ipamd decides (and, from its probe port
    on the segment, probes) while the kernel makes the veth. Its undo waits for the answer first:
    a release must follow the grant, never race it."""
    if not isinstance(conf.ipam, IpamdBackend):
        return None
    ipam = conf.ipam.conf
    client = d.ipam_client(ipam)
    pending = client.start_allocate(
        network=conf.name, pool=ipam.pool, container_id=args.container_id, ifname=args.ifname, pod=conf.pod,
        requested_ips=conf.requested_ips, requested_mac=conf.mac, netns=args.netns,
        conflict_check=ipam.conflict_check, conflict_check_wait_ms=ipam.conflict_check_wait_ms,
        segment=_l2(target, conf), interface_mac=mac)

    def release() -> None:
        pending.settle()
        client.release(network=conf.name, container_id=args.container_id, ifname=args.ifname)

    stack.callback(undo, "release lease", release)
    return pending


def _lease_and_port(args: CmdArgs, conf: NetConf, target: Target, d: Drivers, stack: contextlib.ExitStack,
                    host: str, mac: str, pending: PendingAllocation | None) -> tuple[Addressing, str]:
    """ipamd's answer (or no IPAM), then the OVS port in ONE write with the pod's MAC and
    addresses. When ipamd could not probe (no probe port on the segment), it probes the
    addresses now, from the pod's interface on the bridge, before anything uses them."""
    addr = addressing(pending.result(), interface=1) if pending is not None else Addressing()
    _phase("ipam")
    mac = _lease_mac(args, conf, d, mac, addr)
    d.ovsdb.add_port(port_spec(args, conf, target, host, mac, addr.ips))
    stack.callback(undo, f"delete OVS port {host}", d.ovsdb.delete_ports, [host])
    _phase("ovsdb")
    if isinstance(conf.ipam, IpamdBackend) and conf.ipam.conf.conflict_check and not addr.conflict_probed:
        ipam = conf.ipam.conf
        again = addressing(d.ipam_client(ipam).allocate(
            network=conf.name, pool=ipam.pool, container_id=args.container_id, ifname=args.ifname,
            pod=conf.pod, requested_ips=conf.requested_ips, requested_mac=conf.mac, netns=args.netns,
            conflict_check=True, conflict_check_wait_ms=ipam.conflict_check_wait_ms, interface_mac=mac,
            probe_held=True), 1)
        if again.ips != addr.ips:  # an address was in use on the wire and was replaced
            mac = _lease_mac(args, conf, d, mac, again)
            _record(d, host, mac, again)
        addr = again
        _phase("probe_held")
    return addr, mac


def _port_then_ipam(args: CmdArgs, conf: NetConf, target: Target, d: Drivers, stack: contextlib.ExitStack,
                    host: str, mac: str) -> tuple[Addressing, str]:
    """OVN and delegated IPAM: the port first (bound by ovn-controller before IPAM, so that
    probes from the pod see the logical network; on the bridge for dhcp), IPAM, then MAC and
    addresses recorded in a second write."""
    managed = conf.ovn is not None and conf.ovn.managed
    d.ovsdb.add_port(port_spec(args, conf, target, host, mac))
    stack.callback(undo, f"delete OVS port {host}", d.ovsdb.delete_ports, [host])
    _phase("ovsdb")
    if conf.ovn is not None and not managed:
        ovn_attach.wait_installed(args, conf, d, target, host)
        _phase("ovn")
    addr = _ipam_add(args, conf, d, stack)
    _phase("ipam")
    mac = _lease_mac(args, conf, d, mac, addr)
    if managed:  # the LSP needs the final MAC and the addresses
        ovn_attach.add_lsp(args, conf, d, target, mac, addr.ips, stack)
        ovn_attach.wait_installed(args, conf, d, target, host)
        _phase("ovn")
    _record(d, host, mac, addr)
    _phase("ovsdb_ids")
    return addr, mac


def _record(d: Drivers, host: str, mac: str, addr: Addressing) -> None:
    ips = ",".join(str(ip.address) for ip in addr.ips)
    d.ovsdb.set_iface_ids(host, {"attached_mac": mac, "ip_addresses": ips})


def _lease_mac(args: CmdArgs, conf: NetConf, d: Drivers, mac: str, addr: Addressing) -> str:
    """The lease's MAC (macFromIP) on the pod interface, unless the config set one."""
    if addr.mac and not conf.mac and addr.mac.lower() != mac.lower():
        d.netlink.set_pod_mac(netns=args.netns, ifname=args.ifname, mac=addr.mac)
        return addr.mac.lower()
    return mac


def _segment(conf: NetConf, target: Target) -> str:
    """The L2 segment a gateway answer is cached for: the probe port's segment key, or the
    logical switch."""
    if conf.ovn is not None and conf.ovn.logical_switch:
        return f"ovn:{conf.ovn.logical_switch}"
    return _l2(target, conf).key


def _segment_text(conf: NetConf, target: Target) -> str:
    if conf.ovn is not None and conf.ovn.logical_switch:
        vlan = conf.ovn.localnet_vlan
        return f"logical switch {conf.ovn.logical_switch}" + (f" (localnet VLAN {vlan})" if vlan else "")
    return f"VLAN {target.vlan_text()}"


def _ipam_add(args: CmdArgs, conf: NetConf, d: Drivers, stack: contextlib.ExitStack) -> Addressing:
    match conf.ipam:
        case IpamdBackend(ipam):
            client = d.ipam_client(ipam)
            # A managed LSP is created after the allocation (it carries the addresses), so the
            # port passes no traffic yet: a conflict probe would hear nothing. OVN's LSP
            # addresses are the truth on a logical switch.
            probe = ipam.conflict_check and not (conf.ovn is not None and conf.ovn.managed)
            alloc = client.allocate(
                network=conf.name, pool=ipam.pool, container_id=args.container_id, ifname=args.ifname,
                pod=conf.pod, requested_ips=conf.requested_ips, requested_mac=conf.mac, netns=args.netns,
                conflict_check=probe, conflict_check_wait_ms=ipam.conflict_check_wait_ms)
            stack.callback(undo, "release lease", client.release, network=conf.name,
                           container_id=args.container_id, ifname=args.ifname)
            return addressing(alloc, interface=1)
        case DelegateBackend(plugin):
            res = d.delegate.run(plugin, "ADD", args)
            stack.callback(undo, f"IPAM {plugin} DEL", d.delegate.run, plugin, "DEL", args)
            if res is None or not res.ips:
                raise CniError(Code.INTERNAL, f"IPAM plugin {plugin} returned no IP configuration")
            ips = tuple(IPConfig(ip.address, ip.gateway, 1) for ip in res.ips)
            # A route without gw goes via the gateway of its family (Go ipam.ConfigureIface).
            gws = {ip.version: ip.gateway for ip in reversed(ips) if ip.gateway is not None}
            routes = tuple(replace(r, gw=gws[r.dst.version]) if r.gw is None and r.dst.version in gws else r
                           for r in res.routes)
            return Addressing(ips, routes, res.dns)
        case NoIpam():
            return Addressing()


# ---------------------------------------------------------------------------------------------
# DEL


def cmd_del(args: CmdArgs, conf: DelConf, d: Drivers) -> None:
    """Clean up by identity (container id, ifname): find our port(s) and what ADD recorded on
    them (core.attachment), release the lease, remove our logical switch port (managed OVN),
    the OVS port(s), then the host veth. Every step runs even after a failure; missing things
    count as success. The record says which network, ipamd socket or IPAM plugin ADD used; the
    config (read leniently, `parse_del`) only fills in what the record lacks, so a config that no
    longer validates cannot stop DEL. An unreachable ipamd (or OVN northbound) is code 11 (left
    for GC) but the rest is removed."""
    errors: list[CniError] = []
    host, alias = host_ifname(args.container_id, args.ifname), host_alias(args.container_id, args.ifname)
    for why in conf.problems:
        _log.warning("DEL: config: %s (cleaning up by identity)", why)
    names: set[str] = set()
    record = None
    try:
        ports = d.ovsdb.find_ports({"container_id": args.container_id, "ifname": args.ifname})
        names = {p.name for p in ports}
        existing = d.ovsdb.get_port(host)
        if existing is not None and existing.iface_ids.get("container_id") == args.container_id:
            names.add(host)
            ports.append(existing)
        record = next((r for r in map(read_record, (p.iface_ids for p in ports)) if r is not None), None)
    except (CniError, CoreError) as exc:
        errors.append(as_cni(exc))
    _phase("lookup")
    try:
        _release(args, conf, record, d)
    except (CniError, CoreError) as exc:
        errors.append(as_cni(exc))
    _phase("ipam")
    try:
        ovn_attach.del_lsp(args, conf.ovn, d, recorded=record.ovn_lsp if record else None)
    except (CniError, CoreError) as exc:
        errors.append(as_cni(exc))
    _phase("ovn")
    try:
        d.ovsdb.delete_ports(sorted(names))
    except (CniError, CoreError) as exc:
        errors.append(as_cni(exc))
    _phase("ovsdb")
    try:
        d.netlink.delete_host_link(host, alias)
    except (CniError, CoreError) as exc:
        errors.append(as_cni(exc))
    except OSError as exc:
        errors.append(CniError(Code.INTERNAL, f"delete {host}: {exc}"))
    _phase("veth")
    if errors:
        first = errors[0]
        raise CniError(first.code, "; ".join(e.msg for e in errors), first.details)


def _release(args: CmdArgs, conf: DelConf, record: Record | None, d: Drivers) -> None:
    """Release what IPAM holds for the attachment: where the record says, else where the config
    says. A network nobody names releases the attachment in every network (the identity is
    unique on the node)."""
    for why in record.problems if record else ():
        _log.warning("DEL: recorded on the OVS port: %s", why)
    network = (record.network if record else None) or conf.name
    backend: DelIpam | None = conf.ipam
    if record is not None and record.ipam is not None:
        timeout = conf.ipam.timeout_ms if isinstance(conf.ipam, IpamdSocket) else 10_000
        backend = (IpamdSocket(record.ipamd_socket or "", timeout) if record.ipam == IPAMD
                   else NoIpam() if record.ipam == NO_IPAM else DelegateBackend(record.ipam))
    match backend:
        case IpamdSocket(socket, timeout_ms):
            client = d.ipam_at(socket, timeout_ms)
            released = client.release(network=network or "", container_id=args.container_id,
                                      ifname=args.ifname)
            _log.info("released %d address(es) in network %s via %s",
                      sum(len(lease.ips) for lease in released), network or "(any)", socket)
        case DelegateBackend(plugin):
            _delegate_best_effort(plugin, d, "DEL", args)
        case NoIpam():
            pass
        case None:
            _log.warning("DEL: neither the OVS port nor the config names a usable IPAM backend; "
                         "nothing released (GC or the reconciler releases a stranded lease)")


def _delegate_best_effort(plugin: str, d: Drivers, command: str, args: CmdArgs) -> None:
    from cni.delegate import DelegateNotFound

    try:
        d.delegate.run(plugin, command, args)
    except DelegateNotFound as exc:
        # Nothing can have been allocated by a plugin that does not exist: not a DEL failure.
        _log.warning("%s: %s; nothing to release", command, exc.msg)


# ---------------------------------------------------------------------------------------------
# CHECK


def cmd_check(args: CmdArgs, conf: NetConf, d: Drivers) -> None:
    """Compare the live attachment with prevResult and the config. Changes nothing."""
    prev = conf.prev_result
    if prev is None:
        raise CniError(Code.INVALID_NETWORK_CONFIG, "CHECK needs prevResult in the config")
    problems: list[str] = []
    state = d.netlink.pod_state(args.netns, args.ifname)
    pod_if = next((i for i in prev.interfaces if i.name == args.ifname and i.sandbox), None)
    if state is None:
        problems.append(f"interface {args.ifname} is missing in {args.netns}")
    else:
        if pod_if is not None and pod_if.mac and pod_if.mac.lower() != state.link.mac.lower():
            problems.append(f"MAC of {args.ifname} is {state.link.mac}, expected {pod_if.mac}")
        if conf.mtu and state.link.mtu != conf.mtu:
            problems.append(f"MTU of {args.ifname} is {state.link.mtu}, expected {conf.mtu}")
        if not state.link.up:
            problems.append(f"{args.ifname} is down")
        present = {addr_key(a) for a in state.addresses}
        for ip in prev.ips:
            if addr_key(ip.address) not in present:
                problems.append(f"address {ip.address} missing on {args.ifname}")
        have = {(r.dst, r.gw) for r in state.routes}
        for r in prev.routes:
            if (r.dst, r.gw) not in have:
                problems.append(f"route {r.dst} via {r.gw} missing in {args.netns}")
    problems += _check_port(args, conf, d)
    try:
        problems += ovn_attach.check(args, conf, d, _port_ids(args, d))
    except (CniError, CoreError) as exc:
        problems.append(as_cni(exc).msg)
    problems += _check_lease(args, conf, d, prev)
    if problems:
        raise CniError(Code.INTERNAL, "CHECK failed: " + "; ".join(problems))


def _port_ids(args: CmdArgs, d: Drivers) -> dict[str, str]:
    p = d.ovsdb.get_port(host_ifname(args.container_id, args.ifname))
    return dict(p.iface_ids) if p is not None else {}


def _check_port(args: CmdArgs, conf: NetConf, d: Drivers) -> list[str]:
    host = host_ifname(args.container_id, args.ifname)
    p = d.ovsdb.get_port(host)
    if p is None:
        return [f"OVS port {host} is missing"]
    out = []
    ids = p.iface_ids
    if ids.get("owner") != OWNER or ids.get("container_id") != args.container_id \
            or ids.get("ifname") != args.ifname:
        out.append(f"OVS port {host} is not owned by this attachment (external_ids {dict(ids)})")
    try:
        target = preflight_bridge(conf, d, Code.INTERNAL)
    except (CniError, CoreError) as exc:
        return [*out, as_cni(exc).msg]
    if p.bridge != target.bridge:
        out.append(f"OVS port {host} is on bridge {p.bridge}, expected {target.bridge}")
    if p.tag != target.tag:
        out.append(f"OVS port {host} has tag {p.tag}, expected {target.tag}")
    if tuple(p.trunks) != target.trunks:
        out.append(f"OVS port {host} trunks {list(p.trunks)}, expected {list(target.trunks)}")
    if not same_attachment(d.netlink.host_link_alias(host), host_alias(args.container_id, args.ifname)):
        out.append(f"host veth {host} is missing or not ours")
    return out


def _check_lease(args: CmdArgs, conf: NetConf, d: Drivers, prev: Result) -> list[str]:
    match conf.ipam:
        case IpamdBackend(ipam):
            lease = d.ipam_client(ipam).get_lease(network=conf.name, container_id=args.container_id,
                                                  ifname=args.ifname)
            conflicts = conflict_macs(lease) if lease is not None else {}
            if lease is None or not (lease.ips or any(addr_key(ip.address) in conflicts for ip in prev.ips)):
                return [f"no ipamd lease for {args.container_id}/{args.ifname} in network {conf.name}"]
            held = {addr_key(a.address) for a in lease.ips}
            missing = [ip.address for ip in prev.ips if addr_key(ip.address) not in held]
            return [conflicts.get(addr_key(a), f"address {a} is not leased to this attachment")
                    for a in missing]
        case DelegateBackend(plugin):
            try:
                d.delegate.run(plugin, "CHECK", args)
            except CniError as exc:
                return [exc.msg]
    return []


# ---------------------------------------------------------------------------------------------
# STATUS / GC


def cmd_status(args: CmdArgs, conf: NetConf, d: Drivers) -> None:
    try:
        preflight_bridge(conf, d, Code.NOT_AVAILABLE)
        if conf.ovn is not None and conf.ovn.northbound is not None and conf.ovn.managed:
            d.nb(conf.ovn.northbound).ping()
    except (CniError, CoreError) as exc:
        err = as_cni(exc)
        raise CniError(Code.NOT_AVAILABLE, err.msg, err.details) from exc
    match conf.ipam:
        case IpamdBackend(ipam):
            try:
                healthy = d.ipam_client(ipam).health()
            except CoreError as exc:
                raise CniError(Code.NOT_AVAILABLE, f"ipamd at {ipam.daemon_socket}: {exc.msg}") from exc
            if not healthy:
                raise CniError(Code.NOT_AVAILABLE, f"ipamd at {ipam.daemon_socket} is not serving")
        case DelegateBackend(plugin):
            try:
                d.delegate.run(plugin, "STATUS", args)
            except CniError as exc:
                if exc.code != Code.INCOMPATIBLE_VERSION:
                    raise
                _log.info("IPAM plugin %s does not implement STATUS (CNI < 1.1.0)", plugin)


def _gc_portless_veths(conf: NetConf, valid: set[tuple[str, str]], d: Drivers) -> list[CniError]:
    """Host veths of this network that are not valid and have no OVS port (a port that OVS
    lost, or an ADD killed between the veth and the port), judged as ipamd's reconciler judges
    them (core.orphans: our alias AND the name derived from it). A veth whose alias names no
    network (an older ADD) is left to the reconciler."""
    from core import orphans  # GC only: not on the ADD/DEL import path

    key = network_key(conf.name)
    errors: list[CniError] = []
    try:
        for v in orphans.portless_veths(orphans.scan(d.ovsdb, d.netlink)):
            if v.network_key != key or (v.container_id, v.ifname) in valid:
                continue
            if d.ovsdb.get_port(v.name) is not None:
                continue  # someone else's port of that name: not ours to judge
            if d.netlink.delete_host_link(v.name, v.link.alias, index=v.link.index):
                _log.info("GC: removed veth %s of stale attachment %s/%s (no OVS port)", v.name,
                          v.container_id, v.ifname)
    except (CniError, CoreError) as exc:
        errors.append(as_cni(exc))
    return errors


def cmd_gc(args: CmdArgs, conf: NetConf, d: Drivers) -> None:
    """Remove our OVS ports (and their host veths) of this network whose attachment is not in
    cni.dev/valid-attachments, and our host veths of this network that are not valid and have
    no port; then forward to ipamd / the delegate. Continues after errors."""
    if conf.valid_attachments is None:
        # A missing list must not read as "nothing is valid": that would wipe the network.
        raise CniError(Code.INVALID_NETWORK_CONFIG,
                       "GC needs cni.dev/valid-attachments (or cni.dev/attachments) in the config")
    valid = set(conf.valid_attachments)
    errors: list[CniError] = []
    try:
        stale = [p for p in d.ovsdb.find_ports({"network": conf.name})
                 if (p.iface_ids.get("container_id", ""), p.iface_ids.get("ifname", "")) not in valid]
        if stale:
            d.ovsdb.delete_ports([p.name for p in stale])
        for p in stale:
            cid, ifn = p.iface_ids.get("container_id", ""), p.iface_ids.get("ifname", "")
            _log.info("GC: removed stale attachment %s/%s (port %s)", cid, ifn, p.name)
            try:
                d.netlink.delete_host_link(host_ifname(cid, ifn), host_alias(cid, ifn))
            except (CoreError, OSError) as exc:
                errors.append(CniError(Code.INTERNAL, f"GC: delete veth of {cid}/{ifn}: {exc}"))
    except (CniError, CoreError) as exc:
        errors.append(as_cni(exc))
    errors += _gc_portless_veths(conf, valid, d)
    try:
        ovn_attach.gc_lsps(conf, d, valid)
    except (CniError, CoreError) as exc:
        errors.append(as_cni(exc))
    match conf.ipam:
        case IpamdBackend(ipam):
            try:
                released = d.ipam_client(ipam).gc(network=conf.name, valid=sorted(valid))
                _log.info("GC: ipamd released %d lease(s)", len(released))
            except (CniError, CoreError) as exc:
                errors.append(as_cni(exc))
        case DelegateBackend(plugin):
            try:
                d.delegate.run(plugin, "GC", args)
            except CniError as exc:
                if exc.code == Code.INCOMPATIBLE_VERSION:
                    _log.info("IPAM plugin %s does not implement GC (CNI < 1.1.0)", plugin)
                else:
                    errors.append(exc)
    if errors:
        raise CniError(errors[0].code, "GC: " + "; ".join(e.msg for e in errors))
