"""core/netlink.py without a pod: no pyroute2 on import, socket bookkeeping, missing-netns
semantics and the announcement frames. No root needed (netlink dumps and opening a missing
path are unprivileged); the kernel-facing behaviour is in tests/integration/test_plugin_netlink.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from netaddr import IPAddress, IPNetwork

from core.errors import NetnsUnusable
from core.frames import arp_announcement, unsolicited_na
from core.netlink import Netlink

ROOT = Path(__file__).resolve().parents[2]
MISSING = "/run/netns/ovs-underlay-unit-test-no-such-netns"


def _fresh(code: str) -> dict[str, object]:
    """Run `code` in a new interpreter (nothing imported yet); it prints one JSON document."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_import_pulls_in_no_pyroute2() -> None:
    out = _fresh(
        "import json, sys\n"
        "import core.netlink\n"
        "print(json.dumps({'pyroute2': sorted(m for m in sys.modules if m.startswith('pyroute2'))}))\n"
    )
    assert out == {"pyroute2": []}


def test_close_is_idempotent_and_the_object_reusable() -> None:
    nl = Netlink()
    nl.close()
    assert nl.host_link_alias("lo") == ""  # opens the cached host socket
    nl.close()
    nl.close()
    with Netlink() as n2:
        assert n2.host_link_alias("lo") == ""
        assert n2.host_link_alias("no-such-link0") is None


def test_missing_netns_is_a_clear_error_on_add_and_gone_elsewhere() -> None:
    nl = Netlink()
    with pytest.raises(NetnsUnusable) as ei:
        nl.create_veth(host="ovunotcreated0", netns=MISSING, ifname="eth0", alias="ovs-underlay x eth0",
                       mtu=None, mac=None)
    assert MISSING in ei.value.msg
    for call in (lambda: nl.configure(netns=MISSING, ifname="eth0", addresses=(), routes=()),
                 lambda: nl.set_pod_mac(netns=MISSING, ifname="eth0", mac="02:00:00:00:00:01")):
        with pytest.raises(NetnsUnusable):
            call()
    assert nl.pod_state(MISSING, "eth0") is None
    assert nl.raise_pod_link_if_down(MISSING, "eth0") is False
    nl.set_pod_link_down(MISSING, "eth0")  # no error
    assert not Path(MISSING).exists()  # like IPRoute(netns=..., flags=0): never creates a netns
    nl.close()


def test_announce_never_fails_add_and_warns_not_errors(caplog: pytest.LogCaptureFixture) -> None:
    ips = (IPNetwork("192.0.2.5/24").ip, IPNetwork("2001:db8::5/64").ip)
    with caplog.at_level(logging.DEBUG, logger="ovs-underlay"):
        Netlink().announce(netns=MISSING, ifname="eth0", addresses=ips, mac="02:00:00:00:00:05")
    warned = [r for r in caplog.records if "announcing" in r.getMessage()]
    assert len(warned) == 2 and all(r.levelno == logging.WARNING for r in warned)


def test_garp_frame_is_an_rfc5227_announcement() -> None:
    f = arp_announcement("02:00:00:00:00:05", IPAddress("192.0.2.5"))
    assert len(f) == 42
    assert f[:6] == b"\xff" * 6 and f[6:12] == bytes.fromhex("020000000005") and f[12:14] == b"\x08\x06"
    arp = f[14:]
    assert arp[6:8] == b"\x00\x01"  # request
    assert arp[14:18] == arp[24:28] == bytes([192, 0, 2, 5])  # sender IP == target IP
    assert arp[18:24] == b"\x00" * 6


def test_na_message_is_an_unsolicited_override_advertisement() -> None:
    m = unsolicited_na(IPAddress("2001:db8::5"), "02:00:00:00:00:05")
    assert m[0] == 136 and m[1] == 0
    assert m[4] == 0x20  # O set, R and S clear
    assert m[8:24] == IPAddress("2001:db8::5").packed
    assert m[24:26] == b"\x02\x01" and m[26:32] == bytes.fromhex("020000000005")
