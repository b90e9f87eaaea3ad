"""The `ovs-underlay-ipam` verbs: ipamd as a standard CNI IPAM plugin for other main plugins.

Why a separate module: macvlan, ipvlan, bridge and ptp exec an IPAM plugin and expect an IPAM
result on stdout (CNI 1.1: `ips` without `interface`, `routes`, `dns`; no `interfaces`). These
verbs forward to the node's ipamd over its unix socket (`ipam.daemonSocket`) through
`core.ipamd_client.IpamClient`; skel (cni/skel.py) writes the result or error and picks the exit
code. The result mapping and the gateway check are the main plugin's (cni.ipam).
Nothing here imports grpc at module level: the client is built by `_default_client` on first use.

Config: the whole main-plugin config arrives on stdin. Only the keys that concern IPAM (`name`,
`ipam`, `runtimeConfig`, `args`, `prevResult`, `cni.dev/valid-attachments`) are handed to the
main plugin's `parse_netconf`, so the per-pod channels (pod ref from CNI_ARGS K8S_POD_*, static
IPs runtimeConfig.ips > args.cni.ips > CNI_ARGS IP=) follow exactly the same rules, and a
foreign main plugin's own keys (macvlan `master`, bridge `isGateway`, ...) are never judged.

ADD: allocate (network = config `name`) with the netns, so ipamd runs its RFC 5227 conflict
probe (sender 0.0.0.0) from CNI_IFNAME; then, with gatewayCheck, each gateway is probed with the
allocated address as sender; an unreachable gateway releases the lease and fails with 103.
bridge, macvlan and ipvlan create the pod interface before IPAM but leave it DOWN until they
configure our result (`ipam.ConfigureIface` sets it up), and a down link cannot send a probe. So
when a probe is enabled and CNI_IFNAME exists but is down, the plugin sets it up for the probes
and sets it down again afterwards (success or failure): the main plugin finds the state it left.
ptp runs IPAM before it creates the veth: ipamd reports the probes as skipped
(conflict_probed=false / ProbeResult.skipped), which is logged, and ADD goes on.

DEL is by identity (`delete`, cni.netconf.parse_del): only the network name and ipamd's socket
are read from the config, so a config that no longer validates cannot strand a lease.

Error codes: daemon unreachable -> 11 naming the socket (ADD, DEL, CHECK, GC; from the client).
CHECK failures (no lease, addresses differ from prevResult) -> 999, like the reference plugins'
CHECK errors and the main plugin's CHECK. STATUS -> 50 when ipamd is unreachable or not serving,
or when a subnet of this network has no free address left. GC without
`cni.dev/valid-attachments` (or `cni.dev/attachments`) -> 7: an absent list is never read as
"release everything".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from cni.drivers import IpamClientDriver
from cni.errors import CniError, Code
from cni.ipam import addressing, conflict_macs, gateway_check
from cni.netconf import (
    IPAMD_TYPE,
    VALID_ATTACHMENTS_KEYS,
    IpamdBackend,
    IpamdSocket,
    parse_del,
    parse_netconf,
)
from cni.types import CmdArgs, Result, addr_key
from core.errors import CoreError
from core.spec import IpamConf, PodRef

if TYPE_CHECKING:
    from netaddr import IPAddress

    from core.spec import Allocation

_log = logging.getLogger("ovs-underlay.ipam")

# Top-level keys of the main plugin's config that this plugin interprets (see module docstring).
_IPAM_KEYS = ("name", "cniVersion", "runtimeConfig", "args", "prevResult", *VALID_ATTACHMENTS_KEYS)


class PoolUsageView(Protocol):
    """The fields of ipamd's PoolUsage message that STATUS reads."""

    network: str
    subnet: str
    used: int
    total: int
    quarantined: int


class IpamDaemon(IpamClientDriver, Protocol):
    """What this plugin needs of core.ipamd_client.IpamClient: the main plugin's driver plus the
    pool listing that STATUS uses to report exhaustion."""

    def list_pools(self, *, network: str = "") -> Sequence[Any]: ...


