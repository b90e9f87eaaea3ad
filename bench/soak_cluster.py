"""`make soak-cluster`: the cluster churn of issue 10 at full size, as a report (not a test).

A 3-member etcd (Debian's etcd-server on loopback ports), 3 ipamd nodes, 2,000 ADD/DEL through
the frozen `ovs-underlay-ipam` (8 at a time per node, static requests mixed in) on one /24 with
exclusions, and every fault in order: kill -9 of one ipamd, kill -9 of the etcd leader, every
etcd member stopped for 30 s while the churn goes on, a node removed with `nodes release`.
`make test` runs the same scenario (testbed/cluster.py) with fewer operations and a shorter
outage. Writes bench/results/soak-cluster-<timestamp>.json and prints the counts; exits 1 when
the run saw a duplicate, a lost or leaked lease or an unexpected error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from testbed.cluster import FROZEN_IPAM, IpamCluster, run_scenario
from testbed.etcd import start_cluster

ROOT = Path(__file__).resolve().parent.parent
IPAM = {"subnets": [{"subnet": "10.77.0.0/24", "gateway": "10.77.0.1"}],
        "exclude": ["10.77.0.240-10.77.0.254", "10.77.0.100-10.77.0.109"],
        "reserved": ["10.77.0.230-10.77.0.239"], "cooldownSeconds": 2}
STATICS = ("10.77.0.235", "10.77.0.5", "10.77.0.77")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=2000, help="ADD+DEL execs in total (default 2000)")
    ap.add_argument("--outage", type=float, default=30.0, help="seconds every etcd member is down")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("soak-cluster: needs root (netns)", file=sys.stderr)
        return 2
    if not FROZEN_IPAM.exists():
        print(f"soak-cluster: {FROZEN_IPAM} is missing: run `make binary`", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ovs-underlay-soak-cluster-"))
    load0 = os.getloadavg()
    etcd = start_cluster(3, workdir=str(work / "etcd"))
    try:
        cluster = IpamCluster(work, etcd, 3)
        try:
            res = run_scenario(cluster, network="soak", ipam=IPAM, total=a.ops, outage_s=a.outage,
                               statics=STATICS, log=lambda s: print(s, flush=True))
        finally:
            cluster.destroy()
    finally:
        etcd.destroy()
        shutil.rmtree(work, ignore_errors=True)
    doc = {**res.__dict__, "load_start": load0, "load_end": os.getloadavg(), "nproc": os.cpu_count(),
           "ops_per_s": res.ops / res.seconds if res.seconds else 0.0}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(json.dumps(doc, indent=1, default=str))
    print(f"\nwritten: {path}")
    bad = (res.duplicates or res.failures or res.lost_after_outage or res.leaked_at_end
           or res.removed_node_left or res.refused_live_release != "NODE_ALIVE")
    print(f"ops {res.ops} in {res.seconds:.0f}s; duplicates {len(res.duplicates)}; lost after the outage "
          f"{len(res.lost_after_outage)}; leaked at the end {len(res.leaked_at_end)}; unexpected errors "
          f"{len(res.failures)}; replayed {res.replayed}; during the outage {res.during_outage}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
