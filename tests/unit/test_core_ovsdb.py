"""core/ovsdb.py and core/vswitch.py without OVS: RFC 7047 value codecs, the transaction builders
(intent -> ops), reply checking (every error shape raises a neutral core error), and the
JSON-RPC client against a scripted unix socket (echo, deadline, unreachable, the database as a
parameter)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import CoreError, Missing, NotOwned, Unavailable
from core.names import OWNER
from core.ovsdb import (
    Changed,
    MalformedReply,
    NamedUuid,
    OvsdbClient,
    Step,
    TxnFailed,
    Uuid,
    check_reply,
    map_of,
    op_select,
    optional,
    set_of,
    to_datum,
)
from core.vswitch import (
    Found,
    PortSpec,
    Vswitch,
    add_port_steps,
    delete_steps,
    ofport_steps,
    parse_lookup,
    port_info,
    set_ids_steps,
)

P1, I1, B1 = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222", "b"
OURS = {"owner": OWNER, "container_id": "c1", "ifname": "eth0"}


def spec(**kw: Any) -> PortSpec:
    base: dict[str, Any] = {"name": "ovu1", "bridge": "br0", "tag": 100, "iface_ids": OURS, "port_ids": OURS}
    return PortSpec(**{**base, **kw})


def ops(steps: list[Step]) -> list[dict[str, Any]]:
    return [s.op for s in steps]


def by_op(steps: list[Step], op: str, table: str | None = None) -> list[dict[str, Any]]:
    return [s.op for s in steps if s.op["op"] == op and (table is None or s.op.get("table") == table)]


# ---------------------------------------------------------------------------------------------
# values


def test_to_datum_encodes_maps_sets_refs() -> None:
    assert to_datum({"b": "2", "a": "1"}) == ["map", [["a", "1"], ["b", "2"]]]
    assert to_datum([5, 7]) == ["set", [5, 7]]
    assert to_datum([]) == ["set", []]
    assert to_datum(Uuid(P1)) == ["uuid", P1]
    assert to_datum([NamedUuid("port")]) == ["set", [["named-uuid", "port"]]]
    assert to_datum("x") == "x" and to_datum(3) == 3


def test_decoders_accept_bare_single_element_sets() -> None:
    assert set_of(["set", [1, 2]]) == [1, 2]
    assert set_of(5) == [5]  # RFC 7047: a one-element set may be the bare atom
    assert set_of(["uuid", P1]) == [P1] and isinstance(set_of(["uuid", P1])[0], Uuid)
    assert optional(["set", []]) is None and optional(7) == 7 and optional("access") == "access"
    assert map_of(["map", [["owner", OWNER]]]) == {"owner": OWNER}


@pytest.mark.parametrize("bad", [{"a": 1}, ["set", [1]], ["map", [["k"]]], "x"])
def test_map_of_rejects_malformed(bad: Any) -> None:
    with pytest.raises(MalformedReply):
        map_of(bad)


def test_set_of_rejects_unknown_atom() -> None:
    with pytest.raises(MalformedReply):
        set_of(["set", [["bogus", 1]]])


# ---------------------------------------------------------------------------------------------
# add_port


def test_add_port_fresh_is_one_guarded_transaction() -> None:
    steps = add_port_steps(spec(ofport_request=9), Found("ovu1"))
    kinds = [(o["op"], o.get("table")) for o in ops(steps)]
    assert kinds == [("comment", None), ("wait", "Bridge"), ("wait", "Port"), ("wait", "Interface"),
                     ("insert", "Interface"), ("insert", "Port"), ("mutate", "Bridge")]
    bridge_guard = steps[1]
    assert bridge_guard.op["where"] == [["name", "==", "br0"]] and bridge_guard.op["until"] == "=="
    assert bridge_guard.op["rows"] == [{"name": "br0"}] and bridge_guard.op["timeout"] == 0
    assert isinstance(bridge_guard.error, Missing) and "br0" in bridge_guard.error.msg
    for g in steps[2:4]:  # nothing of that name may appear meanwhile
        assert g.op["rows"] == [] and g.op["where"] == [["name", "==", "ovu1"]] and isinstance(g.error, Changed)
    iface, port, attach = steps[4], steps[5], steps[6]
    assert iface.op["uuid-name"] == "iface" and iface.op["row"] == {
        "name": "ovu1", "type": "", "external_ids": to_datum(OURS),
        "ofport_request": ["set", [9]]}
    assert port.op["uuid-name"] == "port" and port.op["row"] == {
        "name": "ovu1", "external_ids": to_datum(OURS), "tag": ["set", [100]], "trunks": ["set", []],
        "vlan_mode": ["set", ["access"]], "interfaces": ["set", [["named-uuid", "iface"]]]}
    assert attach.op["where"] == [["name", "==", "br0"]]
    assert attach.op["mutations"] == [["ports", "insert", ["set", [["named-uuid", "port"]]]]]
    assert attach.count == 1
    json.dumps(ops(steps))  # plain JSON


@pytest.mark.parametrize(("tag", "trunks", "mode"), [(None, (7, 5, 5), "trunk"), (100, (5,), "native-untagged"),
                                                     (None, (), None)])
def test_add_port_vlan_columns(tag: int | None, trunks: tuple[int, ...], mode: str | None) -> None:
    (port,) = by_op(add_port_steps(spec(tag=tag, trunks=trunks), Found("ovu1")), "insert", "Port")
    assert port["row"]["trunks"] == ["set", sorted(set(trunks))]
    assert port["row"]["tag"] == ["set", [tag] if tag is not None else []]
    assert port["row"]["vlan_mode"] == ["set", [mode] if mode else []]


def test_add_port_replaces_stale_port_of_ours_in_the_same_transaction() -> None:
    stale = Found("ovu1", port=P1, port_ids=OURS, port_ifaces=(I1,), iface=I1, iface_ids=OURS)
    steps = add_port_steps(spec(), stale)
    guards = by_op(steps, "wait")
    assert guards[1]["rows"] == [{"_uuid": ["uuid", P1]}] and guards[2]["rows"] == [{"_uuid": ["uuid", I1]}]
    detach = by_op(steps, "mutate", "Bridge")[0]
    assert detach["where"] == [["ports", "includes", ["set", [["uuid", P1]]]]]
    assert detach["mutations"] == [["ports", "delete", ["set", [["uuid", P1]]]]]
    assert by_op(steps, "delete", "Port") == [{"op": "delete", "table": "Port", "where": [["_uuid", "==", ["uuid", P1]]]}]
    assert by_op(steps, "delete", "Interface")[0]["where"] == [["_uuid", "==", ["uuid", I1]]]
    assert all(s.count == 1 for s in steps if s.op["op"] in ("delete", "mutate"))
    # the removal comes before the inserts (unique name index is checked at commit)
    kinds = [o["op"] for o in ops(steps)]
    assert kinds.index("delete") < kinds.index("insert")


def test_add_port_stale_owned_through_interface_only() -> None:
    stale = Found("ovu1", port=P1, port_ids={}, port_ifaces=(I1,), iface=I1, iface_ids=OURS)
    assert stale.ours and by_op(add_port_steps(spec(), stale), "delete", "Port")


@pytest.mark.parametrize("owner", [{"owner": "someone-else"}, {}])
def test_add_port_refuses_a_port_it_does_not_own(owner: dict[str, str]) -> None:
    foreign = Found("ovu1", port=P1, port_ids=owner, port_ifaces=(I1,), iface=I1, iface_ids=owner)
    with pytest.raises(NotOwned) as e:
        add_port_steps(spec(), foreign)
    assert "not owned by ovs-underlay" in e.value.msg


def test_add_port_refuses_an_interface_of_that_name_in_another_port() -> None:
    # our ids on an Interface that sits in some other Port do not make the name ours
    stray = Found("ovu1", port=None, iface=I1, iface_ids=OURS)
    with pytest.raises(NotOwned, match="exists in another port"):
        add_port_steps(spec(), stray)
    other = Found("ovu1", port=P1, port_ids={}, port_ifaces=("33333333-3333-3333-3333-333333333333",),
                  iface=I1, iface_ids=OURS)
    assert not other.ours
    with pytest.raises(NotOwned, match="not owned"):
        add_port_steps(spec(), other)


def test_ofport_wait_holds_until_ofport_is_set() -> None:
    wait, read = ofport_steps("ovu1", 1500)
    assert wait.op == {"op": "wait", "table": "Interface", "where": [["name", "==", "ovu1"]], "columns": ["ofport"],
                       "until": "!=", "rows": [{"ofport": ["set", []]}], "timeout": 1500}
    assert isinstance(wait.error, Unavailable) and "1500 ms" in wait.error.msg
    assert read.op["op"] == "select" and read.op["columns"] == ["ofport", "error"]


# ---------------------------------------------------------------------------------------------
# delete / set ids / lookups


def test_delete_only_ours_each_guarded_by_ownership() -> None:
    ours = Found("a", port=P1, port_ids=OURS, port_ifaces=(I1,), iface=I1, iface_ids=OURS)
    foreign = Found("b", port="44444444-4444-4444-4444-444444444444", port_ids={"owner": "x"})
    missing = Found("c")
    steps = delete_steps([ours, foreign, missing])
    assert steps[0].op["op"] == "comment" and "a" in steps[0].op["comment"]
    guard = steps[1]
    assert guard.op["table"] == "Port" and guard.op["where"] == [
        ["_uuid", "==", ["uuid", P1]], ["external_ids", "includes", ["map", [["owner", OWNER]]]]]
    assert guard.op["rows"] == [{"_uuid": ["uuid", P1]}] and isinstance(guard.error, Changed)
    assert [(s.op["op"], s.op["table"], s.count) for s in steps[2:]] == [
        ("mutate", "Bridge", 1), ("delete", "Port", 1), ("delete", "Interface", 1)]
    assert "44444444" not in json.dumps(ops(steps))
    assert delete_steps([foreign, missing]) == []


def test_delete_guard_uses_the_interface_when_it_carries_the_owner() -> None:
    f = Found("a", port=P1, port_ids={}, port_ifaces=(I1,), iface=I1, iface_ids=OURS)
    guard = delete_steps([f])[1]
    assert guard.op["table"] == "Interface" and guard.op["where"][0] == ["_uuid", "==", ["uuid", I1]]


def test_set_ids_merges_keys_only_on_our_interface() -> None:
    (s,) = set_ids_steps("ovu1", {"ip_addresses": "10.0.0.5", "attached_mac": "0a:58:00:00:00:01"})
    assert s.op["where"] == [["name", "==", "ovu1"], ["external_ids", "includes", ["map", [["owner", OWNER]]]]]
    assert s.op["mutations"] == [
        ["external_ids", "delete", ["set", ["attached_mac", "ip_addresses"]]],
        ["external_ids", "insert", ["map", [["attached_mac", "0a:58:00:00:00:01"], ["ip_addresses", "10.0.0.5"]]]]]


def test_parse_lookup_and_port_info() -> None:
    results: list[dict[str, Any]] = [{"rows": [{"_uuid": ["uuid", P1], "external_ids": ["map", [["owner", OWNER]]],
                          "interfaces": ["uuid", I1]}]},
               {"rows": [{"_uuid": ["uuid", I1], "external_ids": ["map", []]}]},
               {"rows": []}, {"rows": []}]
    a, b = parse_lookup(["a", "b"], results)
    assert a == Found("a", port=P1, port_ids={"owner": OWNER}, port_ifaces=(I1,), iface=I1, iface_ids={})
    assert a.ours and not a.stray_iface and b == Found("b") and not b.ours
    row = {"_uuid": ["uuid", P1], "name": "ovu1", "interfaces": ["uuid", I1], "tag": 100, "trunks": 7,
           "vlan_mode": "native-untagged", "external_ids": ["map", [["owner", OWNER]]]}
    iface = {"_uuid": ["uuid", I1], "external_ids": ["map", [["ifname", "eth0"]]], "ofport": 3}
    info = port_info(row, "br0", iface)
    assert (info.name, info.bridge, info.tag, info.trunks, info.vlan_mode, info.ofport) == (
        "ovu1", "br0", 100, (7,), "native-untagged", 3)
    assert info.port_ids == {"owner": OWNER} and info.iface_ids == {"ifname": "eth0"}
    empty = port_info({**row, "tag": ["set", []], "trunks": ["set", []], "vlan_mode": ["set", []]}, None, None)
    assert (empty.tag, empty.trunks, empty.vlan_mode, empty.ofport, empty.iface_ids) == (None, (), None, None, {})


# ---------------------------------------------------------------------------------------------
# check_reply: every error shape raises


STEPS = [Step(op_select("Bridge", [], ["name"]), "read bridge"),
         Step({"op": "mutate", "table": "Bridge", "where": [], "mutations": []}, "attach port", count=1)]


def test_check_reply_returns_results() -> None:
    assert check_reply(STEPS, [{"rows": []}, {"count": 1}]) == [{"rows": []}, {"count": 1}]


def test_check_reply_op_error_names_the_op() -> None:
    with pytest.raises(TxnFailed) as e:
        check_reply(STEPS, [{"rows": []}, {"error": "constraint violation", "details": "bad tag"}])
    assert e.value.index == 1 and e.value.error == "constraint violation" and type(e.value) is TxnFailed
    assert "mutate Bridge (attach port) failed: constraint violation: bad tag" in e.value.msg


def test_check_reply_op_error_after_nulls_and_step_error() -> None:
    mine = Missing("OVS bridge 'x' does not exist")
    steps = [Step({"op": "wait", "table": "Bridge"}, "bridge exists", error=mine), *STEPS]
    with pytest.raises(Missing) as e:
        check_reply(steps, [{"error": "timed out"}, None, None])
    assert e.value is mine


def test_check_reply_trailing_commit_error() -> None:
    with pytest.raises(TxnFailed) as e:
        check_reply(STEPS, [{"rows": []}, {"count": 1},
                            {"error": "referential integrity violation", "details": "cannot delete Port row"}])
    assert e.value.index == 2 and "failed at commit: referential integrity violation" in e.value.msg
    assert "attach port" in e.value.msg


def test_check_reply_wrong_count() -> None:
    with pytest.raises(TxnFailed, match=r"changed 0 row\(s\), expected 1"):
        check_reply(STEPS, [{"rows": []}, {"count": 0}])


@pytest.mark.parametrize("result", [None, {"rows": []}, [{"rows": []}], [{"rows": []}, None], [{"rows": []}, 3]])
def test_check_reply_malformed(result: Any) -> None:
    with pytest.raises(MalformedReply):
        check_reply(STEPS, result)


# ---------------------------------------------------------------------------------------------
# JSON-RPC client against a scripted server


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket, dict[str, Any]], None]], str]]:
    """A unix socket that hands each decoded request to `handler(conn, request)`."""
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def start(handler: Callable[[socket.socket, dict[str, Any]], None]) -> str:
        path = str(tmp_path / f"db{len(socks)}.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        socks.append(srv)

        def serve() -> None:
            conn, _ = srv.accept()
            socks.append(conn)
            buf, dec = "", json.JSONDecoder()
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:  # the fixture closed the connection at the test's end
                    return
                if not data:
                    return
                buf += data.decode()
                while buf:
                    try:
                        req, end = dec.raw_decode(buf)
                    except ValueError:
                        break
                    buf = buf[end:]
                    handler(conn, req)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return "unix:" + path

    yield start
    for s in socks:
        s.close()


def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
    conn.sendall(json.dumps(msg).encode())


def test_client_answers_echo_and_checks_the_reply(fake_server: Any) -> None:
    seen: list[dict[str, Any]] = []

    def handler(conn: socket.socket, req: dict[str, Any]) -> None:
        seen.append(req)
        if req.get("method") == "transact":
            _send(conn, {"method": "echo", "params": ["x"], "id": "echo-1"})
            _send(conn, {"id": req["id"], "error": None,
                         "result": [{"rows": [{"datapath_type": "netdev", "external_ids": ["map", []]}]}]})

    c = Vswitch(fake_server(handler), timeout_s=5)
    try:
        assert c.bridge_datapath("br0") == "netdev"
        assert c.bridge_datapath("br1") == "netdev"  # same connection
    finally:
        c.close()
    transacts = [r for r in seen if r.get("method") == "transact"]
    assert transacts[0]["params"] == ["Open_vSwitch", {"op": "select", "table": "Bridge",
                                                       "where": [["name", "==", "br0"]],
                                                       "columns": ["datapath_type", "external_ids"]}]
    assert {"id": "echo-1", "result": ["x"], "error": None} in seen


def test_client_deadline_is_try_again_later(fake_server: Any) -> None:
    c = Vswitch(fake_server(lambda conn, req: None), timeout_s=0.3)
    with pytest.raises(Unavailable) as e:
        c.bridge_datapath("br0")
    c.close()
    assert "no reply within 0.3 s" in e.value.msg


def test_client_jsonrpc_error_and_closed_connection(fake_server: Any) -> None:
    def handler(conn: socket.socket, req: dict[str, Any]) -> None:
        if req["params"][1]["where"][0][2] == "err":
            _send(conn, {"id": req["id"], "result": None, "error": "unknown database"})
        else:
            conn.shutdown(socket.SHUT_RDWR)

    c = Vswitch(fake_server(handler), timeout_s=5)
    with pytest.raises(CoreError, match="unknown database") as err:
        c.bridge_datapath("err")
    assert type(err.value) is CoreError  # not retryable
    with pytest.raises(Unavailable) as e:
        c.bridge_datapath("eof")
    c.close()
    assert "unreachable" in e.value.msg


def test_client_unreachable_is_unavailable(tmp_path: Path) -> None:
    c = Vswitch(f"unix:{tmp_path}/nothing.sock", timeout_s=1)
    with pytest.raises(Unavailable) as e:
        c.get_port("x")
    assert e.value.msg.startswith(f"OVSDB at unix:{tmp_path}/nothing.sock is unreachable")


def test_client_database_is_a_parameter(fake_server: Any) -> None:
    """The same client speaks to OVN_Northbound (or any database): the name goes in every
    transact, and nothing Open_vSwitch-specific is sent."""
    seen: list[dict[str, Any]] = []

    def handler(conn: socket.socket, req: dict[str, Any]) -> None:
        seen.append(req)
        _send(conn, {"id": req["id"], "error": None, "result": [{"rows": [{"name": "ls1"}]}]})

    c = OvsdbClient(fake_server(handler), "OVN_Northbound", timeout_s=5)
    try:
        (r,) = c.transact([Step(op_select("Logical_Switch", [["name", "==", "ls1"]], ["name"]), "read switch")])
    finally:
        c.close()
    assert r == {"rows": [{"name": "ls1"}]}
    assert seen[0]["method"] == "transact" and seen[0]["params"][0] == "OVN_Northbound"
    assert seen[0]["params"][1]["table"] == "Logical_Switch"