ClientFactory = Callable[[str, int], IpamDaemon]  # (socket path, timeout ms) -> client


class PodLinks(Protocol):
    """Link state of the pod interface, for the probes only."""

    def raise_if_down(self, netns: str, ifname: str) -> bool:
        """Set `ifname` in `netns` up if it exists and is down; True when it was changed."""
        ...

    def set_down(self, netns: str, ifname: str) -> None: ...


@dataclass
class IpamDrivers:
    client: IpamDaemon
    links: PodLinks


@dataclass(frozen=True)
class IpamPluginConf:
    network: str
    cni_version: str
    ipam: IpamConf
    pod: PodRef = field(default_factory=PodRef)
    requested_ips: tuple[IPAddress, ...] = ()
    prev_result: Result | None = None
    valid_attachments: tuple[tuple[str, str], ...] | None = None
    cache_key: str = ""  # gateway-MAC cache scope in ipamd: one L2 segment


# ---------------------------------------------------------------------------------------------
# Config


def parse_conf(args: CmdArgs) -> IpamPluginConf:
    """Validate the IPAM-relevant part of the config + CNI_ARGS (no side effects)."""
    raw = args.config
    section = raw.get("ipam")
    if not isinstance(section, dict) or not section:
        raise CniError(Code.INVALID_NETWORK_CONFIG, f"ipam: expected an object, got {section!r}",
                       f"{IPAMD_TYPE} is an IPAM plugin: it reads the `ipam` section of the network config")
    sub: dict[str, Any] = {k: raw[k] for k in _IPAM_KEYS if k in raw}
    # The type names the main plugin; ours is forced so that a renamed binary parses the same way.
    sub.update({"type": str(raw.get("type") or "unknown"), "ipam": {**section, "type": IPAMD_TYPE}})
    nc = parse_netconf(replace(args, config=sub))
    if not isinstance(nc.ipam, IpamdBackend):  # cannot happen: ipam.type is forced to ours above
        raise CniError(Code.INTERNAL, f"ipam section did not parse as {IPAMD_TYPE}")
    return IpamPluginConf(
        network=nc.name, cni_version=nc.cni_version, ipam=nc.ipam.conf, pod=nc.pod,
        requested_ips=nc.requested_ips,
        prev_result=nc.prev_result, valid_attachments=nc.valid_attachments,
        cache_key=_cache_key(nc.name, raw))


def _cache_key(network: str, raw: Mapping[str, Any]) -> str:
    """Gateway MACs are cached per (network, main plugin, bridge/master, VLAN): one L2 segment."""
    seg = raw.get("bridge") or raw.get("master") or ""
    return f"{network}|{raw.get('type', '')}|{seg}|{raw.get('vlan') or 0}"


# ---------------------------------------------------------------------------------------------
# Production drivers


def _default_client(socket_path: str, timeout_ms: int) -> IpamDaemon:
    from core.ipamd_client import IpamClient

    return IpamClient(socket_path, timeout_ms=timeout_ms)


class NetnsLinks:
    """PodLinks through core.netlink, imported only when a probe is enabled (the IPAM plugin
    imports nothing it does not use: its cold start is what a runtime without the warm path
    pays on every call)."""

    def raise_if_down(self, netns: str, ifname: str) -> bool:
        from core.netlink import Netlink

        return Netlink().raise_pod_link_if_down(netns, ifname)

    def set_down(self, netns: str, ifname: str) -> None:
        from core.netlink import Netlink

        Netlink().set_pod_link_down(netns, ifname)


# ---------------------------------------------------------------------------------------------
# skel entry points


