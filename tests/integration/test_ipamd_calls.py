"""ipamd's call socket (core/calls.py, ipamd/calls_server.py) against the real daemon: it is
root-only next to the gRPC socket, answers the hot calls exactly as gRPC does (results and
errors), a client never loads gRPC for them, and without it the client falls back to gRPC."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from netaddr import IPAddress

from core import calls
from core.errors import IpamdRefused
from core.ipamd_client import IpamClient
from core.spec import parse_ipam
from core.wire import Reason
from testbed import netbed

POOL = parse_ipam({"subnets": [{"subnet": "10.61.0.0/24", "gateway": "10.61.0.1"}]}).pool


def test_the_call_socket_is_root_only_next_to_the_grpc_one(ipamd: netbed.Ipamd) -> None:
    st = os.stat(calls.socket_path(ipamd.socket))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0


@pytest.mark.parametrize("via", ["calls", "grpc"])
def test_both_ways_answer_alike(ipamd: netbed.Ipamd, via: str) -> None:
    with IpamClient(ipamd.socket) as c:
        if via == "grpc":
            c._no_calls = True  # what the client does when the call socket is not there
        net = f"calls-{via}"
        a = c.allocate(network=net, pool=POOL, container_id="c1", ifname="eth0")
        assert [str(i.address) for i in a.ips] == ["10.61.0.2/24"]
        again = c.allocate(network=net, pool=POOL, container_id="c1", ifname="eth0")
        assert again.ips == a.ips  # idempotent
        got = c.get_lease(network=net, container_id="c1", ifname="eth0")
        assert got is not None and got.ips == a.ips
        assert c.get_lease(network=net, container_id="nobody", ifname="eth0") is None
        with pytest.raises(IpamdRefused) as ei:
            c.allocate(network=net, pool=POOL, container_id="c2", ifname="eth0",
                       requested_ips=(IPAddress("10.99.0.5"),))
        assert ei.value.reason == Reason.ADDRESS_OUT_OF_POOL and "10.99.0.5" in ei.value.msg
        pending = c.start_allocate(network=net, pool=POOL, container_id="c3", ifname="eth0")
        assert [str(i.address) for i in pending.result().ips] == ["10.61.0.3/24"]
        assert [lease.container_id for lease in c.release(network=net, container_id="c1", ifname="eth0")] == ["c1"]
        assert c.release(network=net, container_id="c1", ifname="eth0") == []
        assert c._channel is None if via == "calls" else c._channel is not None
    rows = [(r["ip"], r["containerID"]) for r in ipamd.leases(net)]
    assert rows == [("10.61.0.3", "c3")]


def test_a_plugin_call_never_loads_grpc(ipamd: netbed.Ipamd) -> None:
    code = (
        "import json, sys\n"
        "from core.ipamd_client import IpamClient\n"
        "from core.spec import parse_ipam\n"
        "pool = parse_ipam({'subnets': [{'subnet': '10.62.0.0/24'}]}).pool\n"
        f"with IpamClient({ipamd.socket!r}) as c:\n"
        "    a = c.allocate(network='nogrpc', pool=pool, container_id='c1', ifname='eth0')\n"
        "print(json.dumps({'ip': str(a.ips[0].address), 'grpc': sorted(m for m in sys.modules if m.startswith('grpc'))}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=netbed.ROOT, check=False)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out == {"ip": "10.62.0.1/24", "grpc": []}


def test_without_the_call_socket_the_client_uses_grpc(ipamd: netbed.Ipamd) -> None:
    os.unlink(calls.socket_path(ipamd.socket))  # an ipamd that has none
    with IpamClient(ipamd.socket) as c:
        a = c.allocate(network="fallback", pool=POOL, container_id="c1", ifname="eth0")
        assert c._no_calls and c._channel is not None
    assert [str(i.address) for i in a.ips] == ["10.61.0.2/24"]
