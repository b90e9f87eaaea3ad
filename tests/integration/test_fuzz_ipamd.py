"""Property-based fuzzing of ipamd's gRPC API against a real daemon (issue 11 item 24).

Random and mutated requests of every RPC go over the daemon's socket. Properties:
- the answer is never INTERNAL or UNKNOWN (an unexpected exception in the daemon): a request
  is either served or refused with a mapped status and a machine-readable reason;
- a refused request changes nothing: the store (read straight from its SQLite file, not through
  the daemon) is the same before and after.
Example counts are modest (CI budget: ~10 s); the daemon is one per module.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import wire
from core._proto import ipam_pb2 as pb
from core._proto import ipam_pb2_grpc
from core.spec import parse_ipam
from testbed import netbed

POOL = wire.pool_to_pb(parse_ipam({"subnets": [{"subnet": "10.88.0.0/24", "gateway": "10.88.0.1",
                                                 "exclude": ["10.88.0.200..10.88.0.250"]}, "fd88::/64"],
                                   "routes": [{"dst": "0.0.0.0/0"}]}).pool)
FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, Path]]:
    work = tmp_path_factory.mktemp("fuzz-ipamd")
    d = netbed.start_ipamd(str(work))
    try:
        fifo = work / "fifo"
        os.mkfifo(fifo)
        with grpc.insecure_channel(f"unix://{d.socket}") as ch:
            stub = ipam_pb2_grpc.IpamStub(ch)
            stub.Allocate(pb.AllocateRequest(network="fz", pool=POOL, container_id="seed", ifname="eth0"),
                          timeout=10)
            yield stub, str(fifo), Path(d.state_dir) / "ipam.db"
    finally:
        d.stop()


def snapshot(db: Path) -> tuple[list[Any], list[Any], list[Any]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return (c.execute("SELECT * FROM pools ORDER BY network").fetchall(),
                c.execute("SELECT network, ip, state, container_id, ifname FROM entries ORDER BY network, ip").fetchall(),
                c.execute("SELECT * FROM cursors ORDER BY network, subnet_index").fetchall())


def call(daemon: tuple[Any, str, Path], method: str, req: Any) -> None:
    stub, _, db = daemon
    before = snapshot(db)
    try:
        getattr(stub, method)(req, timeout=15)
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        reason = dict(err.trailing_metadata() or ()).get("ovs-underlay-reason")  # type: ignore[attr-defined]
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method, req, err.details())  # type: ignore[attr-defined]
        assert reason or code in (grpc.StatusCode.NOT_FOUND,), (method, code, req)
        assert snapshot(db) == before, f"{method} was refused ({code}) but changed the store: {req}"


NAME = st.sampled_from(["fz", "fz2", "", "a" * 254, "bad name", "../x", "n\n", "é"]) | st.text(max_size=20)
CID = st.sampled_from(["seed", "c1", "", "-x", "a" * 129, "a b", "x\n"]) | st.text(max_size=20)
IFNAME = st.sampled_from(["eth0", "net1", "", "all", "a" * 16, "a/b", "é" * 8, "net%d"]) | st.text(max_size=16)
TEXT = st.text(max_size=30)
IP = st.sampled_from(["10.88.0.5", "10.88.0.1", "10.88.0.201", "10.99.0.1", "fd88::5", "fd99::1", "", "x",
                      "10.88.0.5/24", "256.0.0.1", "::"]) | TEXT


@st.composite
def netns(draw: st.DrawFn, fifo: str) -> str:
    return draw(st.sampled_from(["", "relative", "/nonexistent/ns", "/proc/self/ns/net", "/proc/1/ns/net",
                                 "/dev/null", "/", fifo, "/proc/self/ns/mnt"]) | TEXT)


@st.composite
def pools(draw: st.DrawFn) -> pb.PoolSpec:
    """The valid pool with some fields replaced by junk (or a random one)."""
    p = pb.PoolSpec()
    p.CopyFrom(POOL)
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(["subnet", "gateway", "range_start", "range_end", "exclude", "route",
                                      "dns", "cooldown", "subnets"]))
        s = p.subnets[draw(st.integers(0, len(p.subnets) - 1))] if p.subnets else None
        if field == "subnets":
            del p.subnets[:]
        elif field == "exclude" and s is not None:
            s.exclude.append(draw(IP | st.sampled_from(["10.88.0.9..10.88.0.1", "10.0.0.0/8", "x-y"])))
        elif field == "route":
            p.routes.add(dst=draw(IP | st.sampled_from(["0.0.0.0/0", "::/0", "10.0.0.0/99"])), gw=draw(IP))
        elif field == "dns":
            p.dns.nameservers.append(draw(IP))
            p.dns.search.append(draw(TEXT))
        elif field == "cooldown":
            p.cooldown_s = draw(st.integers(0, 2**32 - 1))
        elif s is not None:
            setattr(s, field, draw(IP | st.sampled_from(["10.88.0.0/24", "10.88.0.0/99", "fd88::/200"])))
    return p


@FUZZ
@given(data=st.data())
def test_allocate(daemon: tuple[Any, str, Path], data: st.DataObject) -> None:
    req = pb.AllocateRequest(
        network=data.draw(NAME), pool=data.draw(pools()), container_id=data.draw(CID), ifname=data.draw(IFNAME),
        requested_ips=data.draw(st.lists(IP, max_size=3)), requested_mac=data.draw(
            st.sampled_from(["", "0a:58:0a:58:00:05", "01:00:5e:00:00:01", "zz", "00:00:00:00:00:00"]) | TEXT),
        netns=data.draw(netns(daemon[1])), conflict_check=data.draw(st.booleans()),
        conflict_check_wait_ms=data.draw(st.integers(0, 50)),
        pod=pb.PodRef(namespace=data.draw(TEXT), name=data.draw(TEXT), uid=data.draw(TEXT)))
    call(daemon, "Allocate", req)


@FUZZ
@given(data=st.data())
def test_release_get_lease_and_gc(daemon: tuple[Any, str, Path], data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(["Release", "GetLease", "GarbageCollect", "ListLeases", "ListPools"]))
    if method == "Release":
        req: Any = pb.ReleaseRequest(network=data.draw(NAME), container_id=data.draw(CID), ifname=data.draw(IFNAME))
    elif method == "GetLease":
        req = pb.GetLeaseRequest(network=data.draw(NAME), container_id=data.draw(CID), ifname=data.draw(IFNAME))
    elif method == "GarbageCollect":
        # never the seeded network with an empty keep-list (a valid request that empties it)
        valid = [pb.Attachment(container_id="seed", ifname="eth0")] + [
            pb.Attachment(container_id=data.draw(CID), ifname=data.draw(IFNAME))
            for _ in range(data.draw(st.integers(0, 2)))]
        req = pb.GcRequest(network=data.draw(NAME), valid=valid)
    elif method == "ListLeases":
        req = pb.ListLeasesRequest(network=data.draw(NAME), all=data.draw(st.booleans()))
    else:
        req = pb.ListPoolsRequest(network=data.draw(NAME))
    call(daemon, method, req)


@FUZZ
@given(data=st.data())
def test_probe_gateway(daemon: tuple[Any, str, Path], data: st.DataObject) -> None:
    req = pb.ProbeGatewayRequest(netns=data.draw(netns(daemon[1])), ifname=data.draw(IFNAME), gateway=data.draw(IP),
                                 sender_ip=data.draw(IP), timeout_ms=data.draw(st.integers(0, 100)),
                                 cache_key=data.draw(TEXT))
    call(daemon, "ProbeGateway", req)
