"""Coexisting with the host's network manager: who manages an interface, and what to persist.

Why: bridging a NIC that NetworkManager or systemd-networkd manages is a fight the agent loses
later (kube-ovn #2983, #4622, PR #2944): the manager renews a DHCP lease on the NIC, re-adds
addresses or routes to it, or brings it down at a restart, and the node is cut off. So `apply`
refuses such an interface unless the file says `manage: true`, and the dry run prints the
configuration an admin adds so that the manager itself builds the bridged layout at boot.

How management is detected, from the manager's own runtime state (no D-Bus, no fork):
- NetworkManager: `/run/NetworkManager/devices/<ifindex>` holds `managed=true`;
- systemd-networkd: `/run/systemd/netif/links/<ifindex>` holds `ADMIN_STATE=` something other
  than `unmanaged` (and `NETWORK_FILE=` names the .network that matched).
Interface indexes are per network namespace and both managers only manage the host's, so the
check applies only when the agent runs in the host's netns (same netns as pid 1) and reads the
host's /run. In a container, mount the host's /run read-only and pass `--host-run`.
netplan renders to one of the two, so it is covered by them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.netstate import AF_INET6, Address, IfaceState, Route, movable

NM = "NetworkManager"
NETWORKD = "systemd-networkd"


@dataclass(frozen=True)
class Management:
    manager: str  # NM or NETWORKD
    detail: str  # what we read, for the message


def in_host_netns() -> bool:
    """True when this process shares pid 1's network namespace (the host's, on a host or in a
    hostNetwork pod). Unknown (no access to /proc/1) counts as True: check rather than skip."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True


def detect(ifindex: int, run_dir: Path = Path("/run")) -> list[Management]:
    """The managers that manage the interface with index `ifindex`, per their files in `run_dir`."""
    out = []
    nm = run_dir / "NetworkManager" / "devices" / str(ifindex)
    text = _read(nm)
    if text is not None and any(line.strip() == "managed=true" for line in text.splitlines()):
        out.append(Management(NM, f"{nm}: managed=true"))
    nd = run_dir / "systemd" / "netif" / "links" / str(ifindex)
    text = _read(nd)
    if text is not None:
        kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        state = kv.get("ADMIN_STATE", "")
        if state and state not in ("unmanaged", "linger"):
            file = kv.get("NETWORK_FILE", "")
            out.append(Management(NETWORKD, f"{nd}: ADMIN_STATE={state}" + (f", {file}" if file else "")))
    return out


def _read(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Persistent configuration (printed by the dry run)


def _gateways(state: IfaceState, family: int) -> list[str]:
    return [
        r.gateway
        for r in state.routes
        if r.family == family and r.gateway and r.table == 254 and r.dst in ("0.0.0.0/0", "::/0")
    ]


def _extra_routes(state: IfaceState) -> list[Route]:
    return [r for r in movable(state).routes if r.dst not in ("0.0.0.0/0", "::/0") or r.table != 254]


def nm_keyfiles(bridge: str, nic: str, state: IfaceState, mtu: int, datapath: str | None) -> dict[str, str]:
    """NetworkManager keyfiles (NetworkManager-ovs plugin) that build the same layout at boot:
    the bridge, a port + internal interface holding the node's addresses (the NIC's MAC), and a
    port + ethernet profile for the NIC with no addresses. File name -> content."""
    m = movable(state)
    v4 = [a for a in m.addresses if a.family != AF_INET6]
    v6 = [a for a in m.addresses if a.family == AF_INET6]
    d = "/etc/NetworkManager/system-connections"
    br = f"[connection]\nid={bridge}\ntype=ovs-bridge\ninterface-name={bridge}\n\n[ovs-bridge]\n"
    if datapath == "netdev":
        br += "datapath-type=netdev\n"
    iface = (
        f"[connection]\nid={bridge}-if\ntype=ovs-interface\ninterface-name={bridge}\n"
        f"master={bridge}-port\nslave-type=ovs-port\n\n[ovs-interface]\ntype=internal\n\n"
        f"[ethernet]\ncloned-mac-address={state.link.mac}\nmtu={mtu}\n\n"
    )
    iface += _nm_ip("ipv4", v4, _gateways(state, 2), _extra_routes_of(state, 2))
    iface += _nm_ip("ipv6", v6, _gateways(state, AF_INET6), _extra_routes_of(state, AF_INET6))
    return {
        f"{d}/{bridge}.nmconnection": br,
        f"{d}/{bridge}-port.nmconnection": (
            f"[connection]\nid={bridge}-port\ntype=ovs-port\n"
            f"interface-name={bridge}\nmaster={bridge}\nslave-type=ovs-bridge\n"
        ),
        f"{d}/{bridge}-if.nmconnection": iface,
        f"{d}/{nic}-port.nmconnection": (
            f"[connection]\nid={nic}-port\ntype=ovs-port\ninterface-name={nic}\n"
            f"master={bridge}\nslave-type=ovs-bridge\n"
        ),
        f"{d}/{nic}.nmconnection": (
            f"[connection]\nid={nic}\ntype=ethernet\ninterface-name={nic}\n"
            f"master={nic}-port\nslave-type=ovs-port\n\n[ethernet]\nmtu={mtu}\n"
        ),
    }


def _extra_routes_of(state: IfaceState, family: int) -> list[Route]:
    return [r for r in _extra_routes(state) if r.family == family]


def _nm_ip(section: str, addrs: Sequence[Address], gws: Sequence[str], routes: Sequence[Route]) -> str:
    if not addrs:
        return f"[{section}]\nmethod=disabled\n\n"
    out = f"[{section}]\nmethod=manual\n"
    for i, a in enumerate(addrs, 1):
        out += f"address{i}={a.address}" + (f",{gws[0]}" if i == 1 and gws else "") + "\n"
    for i, r in enumerate(routes, 1):
        out += (
            f"route{i}={r.dst}"
            + (f",{r.gateway}" if r.gateway else "")
            + (f",{r.metric}" if r.metric else "")
        )
        out += "\n" + (f"route{i}_options=table={r.table}\n" if r.table != 254 else "")
    return out + "\n"


def networkd_files(bridge: str, nic: str, state: IfaceState, mtu: int) -> dict[str, str]:
    """systemd-networkd .network files: the node's addresses and routes on the bridge (which OVS
    re-creates at boot from its database), and the NIC as a bare link. File name -> content."""
    m = movable(state)
    d = "/etc/systemd/network"
    br = f"[Match]\nName={bridge}\n\n[Link]\nMTUBytes={mtu}\n\n[Network]\nLinkLocalAddressing=ipv6\n"
    for a in m.addresses:
        br += f"Address={a.address}\n"
    for gw in _gateways(state, 2) + _gateways(state, AF_INET6):
        br += f"Gateway={gw}\n"
    for r in _extra_routes(state):
        br += f"\n[Route]\nDestination={r.dst}\n" + (f"Gateway={r.gateway}\n" if r.gateway else "")
        br += (f"Metric={r.metric}\n" if r.metric else "") + (f"Table={r.table}\n" if r.table != 254 else "")
    nicf = (
        f"[Match]\nName={nic}\n\n[Link]\nMTUBytes={mtu}\n\n[Network]\nLinkLocalAddressing=no\n"
        "IPv6AcceptRA=no\nDHCP=no\n"
    )
    return {f"{d}/10-{bridge}.network": br, f"{d}/10-{nic}.network": nicf}
