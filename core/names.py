"""The names and marks by which ovs-underlay recognises what it owns, and the name rules of the
CNI spec. One copy, for the plugins, ipamd's reconciler and the node agent.

Why identity without state: the host veth is `ovu` + sha256(container id/ifname)[:12] with the
alias "ovs-underlay <container id> <ifname> <network>", and our OVS Port and Interface rows carry
external_ids `owner=ovs-underlay`, `container_id`, `ifname`. So DEL, GC, CHECK and a reconciler
find everything from (container id, ifname) alone, with no cache that a reboot could lose, and
never touch a row or link without our marks.

The network in the alias ties a veth to its network without its OVS port (a veth whose port is
gone: CNI GC of that network removes it). It is the name itself when that fits in 64
characters, else `#` + 24 hex digits of its sha256 (`network_key`; `#` is not a valid name
character, so the two never collide); with the container id bounded (MAX_CONTAINER_ID) and
the interface name at most 15 bytes, the alias stays within the kernel's 255. An alias of an
older version has no network: it still proves ownership (`same_attachment`), and only a
reconciler, which does not need the network, removes such a veth when its port is gone.
stdlib only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

OWNER = "ovs-underlay"  # external_ids:owner of our OVS rows
DEFAULT_OVSDB = "unix:/run/openvswitch/db.sock"  # the node's Open vSwitch, for every program
ALIAS_PREFIX = "ovs-underlay "  # IFLA_IFALIAS of our host veths: "<prefix><cid> <ifname> <network>"
MAX_NETWORK_IN_ALIAS = 64
# external_ids:owner of ipamd's probe ports (one OVS internal port per L2 segment, in a netns
# ipamd owns): a different owner, so that nothing that manages pods' ports (DEL, GC, the
# reconciler) ever sees them, and ipamd never sees a pod's port.
PROBE_OWNER = "ovs-underlay-ipamd"
PROBE_IF_PREFIX = "ovp"
HOST_IF_PREFIX = "ovu"

# CNI spec: container ids and network names (alphanumerics, then also _ . -).
# \Z, not $: `$` also matches before a trailing newline ("abc\n" passed, into logs and OVSDB).
CONTAINER_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")
NAME_RE = CONTAINER_ID_RE
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")

# Provider networks (the node agent): a network `net1` is bridged into `br-net1`; the agent marks
# the Bridge row's external_ids with these keys, and the CNI plugin's `"provider": "net1"` reads
# them on the select it makes anyway (agent/, core/bridges.py, cni/plugin.py preflight_bridge).
PROVIDER_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")  # Kube-OVN: at most 12 characters
PROVIDER_NETWORK = "provider-network"
PROVIDER_INTERFACE = "provider-interface"
PROVIDER_MTU = "provider-mtu"
PROVIDER_READY = "provider-ready"  # "true" once applied and verified; "false" while not
PROVIDER_ERROR = "provider-error"  # why the last apply failed


def provider_bridge(network: str) -> str:
    return f"br-{network}"


IFNAMSIZ = 15  # the kernel's IFNAMSIZ (16) less the terminating NUL
# Runtimes use 64 hex digits (containerd, CRI-O, podman, Docker; containerd refuses more than
# 76). The bound keeps the host veth's alias (IFALIASZ: 255 bytes) within what the kernel takes.
MAX_CONTAINER_ID = 128


def container_id_problem(container_id: str) -> str | None:
    """Why `container_id` is not a valid CNI_CONTAINERID, or None (the CNI spec's pattern, and
    at most MAX_CONTAINER_ID characters)."""
    if not container_id:
        return "is empty"
    if not CONTAINER_ID_RE.match(container_id):
        return "must match ^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$"
    if len(container_id) > MAX_CONTAINER_ID:
        return f"is longer than {MAX_CONTAINER_ID} characters"
    return None


# Names the kernel will not take for a new interface although they pass dev_valid_name():
# `all` and `default` are the per-protocol sysctl directories (net.ipv4.conf.all), and
# `bonding_masters` is a file in /sys/class/net when the bonding module is loaded.
RESERVED_IFNAMES = frozenset({"all", "default", "bonding_masters"})


def ifname_problem(name: str) -> str | None:
    """Why `name` is not a valid interface name, or None: the kernel's dev_valid_name() (at most
    IFNAMSIZ-1 BYTES, not '.' or '..', no '/', ':' or whitespace) plus what it reserves (see
    RESERVED_IFNAMES) and '%', which the kernel takes as a template ("eth%d" -> "eth0")."""
    if not name:
        return "is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # bytes that are not UTF-8 (os.environ's surrogate escapes)
        return "is not valid UTF-8"
    if size > IFNAMSIZ:
        return f"is longer than {IFNAMSIZ} bytes ({size})"
    if name in (".", ".."):
        return "is '.' or '..'"
    if name in RESERVED_IFNAMES:
        return f"is reserved by the kernel ({', '.join(sorted(RESERVED_IFNAMES))})"
    for ch in name:
        if ch in "/:%" or ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"contains {ch!r} ('/', ':', '%', whitespace and control characters are not allowed)"
    return None


def host_ifname(container_id: str, ifname: str) -> str:
    """The host end of an attachment's veth (and its OVS port): 15 characters at most."""
    return HOST_IF_PREFIX + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:12]


def network_key(network: str) -> str:
    """How a host veth's alias names its network (see the module docstring)."""
    if len(network) <= MAX_NETWORK_IN_ALIAS:
        return network
    return "#" + hashlib.sha256(network.encode()).hexdigest()[:24]


def host_alias(container_id: str, ifname: str, network: str | None = None) -> str:
    """The alias of an attachment's host veth. Without `network`: the identity part only, which
    `same_attachment` matches against an alias with or without a network."""
    base = f"{ALIAS_PREFIX}{container_id} {ifname}"
    return base if network is None else f"{base} {network_key(network)}"


@dataclass(frozen=True)
class Alias:
    container_id: str
    ifname: str
    network_key: str | None  # None: an alias written before the network was recorded


def parse_alias(alias: str | None) -> Alias | None:
    """The attachment an alias names, or None when it is not one of ours."""
    if not alias or not alias.startswith(ALIAS_PREFIX):
        return None
    parts = alias[len(ALIAS_PREFIX):].split(" ")
    if len(parts) not in (2, 3) or container_id_problem(parts[0]) or ifname_problem(parts[1]):
        return None
    return Alias(parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2] else None)


def same_attachment(have: str | None, want: str) -> bool:
    """True when alias `have` belongs to the attachment that alias `want` names (the network
    part, present in either or not, does not decide ownership)."""
    a, b = parse_alias(have), parse_alias(want)
    return a is not None and b is not None and (a.container_id, a.ifname) == (b.container_id, b.ifname)


def probe_port_name(netns: str, segment_key: str) -> str:
    """The probe port of one ipamd (known by its probe netns) on one segment ("bridge/vlan"):
    deterministic, so a restarted ipamd finds the port it made before; 15 characters."""
    return PROBE_IF_PREFIX + hashlib.sha256(f"{netns}|{segment_key}".encode()).hexdigest()[:12]


def is_ovsdb_remote(remote: object) -> bool:
    """An OVSDB remote as ovsdb-server and every OVS tool spell it: unix:PATH, tcp:IP:PORT or
    ssl:IP:PORT (what each program accepts for its ovsdbSocket / --ovsdb)."""
    return isinstance(remote, str) and remote.startswith(("unix:", "tcp:", "ssl:"))
