"""Row 5: ipamd allocate/release latency and throughput, 1 and 16 concurrent clients, /24 and
/16 pools, 0 and 60,000 existing leases; daemon RSS idle and loaded; daemon CPU per RPC.

Existing leases are bulk-loaded straight through ipamd's store (one SqliteStore batch: one
transaction, about a second for 60,000) into the state directory before the daemon starts; the
daemon builds its occupancy from them before it binds its socket. Clients are separate processes
(spawn: no grpc state crosses a fork), released together by a barrier. Every case's state
directory is removed after it, and client processes are killed if a case fails: the bench leaves
no processes or files behind.

Standalone (only this section, a few minutes): `.venv/bin/python -m bench.ipamd_rows [--quick]`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import netbed, rss_kb, summary

CASES = [  # label, subnet, existing leases (full run)
    ("/24", "10.91.0.0/24", 0),
    ("/16", "10.92.0.0/16", 0),
    ("/16", "10.93.0.0/16", 60_000),
]


def _pool(subnet: str) -> Any:
    from core.spec import parse_ipam

    return parse_ipam({"type": "ovs-underlay-ipam", "subnets": [{"subnet": subnet}]}).pool


def prefill(state_dir: str, network: str, subnet: str, n: int) -> float:
    """Write `n` ACTIVE leases (the first allocatable addresses) in one store batch."""
    from netaddr import IPNetwork

    from ipamd.model import Entry
    from ipamd.store_sqlite import SqliteStore

    t0 = time.perf_counter()
    pool = _pool(subnet)
    spec = pool.subnets[0]
    net = IPNetwork(subnet)
    entries: list[Entry] = []
    for ip in net.iter_hosts():
        if len(entries) >= n:
            break
        if spec.allocatable(ip):
            addr = IPNetwork((int(ip), net.prefixlen), ip.version)
            entries.append(Entry(network, addr, 0, f"pre{len(entries)}", "eth0"))
    store = SqliteStore(os.path.join(state_dir, "ipam.db"))
    try:
        with store.batch():
            store.put_pool(network, pool)
            store.reserve(entries, advance_cursor=False)
    finally:
        store.close()
    return time.perf_counter() - t0


def _client(sock: str, network: str, subnet: str, cid: int, k: int, barrier: Any, q: Any) -> None:
    from core.ipamd_client import IpamClient

    pool = _pool(subnet)
    alloc, rel = [], []
    with IpamClient(sock, timeout_ms=10_000) as c:
        c.health()
        barrier.wait()
        t_start = time.perf_counter()
        for i in range(k):
            t0 = time.perf_counter()
            c.allocate(network=network, pool=pool, container_id=f"bench{cid}x{i}", ifname="eth0")
            alloc.append((time.perf_counter() - t0) * 1000)
        t_alloc = time.perf_counter()
        for i in range(k):
            t0 = time.perf_counter()
            c.release(network=network, container_id=f"bench{cid}x{i}", ifname="eth0")
            rel.append((time.perf_counter() - t0) * 1000)
        t_end = time.perf_counter()
    q.put((alloc, rel, t_start, t_alloc, t_end))


def _cpu_ms(pid: int) -> float:
    """utime+stime of a process (all its threads), ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def _measure(sock: str, network: str, subnet: str, clients: int, per_client: int, pid: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(clients), ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(sock, network, subnet, i, per_client, barrier, q))
        for i in range(clients)
    ]
    try:
        for p in procs:
            p.start()
        cpu0 = _cpu_ms(pid)
        out = [q.get(timeout=300) for _ in procs]
        cpu = _cpu_ms(pid) - cpu0
        for p in procs:
            p.join(30)
    finally:
        for p in procs:  # a failed client must not leave the others (or itself) behind
            if p.is_alive():
                p.kill()
                p.join(5)
        q.close()
    alloc = [x for o in out for x in o[0]]
    rel = [x for o in out for x in o[1]]
    start = min(o[2] for o in out)
    return {
        "alloc": summary(alloc),
        "release": summary(rel),
        "alloc_per_s": len(alloc) / (max(o[3] for o in out) - start),
        "release_per_s": len(rel) / (max(o[4] for o in out) - min(o[3] for o in out)),
        "cpu_ms": cpu / (len(alloc) + len(rel)),  # daemon CPU per RPC (allocate and release)
    }