def _run(args: CmdArgs, verb: Callable[[CmdArgs, IpamPluginConf, IpamDrivers], Result | None],
         factory: ClientFactory = _default_client, links: PodLinks | None = None) -> Result | None:
    conf = parse_conf(args)
    client = factory(conf.ipam.daemon_socket, conf.ipam.timeout_ms)
    try:
        return verb(args, conf, IpamDrivers(client, links or NetnsLinks()))
    finally:
        with contextlib.suppress(Exception):
            client.close()


def add(args: CmdArgs) -> Result | None:
    return _run(args, cmd_add)


def delete(args: CmdArgs, factory: ClientFactory = _default_client) -> Result | None:
    """DEL by identity, as the main plugin (cni.netconf.parse_del): only the network name and
    ipamd's socket are read from the config, each when it validates; the rest (the pool, the
    per-pod channels, prevResult) is never judged, so a config that no longer validates cannot
    strand a lease. No usable name: the attachment is released in every network (the
    identity is unique on the node)."""
    conf = parse_del(args, ipam_plugin=True)
    for why in conf.problems:
        _log.warning("DEL: config: %s (releasing by identity)", why)
    target = conf.ipam if isinstance(conf.ipam, IpamdSocket) else IpamdSocket()
    client = factory(target.socket, target.timeout_ms)
    try:
        cmd_del(args, conf.name or "", client)
    finally:
        with contextlib.suppress(Exception):
            client.close()
    return None


def check(args: CmdArgs) -> Result | None:
    return _run(args, cmd_check)


def status(args: CmdArgs) -> Result | None:
    return _run(args, cmd_status)


def gc(args: CmdArgs) -> Result | None:
    return _run(args, cmd_gc)


# ---------------------------------------------------------------------------------------------
# Verbs


def _undo_release(args: CmdArgs, conf: IpamPluginConf, client: IpamDaemon) -> None:
    try:
        client.release(network=conf.network, container_id=args.container_id, ifname=args.ifname)
    except Exception as exc:  # rollback goes on; the original error is what the runtime sees
        _log.warning("rollback: releasing the lease of %s/%s failed: %s", args.container_id, args.ifname, exc)
    else:
        _log.info("rollback: released the lease of %s/%s", args.container_id, args.ifname)


def _restore_down(d: IpamDrivers, netns: str, ifname: str) -> None:
    try:
        d.links.set_down(netns, ifname)
    except CoreError as exc:  # the main plugin configures (and sets up) the link next anyway
        _log.warning("could not set %s down again after the probes: %s", ifname, exc.msg)
    else:
        _log.info("set %s down again after the probes", ifname)


def cmd_add(args: CmdArgs, conf: IpamPluginConf, d: IpamDrivers) -> Result:
    ipam = conf.ipam
    client = d.client
    with contextlib.ExitStack() as restore:
        if (ipam.conflict_check or ipam.gateway_check) and d.links.raise_if_down(args.netns, args.ifname):
            _log.info("set %s up for the probes (the main plugin left it down)", args.ifname)
            restore.callback(_restore_down, d, args.netns, args.ifname)
        alloc = client.allocate(
            network=conf.network, pool=ipam.pool, container_id=args.container_id, ifname=args.ifname,
            pod=conf.pod, requested_ips=conf.requested_ips, netns=args.netns,
            conflict_check=ipam.conflict_check, conflict_check_wait_ms=ipam.conflict_check_wait_ms)
        with contextlib.ExitStack() as stack:
            stack.callback(_undo_release, args, conf, client)
            if ipam.conflict_check and not alloc.conflict_probed:
                _log.info("conflict probe skipped: %s is not in %s yet (the main plugin creates it "
                          "after IPAM) or the lease already existed", args.ifname, args.netns)
            result = to_result(conf.cni_version, alloc)
            if ipam.gateway_check:
                gateway_check(client, netns=args.netns, ifname=args.ifname, ips=result.ips,
                              timeout_ms=ipam.gateway_check_timeout_ms, cache_key=conf.cache_key,
                              where=f"in {args.netns} (network {conf.network})",
                              hint="check the gateway and the L2 path to it; "
                                   "set ipam.gatewayCheck=false to skip")
            stack.pop_all()
    _log.info("ADD done: network %s ips %s", conf.network, ",".join(str(a.address) for a in alloc.ips))
    return result


