"""Row 5: ipamd allocate/release latency and throughput, 1 and 16 concurrent clients, /24 and
/16 pools, 0 and 60,000 existing leases; daemon RSS idle and loaded.

Existing leases are written straight through ipamd's store module (SqliteStore.reserve, in
batches) into the state directory before the daemon starts. Clients are separate processes
(spawn: no grpc state crosses a fork), released together by a barrier.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from common import netbed, rss_kb, summary


def _pool(subnet: str) -> Any:
    from ipamd.spec import parse_ipam

    return parse_ipam({"type": "ovs-underlay-ipam", "subnets": [{"subnet": subnet}]}).pool


def prefill(state_dir: str, network: str, subnet: str, n: int) -> float:
    from netaddr import IPNetwork

    from ipamd.model import Entry
    from ipamd.store_sqlite import SqliteStore

    t0 = time.perf_counter()
    pool = _pool(subnet)
    store = SqliteStore(os.path.join(state_dir, "ipam.db"))
    store.put_pool(network, pool)
    net = IPNetwork(subnet)
    spec = pool.subnets[0]
    batch: list[Entry] = []
    made = 0
    for ip in net.iter_hosts():
        if made >= n:
            break
        if not spec.allocatable(ip):
            continue
        batch.append(Entry(network, IPNetwork(f"{ip}/{net.prefixlen}"), 0, f"pre{made}", "eth0"))
        made += 1
        if len(batch) == 5000:
            store.reserve(batch, advance_cursor=False)
            batch = []
    if batch:
        store.reserve(batch, advance_cursor=False)
    store.close()
    return time.perf_counter() - t0


def _client(sock: str, network: str, subnet: str, cid: int, k: int, barrier: Any, q: Any) -> None:
    from ipamd.client import IpamClient

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


def _measure(sock: str, network: str, subnet: str, clients: int, per_client: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(clients), ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(sock, network, subnet, i, per_client, barrier, q))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    out = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    alloc = [x for o in out for x in o[0]]
    rel = [x for o in out for x in o[1]]
    start = min(o[2] for o in out)
    return {
        "alloc": summary(alloc),
        "release": summary(rel),
        "alloc_per_s": len(alloc) / (max(o[3] for o in out) - start),
        "release_per_s": len(rel) / (max(o[4] for o in out) - min(o[3] for o in out)),
    }


def ipamd_rows(work: Path, quick: bool) -> list[dict[str, Any]]:
    cases = [
        ("/24", "10.91.0.0/24", 0),
        ("/16", "10.92.0.0/16", 0),
        ("/16", "10.93.0.0/16", 2000 if quick else 60_000),
    ]
    rows: list[dict[str, Any]] = []
    for label, subnet, existing in cases:
        d = work / f"ipamd-{subnet.replace('/', '_')}"
        state = d / "state"
        state.mkdir(parents=True, exist_ok=True)
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
                m = _measure(daemon.socket, network, subnet, clients, per)
                name = f"ipamd {label} {existing} leases {clients} client(s)"
                rows.append(
                    {
                        "row": f"{name} allocate",
                        **m["alloc"],
                        "per_s": m["alloc_per_s"],
                        "rss_kb": rss_kb(daemon.proc.pid),
                        "rss_idle_kb": rss_idle,
                        "prefill_s": load_s,
                    }
                )
                rows.append({"row": f"{name} release", **m["release"], "per_s": m["release_per_s"]})
        finally:
            daemon.stop()
    return rows