def ipamd_rows(work: Path, quick: bool,
               cases: list[tuple[str, str, int]] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for label, subnet, existing in cases or CASES:
        existing = min(existing, 2000) if quick else existing
        d = work / f"ipamd-{subnet.replace('/', '_')}"
        state = d / "state"
        state.mkdir(parents=True, exist_ok=True)
        try:
            network = f"b{label.strip('/')}x{existing}"
            load_s = prefill(str(state), network, subnet, existing) if existing else 0.0
            daemon = netbed.start_ipamd(str(d))
            try:
                assert daemon.proc is not None
                rss_idle = rss_kb(daemon.proc.pid)
                for clients in (1, 16):
                    # a /24 has 253 addresses and released ones cool down: keep its totals small
                    total = (40 if quick else 200) if label == "/24" else (160 if quick else 3200)
                    per = max(1, total // clients)
                    load1 = os.getloadavg()[0]
                    m = _measure(daemon.socket, network, subnet, clients, per, daemon.proc.pid)
                    name = f"ipamd {label} {existing} leases {clients} client(s)"
                    rows.append(
                        {
                            "row": f"{name} allocate",
                            **m["alloc"],
                            "per_s": m["alloc_per_s"],
                            "cpu_ms": m["cpu_ms"],
                            "rss_kb": rss_kb(daemon.proc.pid),
                            "rss_idle_kb": rss_idle,
                            "prefill_s": load_s,
                            "load1": load1,
                        }
                    )
                    rows.append({"row": f"{name} release", **m["release"], "per_s": m["release_per_s"],
                                 "cpu_ms": m["cpu_ms"], "load1": load1})
            finally:
                daemon.stop()
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description="ipamd rows of the bench, alone")
    ap.add_argument("--quick", action="store_true", help="2,000 existing leases, small totals")
    ap.add_argument("--only-60k", action="store_true", help="only the /16 with existing leases")
    ap.add_argument("--cluster", action="store_true", help="only the cluster rows (SQLite vs etcd)")
    a = ap.parse_args()
    cases = [c for c in CASES if c[2]] if a.only_60k else CASES
    work = Path(tempfile.mkdtemp(prefix="ovs-underlay-ipamd-bench-"))
    load0 = os.getloadavg()
    try:
        rows = cluster_rows(work, a.quick) if a.cluster else ipamd_rows(work, a.quick, cases)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"nproc {os.cpu_count()}; load average start {load0}, end {os.getloadavg()}")
    print(f"{'row':<46} {'n':>5} {'p50':>6} {'p95':>6} {'p99':>6} {'max':>7} {'/s':>6} {'cpu ms/rpc':>10}")
    for r in rows:
        print(f"{r['row']:<46} {r['n']:>5} {r['p50']:>6.2f} {r['p95']:>6.2f} {r['p99']:>6.2f} "
              f"{r['max']:>7.2f} {r['per_s']:>6.0f} {r.get('cpu_ms', float('nan')):>10.3f}"
              + (f"  etcd txn/op {r['etcd_txn_per_op']:.2f} req/op {r['etcd_req_per_op']:.2f}"
                 if "etcd_txn_per_op" in r else ""))
    for r in rows:
        if "rss_kb" in r:
            print(f"{r['row'].rsplit(' allocate', 1)[0]}: RSS idle {r['rss_idle_kb']} kB, "
                  f"after {r['rss_kb']} kB, prefill {r['prefill_s']:.1f} s")
    return 0


# ---- cluster: SQLite and etcd side by side (issue 10) ------------------------------------------

CLUSTER_SUBNET = "10.94.0.0/16"


