"""Result model: conversion to every supported version, parsing, CNI_ARGS."""

from __future__ import annotations

import pytest
from netaddr import IPAddress, IPNetwork

from cni.errors import CniError
from cni.types import DNS, Interface, IPConfig, Result, Route, parse_cni_args

FULL = Result(
    cni_version="1.1.0",
    interfaces=(Interface("ovu0", mac="aa:bb:cc:dd:ee:01"),
                Interface("eth0", mac="0a:58:0a:00:00:05", mtu=1400, sandbox="/run/netns/p",
                          socket_path="/s", pci_id="0000:01:00.1")),
    ips=(IPConfig(IPNetwork("10.0.0.5/24"), IPAddress("10.0.0.1"), 1),
         IPConfig(IPNetwork("fd00::5/64"), IPAddress("fd00::1"), 1)),
    routes=(Route(IPNetwork("0.0.0.0/0"), IPAddress("10.0.0.1"), mtu=1300, advmss=1200, priority=10,
                  table=100, scope=0),),
    dns=DNS(("10.0.0.53",), "cluster.local", ("svc.cluster.local",), ("ndots:5",)),
)


def test_1_1_0_full() -> None:
    j = FULL.to_json()
    assert j == {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "ovu0", "mac": "aa:bb:cc:dd:ee:01"},
                       {"name": "eth0", "mac": "0a:58:0a:00:00:05", "mtu": 1400, "sandbox": "/run/netns/p",
                        "socketPath": "/s", "pciID": "0000:01:00.1"}],
        "ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 1},
                {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1", "mtu": 1300, "advmss": 1200, "priority": 10,
                    "table": 100, "scope": 0}],
        "dns": {"nameservers": ["10.0.0.53"], "domain": "cluster.local", "search": ["svc.cluster.local"],
                "options": ["ndots:5"]},
    }


def test_1_0_0_drops_1_1_fields() -> None:
    """Issue 11 item 20: interfaces[].mtu is a 1.1.0 field and was written in 1.0.0 results."""
    j = FULL.to_json("1.0.0")
    assert j["interfaces"][1] == {"name": "eth0", "mac": "0a:58:0a:00:00:05", "sandbox": "/run/netns/p"}
    assert j["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}]
    assert "version" not in j["ips"][0]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_legacy_down_conversion(version: str) -> None:
    j = FULL.to_json(version)
    assert j["cniVersion"] == version
    assert [ip["version"] for ip in j["ips"]] == ["4", "6"]
    assert j["interfaces"][1] == {"name": "eth0", "mac": "0a:58:0a:00:00:05", "sandbox": "/run/netns/p"}
    assert j["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}]
    assert j["dns"]["nameservers"] == ["10.0.0.53"]


def test_unsupported_output_version() -> None:
    with pytest.raises(CniError) as e:
        FULL.to_json("0.2.0")
    assert e.value.code == 1


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_round_trip(version: str) -> None:
    parsed = Result.from_json(FULL.to_json(version), "1.1.0")
    assert parsed.cni_version == version
    assert parsed.ips == FULL.ips
    assert parsed.to_json(version) == FULL.to_json(version)


def test_ipam_result_without_interfaces_and_default_version() -> None:
    r = Result.from_json({"ips": [{"address": "10.1.0.2/16", "gateway": "10.1.0.1"}]}, "0.4.0")
    assert r.cni_version == "0.4.0" and r.interfaces == () and r.ips[0].interface is None
    assert "interfaces" not in r.to_json()


@pytest.mark.parametrize("bad", [[], {"ips": [{"address": "10.0.0.1"}]}, {"ips": [{"address": "x/24"}]},
                                 {"routes": [{"gw": "1.2.3.4"}]}, {"dns": "x"}, {"cniVersion": "0.1.0"},
                                 # found by tests/unit/test_fuzz_config.py (AttributeError in netaddr: 999)
                                 {"routes": [{"dst": "0.0.0.0/0", "gw": [None]}]}, {"ips": "x"},
                                 {"ips": [{"address": 167772161}]}, {"interfaces": [{"name": 5}]},
                                 {"interfaces": ["eth0"]}])
def test_bad_results(bad: object) -> None:
    with pytest.raises(CniError) as e:
        Result.from_json(bad, "1.0.0")
    assert e.value.code in (1, 6)


def test_parse_cni_args() -> None:
    got = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web-0;mac=0A:58:00:00:00:01;ip=10.0.0.5,fd00::5;;Foo=")
    assert got == {"IGNOREUNKNOWN": "1", "K8S_POD_NAME": "web-0", "MAC": "0A:58:00:00:00:01",
                   "IP": "10.0.0.5,fd00::5", "FOO": ""}
    assert parse_cni_args("") == {}
    with pytest.raises(CniError) as e:
        parse_cni_args("IgnoreUnknown=true;BROKEN")
    assert e.value.code == 4
