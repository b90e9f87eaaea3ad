"""The real daemon as a process over its socket: permissions, concurrency, crash safety,
lifecycle, CLI contract and error statuses. Oracles: the CLI's JSON, `stat`, raw gRPC status."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import plugin_helpers as ph
import pytest
from netaddr import IPAddress

from core._proto import ipam_pb2 as pb
from core._proto import ipam_pb2_grpc
from core.errors import CoreError, IpamdRefused, Unavailable
from core.ipamd_client import IpamClient
from core.spec import PoolDef, parse_ipam
from testbed import netbed

POOL = parse_ipam({"subnets": [{"subnet": "10.20.0.0/22", "gateway": "10.20.0.1"},
                               {"subnet": "fd20::/64", "gateway": "fd20::1"}],
                   "routes": [{"dst": "0.0.0.0/0"}]}).pool


BIG = parse_ipam({"subnets": [{"subnet": "10.40.0.0/16", "gateway": "10.40.0.1"},
                              {"subnet": "fd40::/64", "gateway": "fd40::1"}]}).pool


def test_socket_is_root_only_and_health(ipamd: netbed.Ipamd) -> None:
    st = os.stat(ipamd.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert ipamd.cli("health").stdout.strip() == "SERVING"


def test_16_concurrent_clients_no_duplicates(ipamd: netbed.Ipamd) -> None:
    held: dict[tuple[str, str], list[str]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            with IpamClient(ipamd.socket) as c:
                for i in range(25):
                    cid = netbed.container_id(f"w{w}i{i}")
                    a = c.allocate(network="conc", pool=POOL, container_id=cid, ifname="eth0")
                    with lock:
                        held[(cid, "eth0")] = [str(x.address.ip) for x in a.ips]
                    if i % 3 == 0:
                        assert sum(len(x.ips) for x in c.release(network="conc", container_id=cid, ifname="eth0")) == 2
                        with lock:
                            del held[(cid, "eth0")]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = ipamd.leases("conc")
    ips = [r["ip"] for r in rows]
    assert len(ips) == len(set(ips)) == 2 * len(held)
    assert {(r["containerID"], r["ifname"]) for r in rows} == set(held)
    assert sorted(ips) == sorted(ip for v in held.values() for ip in v)


def test_kill9_during_16_client_burst_loses_nothing(ipamd: netbed.Ipamd) -> None:
    """Group commit keeps durability: kill -9 in the middle of a 16-client allocate/release burst;
    every lease whose Allocate returned is there after restart (with the same addresses), every
    attachment whose Release returned is gone, and no address was ever granted twice."""
    leases: dict[str, list[str]] = {}  # every Allocate that returned
    granted: dict[str, list[str]] = {}  # Allocate returned; no Release sent
    releasing: set[str] = set()  # Release sent, no answer (yet): either outcome is correct
    released: set[str] = set()  # Release returned
    every_grant: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(w: int) -> None:
        with IpamClient(ipamd.socket, timeout_ms=3000) as c:
            i = 0
            while not stop.is_set():
                cid = netbed.container_id(f"k{w}i{i}")
                i += 1
                try:
                    a = c.allocate(network="crash", pool=BIG, container_id=cid, ifname="eth0")
                except CoreError:
                    return  # the daemon died under us
                with lock:
                    leases[cid] = granted[cid] = [str(x.address.ip) for x in a.ips]
                    every_grant.extend(granted[cid])
                if i % 4:
                    continue
                with lock:
                    releasing.add(cid)
                    del granted[cid]
                try:
                    c.release(network="crash", container_id=cid, ifname="eth0")
                except CoreError:
                    return
                with lock:
                    releasing.discard(cid)
                    released.add(cid)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(every_grant) < 2 * 600 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ipamd.proc is not None
    ipamd.proc.send_signal(signal.SIGKILL)  # mid-burst: 16 clients are still sending
    ipamd.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    assert len(granted) + len(released) >= 300, "the burst was too small to prove anything"
    assert released, "no release returned before the kill"
    assert os.path.exists(ipamd.socket)  # the stale socket file is left behind
    ipamd.start()  # serve must start over the stale socket
    rows = ipamd.leases("crash")
    by_cid: dict[str, list[str]] = {}
    for r in rows:
        by_cid.setdefault(r["containerID"], []).append(r["ip"])
    for cid, ips in granted.items():
        assert sorted(by_cid.get(cid, [])) == sorted(ips), f"granted lease of {cid} lost"
    for cid in releasing:  # in flight at the kill: released, or still held as granted
        assert sorted(by_cid.get(cid, leases[cid])) == sorted(leases[cid])
    assert not released & by_cid.keys(), "a returned release was undone"
    assert len(every_grant) == len(set(every_grant)), "an address was granted twice"
    ips = [r["ip"] for r in rows]
    assert len(ips) == len(set(ips))
    # and the restarted daemon never hands out a granted address again
    with IpamClient(ipamd.socket) as c:
        for i in range(30):
            a = c.allocate(network="crash", pool=BIG, container_id=netbed.container_id(f"after{i}"), ifname="eth0")
            assert not {str(x.address.ip) for x in a.ips} & set(every_grant)


def test_second_daemon_refuses_and_sigterm_is_clean(ipamd: netbed.Ipamd, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    res = subprocess.run([sys.executable, "-m", "ipamd", "serve", "--socket", ipamd.socket,
                          "--state-dir", str(other)], capture_output=True, text=True, timeout=30,
                         cwd=netbed.ROOT)
    assert res.returncode == 1 and "refusing to start" in res.stderr and "Traceback" not in res.stderr
    assert ipamd.cli("health").returncode == 0  # the first one is untouched
    assert ipamd.proc is not None
    proc = ipamd.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert not os.path.exists(ipamd.socket)
    assert "store closed" in ipamd.log()
    ipamd.proc = None


def test_stale_regular_file_is_not_replaced(ipamd_factory: Callable[..., netbed.Ipamd], tmp_path: Path) -> None:
    sock = tmp_path / "notasocket"
    sock.write_text("x")
    res = subprocess.run([sys.executable, "-m", "ipamd", "serve", "--socket", str(sock), "--state-dir",
                          str(tmp_path / "st")], capture_output=True, text=True, timeout=30, cwd=netbed.ROOT)
    assert res.returncode == 1 and "is not a socket" in res.stderr
    assert sock.read_text() == "x"


def test_cli_json_shapes(ipamd: netbed.Ipamd) -> None:
    cid = netbed.container_id("cli")
    with IpamClient(ipamd.socket) as c:
        c.allocate(network="clinet", pool=POOL, container_id=cid, ifname="net1")
    pools = [p for p in ipamd.pools() if p["network"] == "clinet"]
    assert [(p["subnet"], p["used"], p["total"]) for p in pools] == [
        ("10.20.0.0/22", 1, 1021), ("fd20::/64", 1, 2**64 - 2)]
    assert all(isinstance(p["used"], int) and isinstance(p["total"], int) for p in pools)
    rows = ipamd.leases("clinet")
    assert [(r["network"], r["ip"], r["containerID"], r["ifname"], r["state"]) for r in rows] == [
        ("clinet", "10.20.0.2", cid, "net1", "active"), ("clinet", "fd20::2", cid, "net1", "active")]
    out = ipamd.cli("release", "--container", cid, "--ifname", "net1", "-o", "json").stdout
    assert len(json.loads(out)) == 2
    assert ipamd.leases("clinet") == []
    assert {r["state"] for r in ipamd.leases("clinet", all=True)} == {"released"}
    table = ipamd.cli("pools").stdout
    assert "NETWORK" in table and "clinet" in table
    bad = ipamd.cli("release", "--container", cid, check=False)
    assert bad.returncode == 2 and "--ifname" in bad.stderr
    gone = subprocess.run([sys.executable, "-m", "ipamd", "leases", "--socket", "/run/nonexistent-ou.sock"],
                          capture_output=True, text=True, timeout=30, cwd=netbed.ROOT)
    assert gone.returncode == 1 and "unreachable" in gone.stderr and "Traceback" not in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1


def test_gc_cli_keeps_only_listed(ipamd: netbed.Ipamd) -> None:
    keep, drop = netbed.container_id("keep"), netbed.container_id("drop")
    with IpamClient(ipamd.socket) as c:
        for cid in (keep, drop):
            c.allocate(network="gcnet", pool=POOL, container_id=cid, ifname="eth0")
        assert [(x.container_id, x.ifname) for x in c.gc(network="gcnet", valid=[(keep, "eth0")])] == [(drop, "eth0")]
    assert {r["containerID"] for r in ipamd.leases("gcnet")} == {keep}
    assert ipamd.cli("gc", "--network", "gcnet", check=False).returncode == 2  # needs --keep or --release-all
    ipamd.cli("gc", "--network", "gcnet", "--release-all")
    assert ipamd.leases("gcnet") == []


def test_gc_of_an_empty_network_is_refused(ipamd: netbed.Ipamd) -> None:
    """Issue 11 item 9: `gc --network ""` (and GarbageCollect(network="")) meant every network:
    seen, 980 leases released by one call. Refused by the CLI (2) and by the RPC
    (INVALID_ARGUMENT / INVALID_REQUEST); nothing is released."""
    with IpamClient(ipamd.socket) as c:
        for net in ("gce1", "gce2"):
            c.allocate(network=net, pool=POOL, container_id=netbed.container_id("gce"), ifname="eth0")
    before = ipamd.leases()
    for net in ("", " "):
        res = ipamd.cli("gc", "--network", net, "--release-all", check=False)
        assert res.returncode == 2 and "--network must name a network" in res.stderr, res
    got = _raw(ipamd.socket, "GarbageCollect", pb.GcRequest(network=""))
    assert got[0] == grpc.StatusCode.INVALID_ARGUMENT and got[2] == "INVALID_REQUEST" and "network" in got[1], got
    assert ipamd.leases() == before and len(before) >= 2


def _raw(sock: str, method: str, req: object) -> tuple[grpc.StatusCode, str, str]:
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        stub = ipam_pb2_grpc.IpamStub(ch)
        try:
            getattr(stub, method)(req, timeout=10)
        except grpc.RpcError as err:
            code = dict(err.trailing_metadata() or ()).get("ovs-underlay-reason", "")  # type: ignore[attr-defined]
            return err.code(), err.details(), code  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, "", ""


def _pb_pool(**subnet: object) -> pb.PoolSpec:
    return pb.PoolSpec(subnets=[pb.SubnetSpec(**subnet)])  # type: ignore[arg-type]


def test_bad_requests_status_code_message_and_no_change(ipamd: netbed.Ipamd) -> None:
    small = parse_ipam({"subnets": [{"subnet": "10.30.0.0/30", "gateway": "10.30.0.1"}]}).pool
    with IpamClient(ipamd.socket) as c:
        c.allocate(network="small", pool=small, container_id=netbed.container_id("only"), ifname="eth0")
    before = (ipamd.leases(all=True), ipamd.pools())

    def alloc(pool: pb.PoolSpec, network: str = "badnet", **kw: object) -> pb.AllocateRequest:
        return pb.AllocateRequest(network=network, pool=pool, container_id=netbed.container_id("bad"),
                                  ifname="eth0", **kw)  # type: ignore[arg-type]

    cases = [
        ("GetLease", pb.GetLeaseRequest(network="nosuchnet", container_id="x", ifname="eth0"),
         grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND", "network nosuchnet is unknown"),
        ("Allocate", alloc(_pb_pool(subnet="10.0.0.0/33")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POOL",
         "invalid CIDR '10.0.0.0/33'"),
        ("Allocate", alloc(_pb_pool(subnet="10.0.0.0/24", exclude=["10.0.0.9..10.0.0.2"])),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POOL", "ends before it starts"),
        ("Allocate", alloc(_pb_pool(subnet="10.0.0.0/24", exclude=["10.0.0.0/16"])),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POOL", "outside subnet 10.0.0.0/24"),
        ("Allocate", alloc(pb.PoolSpec()), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POOL", "no subnets defined"),
        ("Allocate", alloc(_pb_pool(subnet="10.0.0.0/24"), requested_ips=["10.1.0.5"]),
         grpc.StatusCode.OUT_OF_RANGE, "ADDRESS_OUT_OF_POOL", "requested address 10.1.0.5 is outside every subnet"),
        ("Allocate", alloc(_pb_pool(subnet="10.0.0.0/24", gateway="10.0.0.1"), requested_ips=["10.0.0.1"]),
         grpc.StatusCode.OUT_OF_RANGE, "ADDRESS_OUT_OF_POOL",
         "subnet 10.0.0.0/24: requested address 10.0.0.1 is the subnet's gateway"),
        ("Allocate", alloc(_pb_pool(subnet="10.0.0.0/30", gateway="10.0.0.1", exclude=["10.0.0.2"])),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED", "network badnet: subnet 10.0.0.0/30 exhausted: 0 of 0"),
        ("Allocate", alloc(_pb_pool(subnet="10.30.0.0/30", gateway="10.30.0.1"), network="small"),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED",
         "network small: subnet 10.30.0.0/30 exhausted: 1 of 1 addresses in use"),
        ("Allocate", alloc(_pb_pool(subnet="10.31.0.0/24"), network="small"),
         grpc.StatusCode.FAILED_PRECONDITION, "POOL_CHANGED", "network small: definition changed"),
        ("Allocate", pb.AllocateRequest(network="x", pool=_pb_pool(subnet="10.0.0.0/24")),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", "container_id, ifname"),
    ]
    for method, req, status, reason, msg in cases:
        got = _raw(ipamd.socket, method, req)
        assert got[0] == status and got[2] == reason and msg in got[1], (method, got)
    with IpamClient(ipamd.socket) as c:
        assert c.get_lease(network="nosuchnet", container_id="x", ifname="eth0") is None
        assert c.release(network="nosuchnet", container_id="x", ifname="eth0") == []  # DEL is idempotent
        with pytest.raises(IpamdRefused) as info:
            c.allocate(network="small", pool=small, container_id="y", ifname="eth0",
                       requested_ips=[IPAddress("10.30.0.9")])
        assert info.value.reason == "ADDRESS_OUT_OF_POOL" and "10.30.0.9" in info.value.msg
    # the store is unchanged: the refused requests left no pool, lease or quarantine behind
    assert (ipamd.leases(all=True), ipamd.pools()) == before
    assert "badnet" not in {p["network"] for p in ipamd.pools()}


def test_unreachable_daemon_is_unavailable_naming_socket(tmp_path: Path) -> None:
    with IpamClient(str(tmp_path / "none.sock"), timeout_ms=500) as c, pytest.raises(Unavailable) as info:
        c.allocate(network="n", pool=PoolDef(subnets=POOL.subnets), container_id="x", ifname="eth0")
    assert str(tmp_path / "none.sock") in info.value.msg


def test_metrics_endpoint_is_mutual_tls_only(ipamd_factory: Callable[..., netbed.Ipamd], tmp_path: Path) -> None:
    """Nothing listens on TCP without mutual TLS: a metrics port without the TLS files is refused
    at start; with them, a scraper without a client certificate, or with one a rogue CA signed,
    gets nothing, and one the client CA signed reads the metrics."""
    import socket as so
    import ssl
    import urllib.error
    import urllib.request

    from testbed import pki as testbed_pki

    with so.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = subprocess.run([sys.executable, "-m", "ipamd", "serve", "--socket", str(tmp_path / "x.sock"),
                          "--state-dir", str(tmp_path / "x"), "--metrics-port", str(port)],
                         capture_output=True, text=True, timeout=30, cwd=netbed.ROOT)
    assert bad.returncode == 2 and "metricsPort" in bad.stderr and "mutual TLS" in bad.stderr
    pki = testbed_pki.make(tmp_path)
    d = ipamd_factory("--metrics-port", str(port), *testbed_pki.ipamd_args(pki), name="metrics")
    with IpamClient(d.socket) as c:
        c.allocate(network="m", pool=POOL, container_id=netbed.container_id("m"), ifname="eth0")
    url = f"https://127.0.0.1:{port}/metrics"

    for who in (None, "intruder"):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            testbed_pki.scrape(url, pki, who)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP: no answer either
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    body = testbed_pki.scrape(url, pki)
    assert 'ipamd_allocations_total{network="m"} 2' in body
    assert 'ipamd_pool_used{network="m",subnet="10.20.0.0/22"} 1' in body
    assert "ipamd_commit_batches_total 1\n" in body and "ipamd_commit_writes_total 1\n" in body


def test_a_corrupt_definition_quarantines_one_network_and_the_daemon_serves_the_others(
        ipamd: netbed.Ipamd) -> None:
    """Issue 11 item 16: one stored pool definition that no longer parses stopped ipamd from
    starting for every network. Now it starts, says SERVING, serves the other networks, refuses
    the broken one's allocations with FAILED_PRECONDITION / NETWORK_QUARANTINED, still releases
    its leases, and shows it in `pools` and the metrics."""
    import sqlite3

    good, bad = netbed.container_id("good"), netbed.container_id("bad")
    with IpamClient(ipamd.socket) as c:
        c.allocate(network="qgood", pool=POOL, container_id=good, ifname="eth0")
        c.allocate(network="qbad", pool=POOL, container_id=bad, ifname="eth0")
    ipamd.stop()
    with sqlite3.connect(os.path.join(ipamd.state_dir, "ipam.db")) as raw:
        raw.execute("UPDATE pools SET definition = 'not json at all' WHERE network = 'qbad'")
    ipamd.start()
    assert ipamd.cli("health").stdout.strip() == "SERVING"
    assert "network=qbad" in ipamd.log() and "QUARANTINED" in ipamd.log()
    got = _raw(ipamd.socket, "Allocate", pb.AllocateRequest(
        network="qbad", pool=wire_pool(POOL), container_id=netbed.container_id("new"), ifname="eth0"))
    assert got[0] == grpc.StatusCode.FAILED_PRECONDITION and got[2] == "NETWORK_QUARANTINED", got
    assert "network qbad is quarantined" in got[1] and "not JSON" in got[1]
    with IpamClient(ipamd.socket) as c:
        c.allocate(network="qgood", pool=POOL, container_id=netbed.container_id("more"), ifname="eth0")
        assert len(c.release(network="qbad", container_id=bad, ifname="eth0")) == 1
    pools = ipamd.pools()
    assert {p["network"] for p in pools if "definitionError" not in p} == {"qgood"}
    assert [p["network"] for p in pools if "definitionError" in p] == ["qbad"]


def wire_pool(pool: PoolDef) -> pb.PoolSpec:
    from core import wire
    return wire.pool_to_pb(pool)


@pytest.fixture
def full_disk_ipamd(tmp_path: Path) -> Iterator[tuple[netbed.Ipamd, Path]]:
    """ipamd whose state dir is a 1 MiB tmpfs (filled up by the test), health checked every 0.3 s."""
    work = tmp_path / "fd"
    state = work / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(state)], check=True)
    d: netbed.Ipamd | None = None
    try:
        cfg = tmp_path / "ipamd.json"
        cfg.write_text(json.dumps({"healthIntervalSeconds": 0.3}))
        d = netbed.start_ipamd(str(work), ["--config", str(cfg)])
        yield d, state
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_health_says_not_serving_while_writes_fail_on_a_full_disk(
        full_disk_ipamd: tuple[netbed.Ipamd, Path]) -> None:
    """Issue 11 item 17: health read the store and said SERVING while every write failed on a
    full disk. A failed commit flips it to NOT_SERVING at once; once the disk has room again,
    the daemon's own probe write (made only while writes fail) flips it back, with no client."""
    d, state = full_disk_ipamd
    with IpamClient(d.socket) as c:
        c.allocate(network="full", pool=POOL, container_id=netbed.container_id("f0"), ifname="eth0")
        filler = state / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):  # until ENOSPC
                while os.write(fd, b"\0" * 4096):
                    pass
        finally:
            os.close(fd)
        failed = None
        for i in range(40):  # the WAL's last page may still hold a frame or two
            try:
                c.allocate(network="full", pool=POOL, container_id=netbed.container_id(f"f{i + 1}"), ifname="eth0")
            except IpamdRefused as exc:
                failed = exc
                break
        assert failed is not None and failed.reason == "COMMIT_FAILED", failed
        assert c.health() is False  # at once: no wait for a periodic check
        time.sleep(1.0)
        assert c.health() is False  # the probe writes fail too
        filler.unlink()
        assert ph.wait_for(c.health)
    assert "NOT_SERVING" in d.log() and "writes succeed" in d.log()