def _metrics(port: int, pki: Path) -> dict[str, float]:
    """etcd request counters from a node's metrics endpoint (mutual TLS: the bench's admin cert)."""
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(pki / "server-ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5, context=ctx) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("ipamd_etcd_requests_total"):
                name, value = line.rsplit(" ", 1)
                out[name.split('kind="')[1].split('"')[0]] = float(value)
    return out


def _measure_nodes(socks: list[str], network: str, subnet: str, clients: int, per_client: int,
                   ) -> dict[str, Any]:
    """`clients` processes per socket, all released together: allocate `per_client`, then release."""
    ctx = mp.get_context("spawn")
    n = len(socks) * clients
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(s, network, subnet, 1000 * k + i, per_client, barrier, q))
             for k, s in enumerate(socks) for i in range(clients)]
    try:
        for p in procs:
            p.start()
        out = [q.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        q.close()
    alloc = [x for o in out for x in o[0]]
    rel = [x for o in out for x in o[1]]
    start = min(o[2] for o in out)
    return {"alloc": summary(alloc), "release": summary(rel),
            "alloc_per_s": len(alloc) / (max(o[3] for o in out) - start), "ops": len(alloc) + len(rel)}


def block_claim_cost(etcd: Any, work: Path, n: int) -> dict[str, Any]:
    """One lease write in a block nobody claimed (the claim rides in the same transaction) vs one
    in a block already claimed, through the store itself, against the same etcd."""
    from netaddr import IPNetwork

    from core.etcd import EtcdClient, EtcdConfig
    from ipamd.blocks import Blocks
    from ipamd.model import Entry
    from ipamd.store_etcd import EtcdStore

    pool = _pool(CLUSTER_SUBNET)
    store = EtcdStore(EtcdClient(EtcdConfig(tuple(etcd.endpoints))), prefix="/bench-claim", node="bench",
                      journal_path=str(work / "claim-journal.db"))
    try:
        store.put_pool("claim", pool)
        geo = Blocks(pool.subnets[0], 16)

        def write(number: int) -> float:
            ip = geo.offset(number) + int(pool.subnets[0].range_start)
            e = Entry("claim", IPNetwork((ip, 16)), 0, f"c{number}", "eth0", node="bench")
            t0 = time.perf_counter()
            store.reserve([e])
            return (time.perf_counter() - t0) * 1000

        claimed = [write(16 * b) for b in range(n)]  # first address of a fresh block: claim + lease
        plain = [write(16 * b + 1) for b in range(n)]  # the same blocks, now this node's: lease only
    finally:
        store.close()
    return {"claim": summary(claimed), "plain": summary(plain)}


def cluster_rows(work: Path, quick: bool) -> list[dict[str, Any]]:
    """allocate p50/p99 and allocs/s with 1 and 3 nodes, 16 clients per node, SQLite (each node
    its own file: no cluster) and etcd (one 3-member etcd, one network shared by the nodes); the
    cost of a block claim; etcd requests per allocation and per release."""
    from bench.common import netbed
    from testbed.etcd import free_port, start_cluster
    from testbed.pki import make as make_pki

    rows: list[dict[str, Any]] = []
    per_client = 8 if quick else 40
    etcd = start_cluster(3, workdir=str(work / "etcd"))
    pki = make_pki(Path(tempfile.mkdtemp(dir=work, prefix="pki")))
    tls = ["--tls-cert", str(pki / "ipamd.crt"), "--tls-key", str(pki / "ipamd.key"),
           "--tls-client-ca", str(pki / "client-ca.crt")]
    try:
        for store in ("sqlite", "etcd"):
            for nodes in (1, 3):
                d = work / f"cluster-{store}-{nodes}"
                daemons = []
                try:
                    ports = [free_port() for _ in range(nodes)]
                    for k in range(nodes):
                        (d / f"n{k}").mkdir(parents=True, exist_ok=True)
                        args = ["--node-name", f"bench{k}", "--metrics-port", str(ports[k]), *tls]
                        if store == "etcd":
                            args += etcd.ipamd_args(f"/bench-{nodes}")
                        daemons.append(netbed.start_ipamd(str(d / f"n{k}"), args))
                    before = [_metrics(p, pki) for p in ports] if store == "etcd" else []
                    load1 = os.getloadavg()[0]
                    m = _measure_nodes([x.socket for x in daemons], f"bench{nodes}", CLUSTER_SUBNET, 16,
                                       per_client)
                    row = {"row": f"cluster {store} {nodes} node(s) x 16 clients allocate", **m["alloc"],
                           "per_s": m["alloc_per_s"], "load1": load1}
                    if store == "etcd":
                        after = [_metrics(p, pki) for p in ports]
                        pairs = list(zip(after, before, strict=True))
                        txn = sum(a.get("txn", 0) - b.get("txn", 0) for a, b in pairs)
                        allreq = sum(sum(a.values()) - sum(b.values()) for a, b in pairs)
                        row["etcd_txn_per_op"] = txn / m["ops"]
                        row["etcd_req_per_op"] = allreq / m["ops"]
                    rows.append(row)
                    rows.append({"row": f"cluster {store} {nodes} node(s) x 16 clients release",
                                 **m["release"], "per_s": 0.0, "load1": load1})
                finally:
                    for x in daemons:
                        x.stop()
                    shutil.rmtree(d, ignore_errors=True)
        c = block_claim_cost(etcd, work, 10 if quick else 50)
        rows.append({"row": "etcd lease write, claiming a block", **c["claim"], "per_s": 0.0})
        rows.append({"row": "etcd lease write, block already claimed", **c["plain"], "per_s": 0.0})
    finally:
        etcd.destroy()
    return rows


if __name__ == "__main__":
    sys.exit(main())
