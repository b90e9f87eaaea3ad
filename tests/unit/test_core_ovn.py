"""The pure OVN builders (core/ovn.py): northbound rows and transactions, the chassis facts, the
ovn-installed wait, GC's choice of what to delete. No OVSDB: transactions are checked as data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from core.errors import Conflict, CoreError, NotOwned
from core.ovn import (
    Localnet,
    Lsp,
    LspSpec,
    NbFound,
    add_lsp_steps,
    delete_lsp_steps,
    gc_logical_ports,
    installed_steps,
    localnet_port_name,
    lsp_row,
    parse_bridge_mappings,
    parse_chassis,
    parse_node,
)
from core.ovsdb import Changed, Step

IDS = {"container_id": "c1", "ifname": "eth0", "node": "chassis-a", "network": "n1"}
SPEC = LspSpec(name="c1_eth0", switch="blue", mac="0A:58:0A:00:00:05", ips=("10.0.0.5", "fd00::5"), ids=IDS,
               chassis="chassis-a", switch_ids={"network": "n1", "topology": "layer2"})


def ops(steps: Sequence[Step]) -> list[tuple[str, str]]:
    return [(s.op["op"], s.op.get("table", "")) for s in steps]


def test_lsp_row_addresses_port_security_owner_and_chassis() -> None:
    row = lsp_row(SPEC)
    assert row["addresses"] == ["0a:58:0a:00:00:05 10.0.0.5 fd00::5"] == row["port_security"]
    assert row["external_ids"] == {**IDS, "owner": "ovs-underlay"}
    assert row["options"] == {"requested-chassis": "chassis-a"}
    open_port = lsp_row(LspSpec("p", "s", "0a:00:00:00:00:01", port_security=False))
    assert open_port["addresses"] == ["0a:00:00:00:00:01"] and open_port["port_security"] == []
    assert "options" not in open_port


def test_new_switch_with_localnet_port_in_one_transaction() -> None:
    spec = LspSpec(**{**SPEC.__dict__, "localnet": Localnet("physnet1", 100)})
    steps = add_lsp_steps(spec, NbFound())
    assert ops(steps) == [("comment", ""), ("wait", "Logical_Switch_Port"), ("insert", "Logical_Switch_Port"),
                          ("wait", "Logical_Switch_Port"), ("insert", "Logical_Switch_Port"),
                          ("wait", "Logical_Switch"), ("insert", "Logical_Switch")]
    ln = steps[4].op["row"]
    assert ln["name"] == localnet_port_name("blue") == "ln-blue" and ln["type"] == "localnet"
    assert ln["options"] == ["map", [["network_name", "physnet1"]]] and ln["tag_request"] == ["set", [100]]
    ls = steps[6].op["row"]
    assert ls["ports"] == ["set", [["named-uuid", "lsp"], ["named-uuid", "ln"]]]
    assert ["owner", "ovs-underlay"] in ls["external_ids"][1] and ["topology", "layer2"] in ls["external_ids"][1]
    # every guard aborts the transaction as "changed" (looked up again), not as a failure
    assert all(isinstance(s.error, Changed) for s in steps if s.op["op"] == "wait")


def test_existing_switch_gets_the_port_and_keeps_its_localnet_port() -> None:
    spec = LspSpec(**{**SPEC.__dict__, "localnet": Localnet("physnet1", 100)})
    ln = Lsp("u-ln", "ln-blue", {"owner": "ovs-underlay"}, "localnet", {"network_name": "physnet1"}, 100)
    steps = add_lsp_steps(spec, NbFound(switches=(("u-sw", {"owner": "ovs-underlay"}),), localnet=ln))
    assert ops(steps)[-2:] == [("wait", "Logical_Switch"), ("mutate", "Logical_Switch")]
    assert steps[-1].op["mutations"] == [["ports", "insert", ["set", [["named-uuid", "lsp"]]]]]
    assert steps[-1].count == 1


def test_our_switch_missing_its_localnet_port_gets_it() -> None:
    spec = LspSpec(**{**SPEC.__dict__, "localnet": Localnet("physnet1", None)})
    steps = add_lsp_steps(spec, NbFound(switches=(("u-sw", {"owner": "ovs-underlay"}),)))
    inserted = [s.op["row"]["name"] for s in steps if s.op["op"] == "insert"]
    assert inserted == ["c1_eth0", "ln-blue"]
    assert steps[-1].op["mutations"][0][2] == ["set", [["named-uuid", "lsp"], ["named-uuid", "ln"]]]


def test_a_foreign_switch_is_used_as_it_is() -> None:
    spec = LspSpec(**{**SPEC.__dict__, "localnet": Localnet("physnet1", 100)})
    steps = add_lsp_steps(spec, NbFound(switches=(("u-sw", {"owner": "neutron"}),)))
    assert [s.op["row"]["name"] for s in steps if s.op["op"] == "insert"] == ["c1_eth0"]


def test_localnet_port_that_disagrees_is_7() -> None:
    spec = LspSpec(**{**SPEC.__dict__, "localnet": Localnet("physnet1", 100)})
    ln = Lsp("u-ln", "ln-blue", {"owner": "ovs-underlay"}, "localnet", {"network_name": "physnet1"}, 200)
    with pytest.raises(Conflict) as e:
        add_lsp_steps(spec, NbFound(switches=(("u", {"owner": "ovs-underlay"}),), localnet=ln))
    assert "tag 200" in e.value.msg and "VLAN 100" in e.value.msg


def test_stale_port_of_this_attachment_is_replaced_in_the_same_transaction() -> None:
    stale = Lsp("u-old", "c1_eth0", {**IDS, "owner": "ovs-underlay", "pod_name": "old"})
    steps = add_lsp_steps(SPEC, NbFound(switches=(("u-sw", {}),), port=stale))
    assert ops(steps)[1:5] == [("wait", "Logical_Switch_Port"), ("mutate", "Logical_Switch"),
                               ("delete", "Logical_Switch_Port"), ("insert", "Logical_Switch_Port")]
    guard = steps[1].op
    assert guard["where"] == [["_uuid", "==", ["uuid", "u-old"]]] and guard["until"] == "=="


@pytest.mark.parametrize(("ids", "text"), [
    ({"owner": "neutron"}, "not owned by ovs-underlay"),
    ({**IDS, "owner": "ovs-underlay", "container_id": "c2"}, "another attachment"),
    ({**IDS, "owner": "ovs-underlay", "node": "chassis-b"}, "another attachment"),
])
def test_a_port_name_held_by_someone_else_is_never_touched(ids: Mapping[str, str], text: str) -> None:
    with pytest.raises(NotOwned) as e:
        add_lsp_steps(SPEC, NbFound(port=Lsp("u", "c1_eth0", ids)))
    assert text in e.value.msg


def test_two_switches_of_one_name_are_refused() -> None:
    with pytest.raises(Conflict) as e:
        add_lsp_steps(SPEC, NbFound(switches=(("a", {}), ("b", {}))))
    assert "2 logical switches are named 'blue'" in e.value.msg


def test_delete_only_ours_each_guarded() -> None:
    ours = Lsp("u1", "p1", {"owner": "ovs-underlay"})
    theirs = Lsp("u2", "p2", {"owner": "neutron"})
    steps = delete_lsp_steps([ours, theirs])
    assert ops(steps) == [("comment", ""), ("wait", "Logical_Switch_Port"), ("mutate", "Logical_Switch"),
                          ("delete", "Logical_Switch_Port")]
    assert steps[2].op["where"] == [["ports", "includes", ["set", [["uuid", "u1"]]]]]
    assert delete_lsp_steps([theirs]) == []


def test_chassis_facts_and_bridge_mappings() -> None:
    assert parse_bridge_mappings(" physnet1:br-ul , bad,physnet2:br-x:y,:br,p3: ") == \
        {"physnet1": "br-ul", "physnet2": "br-x:y"}
    row = {"rows": [{"external_ids": ["map", [["system-id", "ch1"], ["ovn-bridge-mappings", "p1:br-ul"],
                                              ["ovn-remote", "tcp:1.2.3.4:6642"]]]}]}
    ch = parse_chassis(row)
    assert (ch.system_id, ch.integration_bridge, ch.bridge_for("p1"), ch.bridge_for("p2")) == \
        ("ch1", "br-int", "br-ul", None)
    view = parse_node([row, {"rows": [{"name": "br-int", "datapath_type": "netdev"},
                                      {"name": "br-ul", "datapath_type": ""}]}])
    assert view.bridges == {"br-int": "netdev", "br-ul": "system"}
    assert parse_chassis({"rows": []}).system_id is None


def test_installed_wait_is_one_server_side_wait() -> None:
    late = CoreError("late")
    (step,) = installed_steps("ovu1", 1500, late)
    op = step.op
    assert op["op"] == "wait" and op["timeout"] == 1500 and op["until"] == "=="
    assert op["where"] == [["name", "==", "ovu1"], ["external_ids", "includes", ["map", [["ovn-installed", "true"]]]]]
    assert op["rows"] == [{"name": "ovu1"}] and step.error is late


class Store:
    def __init__(self, lsps: list[Lsp]) -> None:
        self.lsps = lsps
        self.asked: list[dict[str, str]] = []

    def find_lsps(self, want: Mapping[str, str]) -> list[Lsp]:
        self.asked.append(dict(want))
        return [x for x in self.lsps if all(x.ids.get(k) == v for k, v in want.items())]

    def delete_lsps(self, lsps: Sequence[Lsp]) -> None:
        gone = {x.uuid for x in lsps}
        self.lsps = [x for x in self.lsps if x.uuid not in gone]


def _ours(uuid: str, cid: str, node: str) -> Lsp:
    return Lsp(uuid, f"{cid}_eth0", {"owner": "ovs-underlay", "container_id": cid, "ifname": "eth0", "node": node,
                                     "network": "n1"})


def test_gc_keeps_valid_attachments_and_other_nodes() -> None:
    mk = _ours
    store = Store([mk("1", "live", "a"), mk("2", "stale", "a"), mk("3", "stale", "b")])
    removed = gc_logical_ports(store, node="a", keep=lambda c, i: (c, i) == ("live", "eth0"), network="n1")
    assert removed == ["stale_eth0"] and [x.uuid for x in store.lsps] == ["1", "3"]
    assert store.asked == [{"node": "a", "network": "n1"}]