def to_result(version: str, alloc: Allocation) -> Result:
    """An IPAM result: no interfaces, no ips[].interface (CNI 1.1)."""
    addr = addressing(alloc, interface=None)
    return Result(cni_version=version, ips=addr.ips, routes=addr.routes, dns=addr.dns)


def cmd_del(args: CmdArgs, network: str, client: IpamClientDriver) -> None:
    """Idempotent: nothing held is success. ipamd unreachable -> 11 (the runtime retries).
    `network` "" releases the attachment in every network."""
    released = client.release(network=network, container_id=args.container_id, ifname=args.ifname)
    _log.info("DEL: released %d address(es) in network %s", sum(len(lease.ips) for lease in released),
              network or "(any)")


def cmd_check(args: CmdArgs, conf: IpamPluginConf, d: IpamDrivers) -> None:
    """The lease exists and holds exactly prevResult's addresses (when prevResult is given)."""
    lease = d.client.get_lease(network=conf.network, container_id=args.container_id, ifname=args.ifname)
    want = {addr_key(ip.address) for ip in conf.prev_result.ips} if conf.prev_result is not None else set()
    conflicts = conflict_macs(lease) if lease is not None else {}
    if lease is None or not (lease.ips or want & set(conflicts)):
        raise CniError(Code.INTERNAL, f"CHECK: no ipamd lease for container {args.container_id} "
                                      f"ifname {args.ifname} in network {conf.network}")
    if conf.prev_result is None:
        return
    held = {addr_key(a.address) for a in lease.ips}
    problems = [conflicts.get((ip, plen), f"{ip}/{plen} is in prevResult but not leased")
                for ip, plen in sorted(want - held)]
    problems += [f"{ip}/{plen} is leased but not in prevResult" for ip, plen in sorted(held - want)]
    if problems:
        raise CniError(Code.INTERNAL, f"CHECK: network {conf.network}: " + "; ".join(problems))


def cmd_gc(args: CmdArgs, conf: IpamPluginConf, d: IpamDrivers) -> None:
    if conf.valid_attachments is None:
        raise CniError(Code.INVALID_NETWORK_CONFIG,
                       "GC needs cni.dev/valid-attachments (or cni.dev/attachments) in the config",
                       "refusing to read a missing list as 'release every lease of the network'")
    released = d.client.gc(network=conf.network, valid=sorted(conf.valid_attachments))
    _log.info("GC: released %d stale attachment(s) in network %s: %s", len(released), conf.network,
              ", ".join(f"{lease.container_id}/{lease.ifname}" for lease in released) or "-")


def cmd_status(args: CmdArgs, conf: IpamPluginConf, d: IpamDrivers) -> None:
    sock = conf.ipam.daemon_socket
    try:
        if not d.client.health():
            raise CniError(Code.NOT_AVAILABLE, f"ipamd at {sock} is not serving")
        pools = d.client.list_pools(network=conf.network)
    except CoreError as exc:
        raise CniError(Code.NOT_AVAILABLE, f"ipamd at {sock} is not available: {exc.msg}") from exc
    broken = [p for p in pools if getattr(p, "definition_error", "")]
    if broken:
        raise CniError(Code.NOT_AVAILABLE, f"network {conf.network} is quarantined by ipamd: "
                                           f"{broken[0].definition_error}")
    full = [p for p in pools if int(p.used) + int(p.quarantined) >= int(p.total)]
    if full:
        raise CniError(Code.NOT_AVAILABLE, f"network {conf.network}: no free address in " + ", ".join(
            f"{p.subnet} ({int(p.used)} used, {int(p.quarantined)} quarantined of {int(p.total)})"
            for p in full))
