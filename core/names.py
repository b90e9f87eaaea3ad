"""The names and marks by which ovs-underlay recognises what it owns, and the name rules of the
CNI spec. One copy, for the plugins, ipamd's reconciler and the node agent.

Why identity without state: the host veth is `ovu` + sha256(container id/ifname)[:12] with the
alias "ovs-underlay <container id> <ifname>", and our OVS Port and Interface rows carry
external_ids `owner=ovs-underlay`, `container_id`, `ifname`. So DEL, GC, CHECK and a reconciler
find everything from (container id, ifname) alone, with no cache that a reboot could lose, and
never touch a row or link without our marks. stdlib only.
"""

from __future__ import annotations

import hashlib
import re

OWNER = "ovs-underlay"  # external_ids:owner of our OVS rows
ALIAS_PREFIX = "ovs-underlay "  # IFLA_IFALIAS of our host veths: "<prefix><container id> <ifname>"
HOST_IF_PREFIX = "ovu"

# CNI spec: container ids and network names (alphanumerics, then also _ . -).
CONTAINER_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
NAME_RE = CONTAINER_ID_RE
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

# Provider networks (the node agent): a network `net1` is bridged into `br-net1`; the agent marks
# the Bridge row's external_ids with these keys, and the CNI plugin's `"provider": "net1"` reads
# them on the select it makes anyway (agent/, core/bridges.py, cni/plugin.py preflight_bridge).
PROVIDER_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?$")  # Kube-OVN: at most 12 characters
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


def ifname_problem(name: str) -> str | None:
    """Why `name` is not a valid interface name, or None (plugins `utils.ValidateInterfaceName`)."""
    if not name:
        return "is empty"
    if len(name) > IFNAMSIZ:
        return f"is longer than {IFNAMSIZ} characters"
    if name in (".", ".."):
        return "is '.' or '..'"
    for ch in name:
        if ch in "/:" or ch.isspace():
            return f"contains {ch!r} ('/', ':' and whitespace are not allowed)"
    return None


def host_ifname(container_id: str, ifname: str) -> str:
    """The host end of an attachment's veth (and its OVS port): 15 characters at most."""
    return HOST_IF_PREFIX + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:12]


def host_alias(container_id: str, ifname: str) -> str:
    return f"{ALIAS_PREFIX}{container_id} {ifname}"

