"""core/rtnl.py: the rtnetlink messages, byte for byte against the kernel's UAPI layout, and the
parsers against replies the kernel sends (built here the same way). No root needed: the socket
part is exercised on the unprivileged host dumps; creating links is in the integration tests."""

from __future__ import annotations

import socket
import struct

import pytest

from core import rtnl

IFINFO = struct.Struct("=BxHiII")


def _attrs(body: bytes, offset: int) -> dict[int, bytes]:
    return {k: bytes(v) for k, v in rtnl.attrs(body, offset)}


def test_attribute_padding_and_nesting() -> None:
    a = rtnl.nla(3, b"eth0\0")
    assert a == struct.pack("=HH", 9, 3) + b"eth0\0" + b"\0\0\0"  # length 9, padded to 12
    n = rtnl.nested(18, rtnl.nla(1, b"veth\0"))
    size, kind = struct.unpack_from("=HH", n)
    assert kind == 18 | rtnl.NLA_F_NESTED and size == 4 + 12
    assert list((k, bytes(v)) for k, v in rtnl.attrs(n)) == [(18, rtnl.nla(1, b"veth\0"))]


def test_veth_request_creates_the_peer_in_the_netns_with_its_mac_and_the_host_up() -> None:
    req = rtnl.veth_add(host="ovu0123456789ab", peer="eth0", peer_netns_fd=7, mtu=1400,
                        peer_mac="02:aa:bb:cc:dd:ee", host_mac="02:00:00:00:00:01")
    assert req.type == rtnl.RTM_NEWLINK and req.flags == rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL
    _fam, _type, index, flags, change = IFINFO.unpack_from(req.body)
    assert (index, flags, change) == (0, rtnl.IFF_UP, rtnl.IFF_UP)
    top = _attrs(req.body, IFINFO.size)
    assert top[rtnl.IFLA_IFNAME] == b"ovu0123456789ab\0" and struct.unpack("=I", top[rtnl.IFLA_MTU]) == (1400,)
    assert top[rtnl.IFLA_ADDRESS] == bytes.fromhex("020000000001")
    info = _attrs(top[rtnl.IFLA_LINKINFO], 0)
    assert info[rtnl.IFLA_INFO_KIND] == b"veth\0"
    peer = _attrs(info[rtnl.IFLA_INFO_DATA], 0)[rtnl.VETH_INFO_PEER]
    assert IFINFO.unpack_from(peer)[3:] == (0, 0)  # the peer cannot be set up in this message
    pa = _attrs(peer, IFINFO.size)
    assert pa[rtnl.IFLA_IFNAME] == b"eth0\0" and struct.unpack("=I", pa[rtnl.IFLA_NET_NS_FD]) == (7,)
    assert pa[rtnl.IFLA_ADDRESS] == bytes.fromhex("02aabbccddee") and struct.unpack("=I", pa[rtnl.IFLA_MTU]) == (1400,)


def test_link_set_by_name_changes_only_what_is_given() -> None:
    req = rtnl.link_set(name="eth0", alias="ovs-underlay c eth0")
    assert IFINFO.unpack_from(req.body)[2:] == (0, 0, 0)  # no flag changed
    a = _attrs(req.body, IFINFO.size)
    assert a == {rtnl.IFLA_IFNAME: b"eth0\0", rtnl.IFLA_IFALIAS: b"ovs-underlay c eth0\0"}
    down = rtnl.link_set(index=5, up=False)
    assert IFINFO.unpack_from(down.body)[2:] == (5, 0, rtnl.IFF_UP)
    assert _attrs(down.body, IFINFO.size) == {}  # by index: no name attribute


def test_addr_and_route_requests() -> None:
    a = rtnl.addr_add(index=3, address=rtnl.packed("fd00::7"), prefixlen=64, nodad=True)
    fam, plen, flags, scope, idx = struct.unpack_from("=BBBBI", a.body)
    assert (fam, plen, flags, scope, idx) == (socket.AF_INET6, 64, rtnl.IFA_F_NODAD, 0, 3)
    assert _attrs(a.body, 8)[rtnl.IFA_LOCAL] == rtnl.packed("fd00::7")
    r = rtnl.route_add(rtnl.RouteSpec(family=socket.AF_INET, dst=rtnl.packed("10.7.0.0"), dst_len=16, oif=3,
                                      gateway=rtnl.packed("10.5.0.1"), priority=7, table=1000, mtu=1400))
    fields = struct.unpack_from("=BBBBBBBBI", r.body)
    assert fields[:8] == (socket.AF_INET, 16, 0, 0, 0, rtnl.RTPROT_STATIC, 0, rtnl.RTN_UNICAST)  # table>255: attr
    ra = _attrs(r.body, 12)
    assert struct.unpack("=I", ra[rtnl.RTA_TABLE]) == (1000,) and struct.unpack("=I", ra[rtnl.RTA_PRIORITY]) == (7,)
    assert _attrs(ra[rtnl.RTA_METRICS], 0) == {rtnl.RTAX_MTU: struct.pack("=I", 1400)}
    default = rtnl.route_add(rtnl.RouteSpec(family=socket.AF_INET, dst=b"", dst_len=0, oif=3))
    assert rtnl.RTA_DST not in _attrs(default.body, 12) and default.body[4] == rtnl.RT_TABLE_MAIN


def test_parsers_read_what_the_kernel_sends() -> None:
    body = IFINFO.pack(0, 1, 9, rtnl.IFF_UP, 0) + rtnl.nla(rtnl.IFLA_IFNAME, b"eth0\0")
    body += rtnl.nla(rtnl.IFLA_ADDRESS, bytes.fromhex("02aabbccddee")) + rtnl.nla(rtnl.IFLA_MTU, struct.pack("=I", 1500))
    body += rtnl.nla(rtnl.IFLA_IFALIAS, b"ovs-underlay x eth0\0")
    body += rtnl.nested(rtnl.IFLA_LINKINFO, rtnl.nla(rtnl.IFLA_INFO_KIND, b"veth\0"))
    link = rtnl.parse_link(body)
    assert link == rtnl.Link(9, "eth0", "02:aa:bb:cc:dd:ee", 1500, rtnl.IFF_UP, "ovs-underlay x eth0", "veth")
    assert link.up
    msg = struct.pack("=IHHII", 16 + 4, rtnl.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", -19)
    ((mtype, _flags, seq, err),) = list(rtnl.messages(msg))
    assert (mtype, seq, rtnl.error_of(err)) == (rtnl.NLMSG_ERROR, 5, 19)


def test_host_dumps_and_a_missing_link() -> None:
    with rtnl.Rtnl() as nl:
        links = nl.links()
        lo = nl.get_link(name="lo")
        assert lo is not None and lo.index == 1 and any(x.name == "lo" for x in links)
        assert nl.get_link(name="no-such-link0") is None
        assert any(a.index == 1 and rtnl.unpacked(a.address) == "127.0.0.1" for a in nl.addrs(socket.AF_INET))
        with pytest.raises(rtnl.RtnlError) as ei:
            nl.call(rtnl.link_del(name="no-such-link0"))
        assert ei.value.errno == 19  # ENODEV, from the kernel
