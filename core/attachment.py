"""What ADD records about an attachment on our OVS Interface, and how DEL, GC and the reconciler
read it back.

Why: DEL must clean up by identity alone. The CNI spec makes DEL best effort: it must succeed
when things are missing and must not depend on the config still validating (a config with
`vlan: 5000`, an unknown IPAM key or a bad prevResult used to make DEL remove nothing, and kubelet
retried it forever). The identity is (container id, ifname); everything else DEL needs — which
network the lease is in, which ipamd holds it, or which IPAM plugin to call — ADD writes into
the Interface's `external_ids` in the same transaction that creates the port, and DEL reads it
back from there. The same record tells a reconciler what a port of ours belongs to.

Keys of the Interface's `external_ids` (the Port carries owner, container_id and ifname):
- `owner=ovs-underlay`, `container_id`, `ifname`: the identity (core.names);
- `netns`: the pod's netns path at ADD;
- `network`: the network name (the ipamd pool's identity);
- `ipam`: `ovs-underlay-ipam` (ipamd), the delegated IPAM plugin's type, or `none` (L2 only);
- `ipamd_socket`: ipamd's socket path, with `ipam=ovs-underlay-ipam`;
- `ovn_lsp`: the logical switch port ADD created (managed OVN), which DEL deletes;
- informational: `pod_namespace`, `pod_name`, `pod_uid`, `attached_mac`, `ip_addresses`, and
  `iface-id` (OVN).
A port written by an older ADD has no `ipam`/`ipamd_socket`: readers fall back to the config.

Read back, every value is validated (names by the CNI name rule and a length limit, the socket
as an absolute path that fits a unix socket address); an invalid value reads as
absent (and is named in `problems`), so a hand-edited row can never send DEL elsewhere. stdlib
only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.names import CONTAINER_ID_RE, NAME_RE, OWNER, container_id_problem, ifname_problem

IPAMD = "ovs-underlay-ipam"  # `ipam` value: addresses from ipamd
NO_IPAM = "none"  # `ipam` value: an L2-only attachment
MAX_NAME = 253  # network and plugin names (a Kubernetes object name fits)
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


def name_problem(value: object, what: str) -> str | None:
    """Why `value` is not a valid network / plugin name, or None."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        return f"{what} {value!r} is not a valid name (^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$)"
    if len(value) > MAX_NAME:
        return f"{what} is longer than {MAX_NAME} characters"
    return None


def socket_problem(value: object, what: str = "socket") -> str | None:
    """Why `value` is not a usable unix socket path, or None."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        return f"{what} {value!r} is not an absolute path"
    if len(value.encode()) > SUN_PATH_MAX:
        return f"{what} {value!r} is longer than a unix socket path may be ({SUN_PATH_MAX} bytes)"
    return None


@dataclass(frozen=True)
class Record:
    """One attachment as ADD recorded it. `ipam` None: not recorded (an older ADD) or invalid."""

    container_id: str
    ifname: str
    netns: str = ""
    network: str | None = None
    ipam: str | None = None  # IPAMD, a delegated plugin's type, or NO_IPAM
    ipamd_socket: str | None = None
    ovn_lsp: str | None = None
    problems: tuple[str, ...] = ()


IPAMD_SOCKET_KEY = "ipamd_socket"  # which ipamd holds the attachment's lease (its reconciler's ports)


def record_ids(*, container_id: str, ifname: str, netns: str, network: str, ipam: str,
               ipamd_socket: str | None, ovn_lsp: str | None = None) -> dict[str, str]:
    """The identity part of an Interface's external_ids for one attachment."""
    ids = {"owner": OWNER, "container_id": container_id, "ifname": ifname, "netns": netns,
           "network": network, "ipam": ipam}
    if ipamd_socket is not None:
        ids[IPAMD_SOCKET_KEY] = ipamd_socket
    if ovn_lsp is not None:
        ids["ovn_lsp"] = ovn_lsp
    return ids


def read_record(ids: Mapping[str, str]) -> Record | None:
    """The attachment an Interface's external_ids describe, validated; None when the row is not
    ours or its identity is invalid."""
    cid, ifname = ids.get("container_id", ""), ids.get("ifname", "")
    if ids.get("owner") != OWNER or container_id_problem(cid) or ifname_problem(ifname):
        return None
    problems = []
    network: str | None = ids.get("network")
    if network is not None and (why := name_problem(network, "network")):
        problems.append(why)
        network = None
    ipam: str | None = ids.get("ipam")
    if ipam is not None and ipam != NO_IPAM and (why := name_problem(ipam, "ipam")):
        problems.append(why)
        ipam = None
    sock: str | None = ids.get(IPAMD_SOCKET_KEY)
    if sock is not None and (why := socket_problem(sock, IPAMD_SOCKET_KEY)):
        problems.append(why)
        sock = None
    if ipam == IPAMD and sock is None:
        ipam = None  # which ipamd is not known: as if not recorded
    lsp = ids.get("ovn_lsp") or None
    if lsp is not None and (len(lsp) > 255 or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in lsp)):
        problems.append(f"ovn_lsp {lsp!r} is not a logical port name")
        lsp = None
    netns = ids.get("netns", "")
    return Record(cid, ifname, netns if netns.startswith("/") else "", network, ipam, sock, lsp,
                  tuple(problems))


__all__ = ["CONTAINER_ID_RE", "IPAMD", "NO_IPAM", "Record", "read_record", "record_ids", "socket_problem"]
