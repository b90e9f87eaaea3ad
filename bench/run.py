"""`make bench` / `make bench-quick`: measure, compare, report. Never fails on numbers.

Writes bench/results/bench-<timestamp>.{md,json} and bench/results/latest.md. Sections:
1+2 ADD/DEL latency, pods/s and CPU (frozen binary warm + in-process, reference bridge+host-local),
    and the reference bridge with ovs-underlay-ipam (warm + in-process)
3   start-up: VERSION cold start, import-time breakdown, phase breakdown of one ADD
4   scale: ADD/DEL with 10/100/1000 ports on the bridge next to OVS's raw port-add cost
5   ipamd allocate/release (1 and 16 clients, /24 and /16, 0 and 60k leases), RSS
5b  cluster: SQLite and etcd side by side, 1 and 3 nodes x 16 clients, block claim cost, etcd
    requests per operation
6   probe cost: off, the defaults (pre-probed pool warm, gateway answered), a cold pool; c=8
7   the OVS floor: veth + a raw OVSDB port add until ofport + one durable SQLite write
Exit code: 0 when the harness ran (targets missed are reported, not failed); 2 when it broke.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import FROZEN, REF_DIR, ROOT, machine, run_exec, summary

RESULTS = ROOT / "bench" / "results"
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable


def startup_rows(n: int) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "VERSION"}
    rows = []
    for name, argv in (
        ("VERSION cold, frozen binary", [str(FROZEN)]),
        ("VERSION cold, python -m cni", [PY, "-m", "cni"]),
        ("VERSION cold, reference bridge", [f"{REF_DIR}/bridge"]),
    ):
        res = [run_exec(argv, {**env, "PYTHONPATH": str(ROOT)}, b"") for _ in range(n)]
        rows.append(
            {
                "row": name,
                **summary([r.wall_ms for r in res if r.code == 0]),
                "failed": sum(r.code != 0 for r in res),
                "cpu_ms": sum(r.cpu_ms for r in res) / n,
            }
        )
    p = subprocess.run(
        [
            PY,
            "-X",
            "importtime",
            "-c",
            "import cni.skel, cni.plugin, core.netlink, core.vswitch, cni.delegate, core.ipamd_client",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    imports = []
    for line in p.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].startswith("import time:") and parts[1].strip().isdigit():
            imports.append([parts[2].rstrip(), int(parts[1]) / 1000, int(parts[0].split(":")[1]) / 1000])
    top = [i for i in imports if not i[0].startswith("   ")]  # top-level packages only
    top.sort(key=lambda i: -i[1])
    return rows, top[:15]


def phase_breakdown(bed: Any) -> dict[str, Any]:
    from bench.common import netbed

    ns = bed.netns[0]
    log = netbed.plugin_log("bench-phases")
    env = {
        **os.environ,
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": netbed.container_id("ph"),
        "CNI_NETNS": ns.path,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": REF_DIR,
        "OVS_UNDERLAY_LOG_FILE": str(log),
        "PYTHONPATH": str(ROOT),
    }
    try:
        p = subprocess.run(
            [PY, "-m", "bench.phases"],
            input=json.dumps(bed.conf("warm")).encode(),
            env=env,
            capture_output=True,
            cwd=ROOT,
            check=False,
            timeout=120,
        )
    finally:
        log.unlink(missing_ok=True)
    try:
        return dict(json.loads(p.stdout))
    except ValueError:
        return {"error": p.stderr.decode(errors="replace")[-2000:]}


def get(rows: list[dict[str, Any]], name: str, key: str = "p50") -> float:
    for r in rows:
        if r["row"] == name:
            return float(r.get(key, float("nan")))
    return float("nan")


def targets(rows: list[dict[str, Any]], scale_counts: list[int]) -> list[dict[str, Any]]:
    def t(name: str, value: float, limit: float, unit: str = "x", higher: bool = False) -> dict[str, Any]:
        ok = value >= limit if higher else value <= limit
        return {
            "target": name,
            "value": round(value, 3),
            "limit": limit,
            "unit": unit,
            "status": "n/a" if value != value else ("PASS" if ok else "MISS"),
        }

    from bench.floor import FLOOR

    warm, ref = get(rows, "ADD serial warm"), get(rows, "ADD serial ref")
    out = [
        # issue 14 (one run; never met by weakening what ADD does)
        t("ADD p50, defaults <= 1.2x probes off",
          get(rows, "ADD warm defaults") / get(rows, "ADD warm probes off"), 1.2),
        t("warm ADD p50 (probes off) <= 2.5x reference", warm / ref, 2.5),
        t("warm ADD p50 (probes off) <= 1.5x the OVS floor", warm / get(rows, FLOOR), 1.5),
        t("conc8 pods/s >= 0.8x reference",
          get(rows, "ADD conc8 warm", "per_s") / get(rows, "ADD conc8 ref", "per_s"), 0.8, higher=True),
        # earlier passes
        t("warm DEL p50 <= 4x reference", get(rows, "DEL serial warm") / get(rows, "DEL serial ref"), 4),
        t(
            "warm ADD p99 <= 2.5x own p50",
            get(rows, "ADD serial warm", "p99") / get(rows, "ADD serial warm"),
            2.5,
        ),
        t(
            "in-process ADD p50 <= 20x reference",
            get(rows, "ADD serial inproc") / get(rows, "ADD serial ref"),
            20,
        ),
        t("VERSION cold <= 80 ms", get(rows, "VERSION cold, frozen binary"), 80, "ms"),
        t(
            "bridge + ovs-underlay-ipam (warm) ADD p50 <= 2x bridge + host-local",
            get(rows, "ADD serial ipam-warm") / get(rows, "ADD serial ref (ipam rows)"),
            2,
        ),
    ]
    if len(scale_counts) >= 2:
        lo, hi = scale_counts[0], scale_counts[-1]
        over = [
            get(rows, f"ADD warm @{k} ports") - get(rows, f"raw OVS port add (ofport) @{k}") for k in (lo, hi)
        ]
        out.append(t(f"ADD overhead @{hi} <= 1.2x @{lo} ports (minus raw OVS)", over[1] / over[0], 1.2))
    big = [
        r
        for r in rows
        if r["row"].startswith("ipamd /16")
        and "0 leases" not in r["row"].split("/16 ")[1][:2]
        and r["row"].endswith("16 client(s) allocate")
    ]
    for r in rows:
        if (
            r["row"].startswith("ipamd /16")
            and r["row"].endswith("1 client(s) allocate")
            and " 0 leases" not in r["row"]
        ):
            out.append(t(f"ipamd allocate p99 <= 5 ms ({r['row']})", r["p99"], 5, "ms"))
    for r in big or [r for r in rows if r["row"].endswith("16 client(s) allocate")][-1:]:
        out.append(t(f"ipamd >= 1000 alloc/s ({r['row']})", r["per_s"], 1000, "/s", higher=True))
    for n in (1, 3):
        e = f"cluster etcd {n} node(s) x 16 clients allocate"
        q = f"cluster sqlite {n} node(s) x 16 clients allocate"
        ratio = get(rows, e, "p99") / get(rows, q, "p99")
        out.append(t(f"etcd allocate p99 <= 3x SQLite's ({n} node(s))", ratio, 3))
    e3 = "cluster etcd 3 node(s) x 16 clients allocate"
    out.append(t("etcd >= 500 alloc/s across 3 nodes", get(rows, e3, "per_s"), 500, "/s", higher=True))
    out.append(t("etcd writes per allocation/release <= 1",
                 get(rows, "cluster etcd 3 node(s) x 16 clients allocate", "etcd_txn_per_op"), 1, "txn"))
    cold, off = get(rows, "ADD warm cold pool"), get(rows, "ADD warm probes off")
    from bench.plugin_rows import PROBE_WAIT_MS

    out.append(
        t(f"cold pool ADD - probes off <= conflict wait {PROBE_WAIT_MS} + 10 ms", cold - off,
          PROBE_WAIT_MS + 10, "ms")
    )
    return out


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.1f}"
    return str(v)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# ovs-underlay bench {doc['started']}{' (quick)' if doc['quick'] else ''}",
        "",
        f"nproc {m['nproc']}, {m['cpu']}, kernel {m['kernel']}, {m['ovs']}, Python {m['python']}; "
        f"load average start {m['loadavg_start']}, end {doc.get('loadavg_end')}; "
        f"duration {doc.get('duration_s', 0):.0f} s",
        "",
        "load average (1 min) at the start of each section: "
        + ", ".join(f"{k} {v}" for k, v in doc.get("sections_load", {}).items()),
        "",
        "| row | n | min | p50 | p95 | p99 | max | /s | CPU ms/op | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            "| "
            + " | ".join(
                [r["row"]]
                + [
                    fmt(r.get(k, ""))
                    for k in ("n", "min", "p50", "p95", "p99", "max", "per_s", "cpu_ms", "failed")
                ]
            )
            + " |"
        )
    extra = [r for r in doc["rows"] if "rss_kb" in r]
    if extra:
        lines += [
            "",
            "ipamd RSS: "
            + "; ".join(
                f"{r['row'].rsplit(' allocate', 1)[0]}: idle {r['rss_idle_kb']} kB, "
                f"after {r['rss_kb']} kB (prefill {r['prefill_s']:.1f} s)"
                for r in extra
            ),
        ]
    phased = [r for r in doc["rows"] if r.get("phases")]
    if phased:
        lines += ["", "## Phases of the warm rows (median ms per call, from the plugin's log)", ""]
        lines += [f"- {r['row']}: " + " ".join(f"{k}={v:g}" for k, v in r["phases"].items()) for r in phased]
    errs = [r for r in doc["rows"] if r.get("first_error")]
    for r in errs:
        lines.append(f"\nfirst error in `{r['row']}`: `{r['first_error'][:300]}`")
    lines += ["", "## Targets", "", "| target | value | limit | status |", "|---|---|---|---|"]
    for t in doc["targets"]:
        lines.append(
            f"| {t['target']} | {fmt(t['value'])} {t['unit']} | {t['limit']} {t['unit']} | {t['status']} |"
        )
    if doc.get("imports"):
        lines += [
            "",
            "## Import time of the ADD path (-X importtime, top-level, ms)",
            "",
            "| module | cumulative | self |",
            "|---|---|---|",
        ]
        lines += [f"| {n.strip()} | {c:.1f} | {s:.1f} |" for n, c, s in doc["imports"]]
    ph = doc.get("phases") or {}
    if ph.get("phases_ms"):
        lines += [
            "",
            "## Phases of one in-process ADD (cProfile cumulative, ms; profiler overhead included)",
            "",
            f"process start (VERSION cold, frozen): {fmt(get(doc['rows'], 'VERSION cold, frozen binary'))}; "
            f"import skel: {ph['import_skel_ms']:.1f}; import ADD path: {ph['import_add_path_ms']:.1f}",
            "",
            "| phase | ms |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.1f} |" for k, v in ph["phases_ms"].items()]
        lines += ["", "```", ph.get("profile", "")[-3500:], "```"]
    elif ph:
        lines += ["", f"phase breakdown failed: `{str(ph)[:500]}`"]
    if doc.get("errors"):
        lines += ["", "## Harness errors", ""] + [f"```\n{e[-1500:]}\n```" for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts (seconds)")
    ap.add_argument("--only", default="latency,ipam,startup,scale,ipamd,cluster,probes,floor")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (netns, veth, OVS)", file=sys.stderr)
        return 2
    if not FROZEN.exists():
        print(f"bench: {FROZEN} is missing: run `make binary`", file=sys.stderr)
        return 2
    only = set(a.only.split(","))
    q = a.quick
    n_serial, n_conc = (8, 16) if q else (100, 200)
    scale_counts = [10, 50] if q else [10, 100, 1000]
    t_start = time.time()
    doc: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": q,
        "machine": machine(),
        "rows": [],
        "errors": [],
    }
    work = Path(tempfile.mkdtemp(prefix="ovs-underlay-bench-"))
    from bench.floor import Floor, floor_rows
    from bench.plugin_rows import Bed, ipam_rows, latency_rows, probe_rows, scale_rows, settle_ovs

    stamp = time.strftime("%Y%m%d-%H%M%S")

    def save() -> str:
        doc["targets"] = targets(doc["rows"], scale_counts)
        doc["loadavg_end"] = os.getloadavg()
        doc["duration_s"] = time.time() - t_start
        RESULTS.mkdir(parents=True, exist_ok=True)
        md = markdown(doc)
        (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(doc, indent=1, default=str))
        (RESULTS / f"bench-{stamp}.md").write_text(md)
        (RESULTS / "latest.md").write_text(md)
        return md

    def section(name: str, fn: Any) -> Any:
        if name not in only:
            return None
        t0 = time.time()
        doc.setdefault("sections_load", {})[name] = round(os.getloadavg()[0], 2)  # machine shared: say so
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            return fn()
        except Exception:
            doc["errors"].append(f"{name}: {traceback.format_exc()}")
            return None
        finally:
            print(f"bench: {name} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            doc.setdefault("sections_s", {})[name] = time.time() - t0

    bed = None
    try:
        if only & {"latency", "ipam", "scale", "probes", "startup", "floor"}:
            bed = Bed(work, max(n_serial, n_conc, 20))
        with_floor = bed is not None and {"floor", "latency"} <= only
        floor = Floor(bed.underlay.bridge, bed.netns, work) if with_floor and bed is not None else None

        def lat() -> list[dict[str, Any]]:
            try:
                return latency_rows(bed, n_serial, n_conc, floor=floor) + (floor.rows() if floor else [])
            finally:
                if floor is not None:
                    floor.close()

        doc["rows"] += section("latency", lat) or []
        doc["rows"] += section("ipam", lambda: ipam_rows(bed, n_serial)) or []
        save()  # partial results survive an interrupted run

        def st() -> list[dict[str, Any]]:
            rows, doc["imports"] = startup_rows(5 if q else 30)
            settle_ovs(bed)  # after the c=8 rows ovs-vswitchd may still be catching up
            doc["phases"] = phase_breakdown(bed)
            return rows

        doc["rows"] += section("startup", st) or []
        doc["rows"] += section("scale", lambda: scale_rows(bed, scale_counts, 5 if q else 20)) or []
        doc["rows"] += section("probes", lambda: probe_rows(bed, 5 if q else 20, n_conc)) or []
        if "floor" in only and "latency" not in only:  # else measured with the serial latency rows
            floor_n = 10 if q else 100
            settle_ovs(bed)
            u = bed.underlay.bridge if bed is not None else ""
            doc["rows"] += section("floor", lambda: floor_rows(u, bed.netns, work, floor_n)) or []
    finally:
        if bed is not None:
            bed.close()
    from bench.ipamd_rows import cluster_rows, ipamd_rows

    doc["rows"] += section("ipamd", lambda: ipamd_rows(work, q)) or []
    doc["rows"] += section("cluster", lambda: cluster_rows(work, q)) or []
    md = save()
    print(md)
    print(f"bench: wrote {RESULTS}/bench-{stamp}.md and .json (work dir {work})", file=sys.stderr)
    return 2 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
