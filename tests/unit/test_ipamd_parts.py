"""Small pure parts of ipamd: frames, daemon config, metrics exposition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from netaddr import IPAddress

from core import frames
from ipamd.config import DaemonConfigError, listen_address, load
from ipamd.metrics import Metrics


def test_arp_probe_frame_round_trip() -> None:
    own = bytes.fromhex("020000000001")
    f = frames.arp_request(own, None, IPAddress("10.0.0.7"))
    pkt = frames.parse_arp(f)
    assert pkt is not None and pkt.op == 1 and int(pkt.spa) == 0 and str(pkt.tpa) == "10.0.0.7"
    assert f[:6] == frames.BROADCAST
    other = frames.parse_arp(frames.arp_request(bytes.fromhex("020000000002"), None, IPAddress("10.0.0.7")))
    assert other is not None and frames.arp_probe_collision(other, IPAddress("10.0.0.7"), own)
    assert not frames.arp_probe_collision(pkt, IPAddress("10.0.0.7"), own)  # our own probe


def test_ns_frame_checksum_and_group() -> None:
    own = bytes.fromhex("020000000001")
    f = frames.neighbor_solicitation(own, None, IPAddress("fd00::1:2345"))
    assert f[:6] == bytes.fromhex("3333ff012345")
    nd = frames.parse_nd(f)
    assert nd is not None and nd.type == frames.ICMPV6_NS and int(nd.src_ip) == 0 and nd.lladdr is None
    # checksum over pseudo header + ICMPv6 body sums to zero
    ip6, icmp = f[14:54], f[54:]
    pseudo = ip6[8:40] + len(icmp).to_bytes(4, "big") + b"\x00\x00\x00\x3a"
    assert frames._checksum(pseudo + icmp) == 0


def test_gateway_answer_is_a_reply_from_the_gateway_not_our_own_frame() -> None:
    """The one rule of every gateway check (ipamd's probes and the node agent's verify)."""
    own, gw_mac, gw = bytes.fromhex("020000000001"), bytes.fromhex("02000000000a"), IPAddress("10.0.0.1")
    reply = bytearray(frames.arp_request(gw_mac, gw, IPAddress("10.0.0.7")))
    reply[20:22] = (2).to_bytes(2, "big")  # the same frame as an ARP reply (op 2)
    assert frames.gateway_answer(bytes(reply), gw, own) == gw_mac
    assert frames.gateway_answer(frames.arp_request(gw_mac, gw, IPAddress("10.0.0.7")), gw, own) is None  # a request
    assert frames.gateway_answer(bytes(reply), IPAddress("10.0.0.2"), own) is None  # another host
    assert frames.gateway_answer(bytes(reply), gw, gw_mac) is None  # our own frame
    ns = frames.neighbor_solicitation(gw_mac, None, IPAddress("fd00::1"))
    assert frames.gateway_answer(ns, IPAddress("fd00::1"), own) is None  # a solicitation is no answer
    na = bytearray(ns)
    na[54] = frames.ICMPV6_NA  # the same frame as an advertisement for fd00::1
    assert frames.gateway_answer(bytes(na), IPAddress("fd00::1"), own) == gw_mac
    assert frames.gateway_answer(bytes(na), IPAddress("fd00::2"), own) is None


def test_daemon_config_file_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    tls = {"tlsCert": "/etc/t/c.pem", "tlsKey": "/etc/t/k.pem", "tlsClientCa": "/etc/t/ca.pem"}
    p.write_text(json.dumps({"socket": "/run/a.sock", "cooldownSeconds": 5, "metricsPort": 9000, **tls}))
    cfg = load(str(p), {"socket": "/run/b.sock", "state_dir": None})
    assert (cfg.socket, cfg.cooldown_seconds, cfg.metrics_port) == ("/run/b.sock", 5, 9000)
    # nothing listens on TCP without mutual TLS: a metrics port needs the TLS files
    p.write_text(json.dumps({"metricsPort": 9000}))
    with pytest.raises(DaemonConfigError, match="metricsPort 9000 needs mutual TLS"):
        load(str(p), {})
    assert load(None, {}).socket == "/run/ovs-underlay/ipamd.sock"
    p.write_text(json.dumps({"cooldown": 5}))
    with pytest.raises(DaemonConfigError, match="unknown key 'cooldown'"):
        load(str(p), {})
    p.write_text(json.dumps({"workers": "many"}))
    with pytest.raises(DaemonConfigError, match="workers"):
        load(str(p), {})
    assert listen_address("9090") == "127.0.0.1:9090"


@pytest.mark.parametrize(("keys", "error"), [
    ({"probePorts": "yes"}, "probePorts"),
    ({"probeNetns": "../etc"}, "probeNetns"),
    ({"probeFreshSeconds": 0}, "probeFreshSeconds"),
    ({"ovsdbSocket": "/run/openvswitch/db.sock"}, "ovsdbSocket"),
])
def test_probe_port_settings_are_checked(tmp_path: Path, keys: dict[str, object], error: str) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"probePorts": False, "probeCandidates": 0, "probeNetns": "probe-1"}))
    cfg = load(str(p), {"probe_ports": None})
    assert (cfg.probe_ports, cfg.probe_candidates, cfg.probe_netns) == (False, 0, "probe-1")
    defaults = load(None, {})
    assert (defaults.probe_ports, defaults.probe_candidates, defaults.probe_fresh_seconds) == (True, 8, 10.0)
    assert defaults.ovsdb_socket == "unix:/run/openvswitch/db.sock"
    p.write_text(json.dumps(keys))
    with pytest.raises(DaemonConfigError, match=error):
        load(str(p), {})


def test_metrics_render() -> None:
    m = Metrics()
    m.inc("ipamd_allocations_total", 2, network="n1")
    m.observe("ipamd_probe_duration_ms", 7, kind="gateway", result="reachable")
    m.add_gauges(lambda: [("ipamd_pool_used", (("network", "n1"),), 3)])
    text = m.render()
    assert 'ipamd_allocations_total{network="n1"} 2' in text
    assert 'ipamd_probe_duration_ms_bucket{kind="gateway",result="reachable",le="10"} 1' in text
    assert 'ipamd_probe_duration_ms_bucket{kind="gateway",result="reachable",le="5"} 0' in text
    assert 'ipamd_pool_used{network="n1"} 3' in text


def test_cluster_config_keys_and_checks(tmp_path: Path) -> None:
    cfg = load(None, {})
    assert cfg.store == "sqlite" and cfg.node_name and cfg.etcd_prefix == "/ovs-underlay"
    cfg = load(None, {"store": "etcd", "etcd_endpoints": "http://127.0.0.1:2379, http://127.0.0.1:22379",
                      "etcd_prefix": "/x/y/", "node_name": "worker-1.example"})
    assert cfg.endpoints() == ("http://127.0.0.1:2379", "http://127.0.0.1:22379") and cfg.etcd_prefix == "/x/y"
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"store": "etcd", "etcdEndpoints": "https://e:2379", "etcdCACert": "/ca",
                             "etcdCert": "/c", "etcdKey": "/k", "nodeName": "n1", "blockSize": 64,
                             "outageReserve": 0}))
    cfg = load(str(f), {"node_name": "n2"})  # a flag wins over the file
    assert (cfg.node_name, cfg.block_size, cfg.outage_reserve, cfg.etcd_key) == ("n2", 64, 0, "/k")
    for overrides, msg in [
        ({"store": "etcd"}, "no etcd endpoints"),
        ({"store": "etcd", "etcd_endpoints": "127.0.0.1:2379"}, "expected http://HOST:PORT"),
        ({"store": "etcd", "etcd_endpoints": "http://e:2379", "etcd_cert": "/c"}, "go together"),
        ({"store": "etcd", "etcd_endpoints": "http://e:2379", "etcd_cacert": "/ca"}, "not https"),
        ({"etcd_endpoints": "http://e:2379"}, "store is sqlite"),
        ({"store": "zookeeper"}, "expected sqlite or etcd"),
        ({"node_name": "bad/name"}, "nodeName"),
        ({"etcd_prefix": "relative"}, "etcdPrefix"),
        ({"block_size": 0}, "blockSize"),
    ]:
        with pytest.raises(DaemonConfigError, match=msg):
            load(None, overrides)


@pytest.mark.parametrize("flag", ["probe_candidates", "outage_reserve", "metrics_port", "workers",
                                  "probe_fresh_seconds", "reconcile_grace_seconds"])
def test_negative_numbers_from_flags_are_refused_like_from_the_file(flag: str) -> None:
    """A flag is checked as the same key in the file is (a negative probeCandidates made every
    conflict-checked ADD fail inside ipamd)."""
    with pytest.raises(DaemonConfigError, match="must be >= 0"):
        load(None, {flag: -1})
