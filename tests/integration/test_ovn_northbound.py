"""core.ovn's northbound client against a real OVN_Northbound ovsdb-server (testbed/ovnbed.py):
concurrent ADDs create one switch, ownership is never overstepped, TLS and remote lists work.
Oracle: ovn-nbctl."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import plugin_helpers as ph
import pytest

from core.errors import CoreError, NotOwned, Unavailable
from core.ovn import Localnet, LspSpec, NbClient, gc_logical_ports
from core.ovnsettings import Northbound
from testbed import netbed, ovnbed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def central() -> Iterator[ovnbed.Central]:
    c = ovnbed.start_central(tls=True)
    yield c
    c.destroy()


def spec(name: str, switch: str, cid: str, node: str = "node-a", localnet: Localnet | None = None) -> LspSpec:
    return LspSpec(name=name, switch=switch, mac="0a:00:00:00:00:01", ips=("10.9.0.1",),
                   ids={"container_id": cid, "ifname": "eth0", "node": node, "network": "n"},
                   chassis=node, localnet=localnet, switch_ids={"network": "n", "topology": "localnet"})


def test_concurrent_adds_create_one_switch_and_one_localnet_port(central: ovnbed.Central) -> None:
    sw = netbed.uniq("ls", 40)
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            with NbClient(Northbound(central.nb)) as nb:
                nb.add_lsp(spec(f"{sw}-p{i}", sw, f"c{i}", localnet=Localnet("physnet1", 100)))
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(central.nb_rows("Logical_Switch", "name", where=(f"name={sw}",))) == 1
        assert sorted(central.switch_ports(sw)) == sorted([f"ln-{sw}", *(f"{sw}-p{i}" for i in range(6))])
        ln = central.lsp(f"ln-{sw}")
        assert ln is not None and ln["tag_request"] == 100 and ln["options"] == {"network_name": "physnet1"}
    finally:
        central.delete_switch(sw)


def test_ownership_replace_and_delete(central: ovnbed.Central) -> None:
    sw = netbed.uniq("ls", 40)
    central.nbctl("ls-add", sw, "--", "lsp-add", sw, f"{sw}-theirs")
    try:
        with NbClient(Northbound(central.nb)) as nb:
            with pytest.raises(NotOwned):
                nb.add_lsp(spec(f"{sw}-theirs", sw, "c1"))
            nb.add_lsp(spec(f"{sw}-mine", sw, "c1"))
            with pytest.raises(NotOwned, match="another attachment"):
                nb.add_lsp(spec(f"{sw}-mine", sw, "c2"))
            first = central.lsp(f"{sw}-mine")
            nb.add_lsp(spec(f"{sw}-mine", sw, "c1"))  # the same attachment again: replaced
            again = central.lsp(f"{sw}-mine")
            assert first is not None and again is not None and again["_uuid"] != first["_uuid"]
            assert sorted(central.switch_ports(sw)) == [f"{sw}-mine", f"{sw}-theirs"]
            nb.add_lsp(spec(f"{sw}-far", sw, "c3", node="node-b"))
            assert gc_logical_ports(nb, node="node-a", keep=lambda c, i: False) == [f"{sw}-mine"]
            assert sorted(central.switch_ports(sw)) == [f"{sw}-far", f"{sw}-theirs"]
            assert nb.delete_attachment({"container_id": "c3", "ifname": "eth0", "node": "node-b"}) == [f"{sw}-far"]
            assert nb.delete_attachment({"container_id": "c3", "ifname": "eth0"}) == []
            assert central.switch_ports(sw) == [f"{sw}-theirs"]
    finally:
        central.delete_switch(sw)


def test_tls_and_remote_lists(central: ovnbed.Central) -> None:
    """ssl: needs the right CA; a list of remotes skips the one that does not answer. The NB's
    ssl: listener is on the central's management bridge, so the client runs in that netns."""
    assert central.tls is not None
    probe = f"""
import sys
from core.ovn import NbClient
from core.ovnsettings import Northbound
from core.errors import Unavailable
nb = Northbound("{{remotes}}", "{central.tls.private_key}", "{central.tls.certificate}", "{{ca}}")
try:
    NbClient(nb, timeout_s=3).ping()
    print("ok")
except Unavailable as exc:
    print("unavailable:", exc.msg)
"""
    good = probe.replace("{remotes}", f"ssl:127.0.0.1:1,{central.nb_ssl}").replace("{ca}", central.tls.ca_cert)
    res = netbed.sh(ph.PYTHON, "-c", good, ns=central.netns.name, check=False)
    assert res.stdout.strip() == "ok", res.stderr
    wrong_ca = central.tls.private_key.replace("client-privkey.pem", "server-cert.pem")  # not a CA
    bad = probe.replace("{remotes}", central.nb_ssl).replace("{ca}", wrong_ca)
    res = netbed.sh(ph.PYTHON, "-c", bad, ns=central.netns.name, check=False)
    assert res.stdout.startswith("unavailable:"), (res.stdout, res.stderr)
    with pytest.raises(Unavailable):
        NbClient(Northbound("unix:/nonexistent/nb.sock"), timeout_s=2).ping()
    with pytest.raises(CoreError, match="cannot read"):
        NbClient(Northbound("ssl:127.0.0.1:1", "/nonexistent.pem", "/c.pem", "/ca.pem"))
