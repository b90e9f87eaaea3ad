"""The agent's file: Kube-OVN's names, JSON or YAML, resolved per node, bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from netaddr import IPAddress

from agent import cli
from agent.config import ConfigError, load, parse, parse_text

EXAMPLES = Path(__file__).resolve().parents[2] / "conf-examples"


def one(**kw: object) -> dict[str, object]:
    return {"providerNetworks": [{"name": "net1", "defaultInterface": "eth1", **kw}]}


def test_the_issue_example() -> None:
    cfg = parse([{"providerNetworks": [{
        "name": "net1", "defaultInterface": "eth1",
        "customInterfaces": [{"interface": "eth2", "nodes": ["node3"]}], "excludeNodes": ["node2"],
        "datapathType": "netdev", "mtu": 1500, "verify": {"gateway": "10.0.0.1", "timeoutMs": 2000}}]}])
    (n,) = cfg.networks
    assert n.bridge == "br-net1" and n.datapath_type == "netdev" and n.mtu == 1500
    assert n.verify.gateways == (IPAddress("10.0.0.1"),) and n.verify.timeout_ms == 2000
    assert n.interface_for("node1") == "eth1"
    assert n.interface_for("node3") == "eth2"
    assert n.interface_for("node2") is None
    nets, excluded = cfg.for_node("node2")
    assert nets == [] and excluded == ["net1"]
    nets, _ = cfg.for_node("node3")
    assert [(x.name, x.nic, x.bridge) for x in nets] == [("net1", "eth2", "br-net1")]


def test_kube_ovn_objects_as_they_are_yaml_and_list() -> None:
    text = """
apiVersion: kubeovn.io/v1
kind: ProviderNetwork
metadata: {name: net1}
spec: {defaultInterface: eth1, exchangeLinkName: false, autoCreateVlanSubinterfaces: false}
---
apiVersion: v1
kind: List
items:
  - apiVersion: kubeovn.io/v1
    kind: ProviderNetwork
    metadata: {name: net2}
    spec: {defaultInterface: eth2, vlanInterfaces: [eth2.100]}
"""
    cfg = parse_text(text)
    assert [(n.name, n.default_interface, n.vlan_interfaces) for n in cfg.networks] == [
        ("net1", "eth1", ()), ("net2", "eth2", ("eth2.100",))]


def test_shipped_example_parses(tmp_path: Path) -> None:
    cfg = load(EXAMPLES / "provider-networks.yaml")
    (n,) = cfg.networks
    assert n.name == "net1" and n.interface_for("worker-3") == "eno2" and n.interface_for("control-plane-1") is None
    assert n.verify.enabled and n.verify.gateways is None and n.datapath_type is None
    # The same in JSON, to the same result.
    doc = next(yaml.safe_load_all((EXAMPLES / "provider-networks.yaml").read_text()))
    (tmp_path / "pn.json").write_text(json.dumps(doc))
    assert load(tmp_path / "pn.json") == cfg


@pytest.mark.parametrize(("doc", "words"), [
    (one(name="a-name-too-long"), "name"),
    (one(name="Net1"), "lowercase"),
    (one(defaultInterface="eth0:1"), "defaultInterface"),
    (one(defaultInterface="x" * 16), "defaultInterface"),
    (one(datapathType="dpdk"), "datapathType"),
    (one(mtu=40), "mtu"),
    (one(mtu=True), "mtu"),
    (one(manage="yes"), "manage"),
    (one(verify={"gateway": "nope"}), "verify.gateway"),
    (one(verify={"timeoutMs": 10}), "timeoutMs"),
    (one(verify={"gateway": "10.0.0.1", "gateways": ["10.0.0.2"]}), "not both"),
    (one(customInterfaces=[{"interface": "eth2"}]), "nodes"),
    (one(customInterfaces=[{"interface": "eth2", "nodes": ["n"], "extra": 1}]), "customInterfaces[0]"),
    (one(excludeNodes="node2"), "excludeNodes"),
    (one(vlanInterfaces=["eth1.100", "eth1.100"]), "twice"),
    (one(exchangeLinkName=True), "exchangeLinkName"),
    (one(preserveVlanInterfaces=True), "preserveVlanInterfaces"),
    (one(nodeSelector={"matchLabels": {"a": "b"}}), "nodeSelector"),
    (one(defaultInterfce="eth1"), "unknown key"),
    ({"providerNetwork": []}, "unknown key"),
    ({"providerNetworks": [{"name": "n", "defaultInterface": "e"}, {"name": "n", "defaultInterface": "f"}]},
     "defined twice"),
    ({"kind": "Subnet"}, "not ProviderNetwork"),
    ({"kind": "ProviderNetwork", "metadata": {"name": "n"}, "spec": {"name": "x", "defaultInterface": "e"}},
     "metadata.name"),
])
def test_bad_files_name_the_key(doc: object, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(".", r"\.")):
        parse([doc])


def test_a_nic_in_two_networks_on_one_node() -> None:
    cfg = parse([{"providerNetworks": [{"name": "a", "defaultInterface": "eth1"},
                                       {"name": "b", "defaultInterface": "eth2",
                                        "customInterfaces": [{"interface": "eth1", "nodes": ["n1"]}]}]}])
    cfg.for_node("n2")  # fine elsewhere
    with pytest.raises(ConfigError, match="eth1 is claimed by provider networks a and b"):
        cfg.for_node("n1")


def test_invalid_json_and_yaml_are_named(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"providerNetworks": [')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load(tmp_path / "a.json")
    (tmp_path / "b.yaml").write_text("providerNetworks: [\n  - {name: x")
    with pytest.raises(ConfigError, match="neither JSON nor YAML"):
        load(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yaml")


def test_help_names_every_command_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("apply", "status", "remove", "serve", "--config", "--node-name", "--ovsdb", "--state-dir",
                 "--host-run", "Exit codes"):
        assert word in out
    with pytest.raises(SystemExit):
        cli.main(["apply", "--help"])
    assert "--dry-run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    assert "--check" in capsys.readouterr().out


def test_cli_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pn.json").write_text(json.dumps(one(mtu=1)))
    rc = cli.main(["--config", str(tmp_path / "pn.json"), "--state-dir", str(tmp_path / "s"), "apply"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mtu" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()
