"""Rows 1, 2, 4 and 6: ADD/DEL latency and CPU of the frozen `ovs-underlay` (warm path and
in-process) next to the reference `bridge` + `host-local`, the reference `bridge` with
`ovs-underlay-ipam` as its IPAM (warm path and in-process), port-count scale, probe cost.

Set-up comes from testbed/netbed.py (underlay bridge + ToR + router netns, ipamd process, pod
netns); every object carries the bench's token and is removed in `Bed.close()`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import DIST, FROZEN, REF_DIR, Exec, children_cpu_ms, netbed, run_exec, summary

VLAN = 100
SUBNET, GATEWAY = "10.77.0.0/16", "10.77.0.1"


class Bed:
    def __init__(self, work: Path, n_netns: int) -> None:
        self.work = work
        self.cleanup: list[Any] = []
        self.cleanup.append(lambda: netbed.plugin_log("bench").unlink(missing_ok=True))
        self.underlay = netbed.make_underlay({VLAN: [f"{GATEWAY}/16"]})
        self.cleanup.append(self.underlay.destroy)
        (work / "ipamd").mkdir(parents=True, exist_ok=True)
        self.ipamd = netbed.start_ipamd(str(work / "ipamd"))
        self.cleanup.append(self.ipamd.stop)
        self.warm_sock = str(work / "warm" / "cni-warm.sock")
        log = open(work / "warm-server.log", "ab")  # noqa: SIM115
        self.warm = subprocess.Popen(
            [str(FROZEN), "--warm-server", "--socket", self.warm_sock], stdout=log, stderr=log
        )
        log.close()
        self.cleanup.append(self._stop_warm)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.warm_sock):
            if self.warm.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"warm server did not start: {(work / 'warm-server.log').read_text()}")
            time.sleep(0.02)
        self.ref_bridge = netbed.uniq("rb")
        self.cleanup.append(lambda: netbed.delete_link(self.ref_bridge))
        self.ipam_bridge = netbed.uniq("ib")  # the reference bridge plugin with ovs-underlay-ipam
        self.cleanup.append(lambda: netbed.delete_link(self.ipam_bridge))
        self.netns: list[netbed.Netns] = []
        for _ in range(n_netns):
            ns = netbed.make_netns("b")
            self.netns.append(ns)
            self.cleanup.append(ns.delete)

    def _stop_warm(self) -> None:
        if self.warm.poll() is None:
            self.warm.terminate()
            try:
                self.warm.wait(10)
            except subprocess.TimeoutExpired:
                self.warm.kill()
                self.warm.wait()

    def close(self) -> None:
        for fn in reversed(self.cleanup):
            with contextlib.suppress(Exception):
                fn()

    # ---- configs ----------------------------------------------------------------------------

    def conf(self, mode: str, *, bridge: str | None = None, probes: bool = False) -> dict[str, Any]:
        if mode.startswith("ipam-"):  # the reference bridge plugin, our IPAM plugin (no probes: as ref)
            return {
                "cniVersion": "1.0.0",
                "name": f"bipam{netbed.TOKEN}",
                "type": "bridge",
                "bridge": self.ipam_bridge,
                "ipam": {
                    "type": "ovs-underlay-ipam",
                    "daemonSocket": self.ipamd.socket,
                    "subnets": [{"subnet": "10.79.0.0/16", "gateway": "10.79.0.1"}],
                    "gatewayCheck": False,
                    "conflictCheck": False,
                },
            }
        if mode == "ref":
            return {
                "cniVersion": "1.0.0",
                "name": f"ref{netbed.TOKEN}",
                "type": "bridge",
                "bridge": self.ref_bridge,
                "ipam": {
                    "type": "host-local",
                    "subnet": "10.78.0.0/16",
                    "dataDir": str(self.work / "host-local"),
                },
            }
        return {
            "cniVersion": "1.1.0",
            "name": f"bench{netbed.TOKEN}",
            "type": "ovs-underlay",
            "bridge": bridge or self.underlay.bridge,
            "vlan": VLAN,
            "ipam": {
                "type": "ovs-underlay-ipam",
                "daemonSocket": self.ipamd.socket,
                "subnets": [{"subnet": SUBNET, "gateway": GATEWAY}],
                "gatewayCheck": probes,
                "gatewayCheckTimeoutMs": 1000,
                "conflictCheck": probes,
                "conflictCheckWaitMs": PROBE_WAIT_MS,
            },
        }

    def invoke(self, mode: str, command: str, conf: dict[str, Any], cid: str, ns: netbed.Netns) -> Exec:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": ns.path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": f"{DIST}:{REF_DIR}" if mode.startswith("ipam-") else REF_DIR,
            "OVS_UNDERLAY_LOG_FILE": str(netbed.plugin_log("bench")),
            "OVS_UNDERLAY_WARM_SOCKET": self.warm_sock,
            "OVS_UNDERLAY_WARM": "0" if mode.endswith("inproc") else "1",
        }
        argv = [f"{REF_DIR}/bridge"] if mode == "ref" or mode.startswith("ipam-") else [str(FROZEN)]
        return run_exec(argv, env, json.dumps(conf).encode())


PROBE_WAIT_MS = 100
MODES = ("ref", "warm", "inproc")


def _batch(
    bed: Bed, mode: str, command: str, conf: dict[str, Any], pods: list[tuple[str, netbed.Netns]], conc: int
) -> tuple[list[Exec], float]:
    t0 = time.perf_counter()
    if conc <= 1:
        res = [bed.invoke(mode, command, conf, cid, ns) for cid, ns in pods]
    else:
        with concurrent.futures.ThreadPoolExecutor(conc) as ex:
            res = list(ex.map(lambda p: bed.invoke(mode, command, conf, p[0], p[1]), pods))
    return res, time.perf_counter() - t0


def _row(name: str, res: list[Exec], wall_s: float, extra_cpu_ms: float = 0.0) -> dict[str, Any]:
    ok = [r for r in res if r.code == 0]
    row: dict[str, Any] = {
        "row": name,
        **summary([r.wall_ms for r in ok]),
        "failed": len(res) - len(ok),
        "per_s": len(res) / wall_s if wall_s else 0.0,
        "cpu_ms": (sum(r.cpu_ms for r in res) + extra_cpu_ms) / max(1, len(res)),
    }
    bad = next((r for r in res if r.code != 0), None)
    if bad is not None:
        row["first_error"] = (bad.stdout.strip() or bad.stderr.strip())[-400:]
    return row


def latency_rows(bed: Bed, n_serial: int, n_conc: int, conc: int = 8) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        conf = bed.conf(mode)
        for label, n, c in (("serial", n_serial, 1), (f"conc{conc}", n_conc, conc)):
            pods = [(netbed.container_id("b"), bed.netns[i]) for i in range(n)]
            for command in ("ADD", "DEL"):
                cpu0 = children_cpu_ms(bed.warm.pid) if mode == "warm" else 0.0
                res, wall = _batch(bed, mode, command, conf, pods, c)
                worker_cpu = children_cpu_ms(bed.warm.pid) - cpu0 if mode == "warm" else 0.0
                rows.append(_row(f"{command} {label} {mode}", res, wall, worker_cpu))
    return rows


def ipam_rows(bed: Bed, n: int) -> list[dict[str, Any]]:
    """`bridge` + ovs-underlay-ipam (warm path, in-process) next to `bridge` + host-local, serial."""
    rows = []
    for mode in ("ref", "ipam-warm", "ipam-inproc"):
        conf = bed.conf(mode)
        pods = [(netbed.container_id("i"), bed.netns[i]) for i in range(n)]
        for command in ("ADD", "DEL"):
            cpu0 = children_cpu_ms(bed.warm.pid) if mode == "ipam-warm" else 0.0
            res, wall = _batch(bed, mode, command, conf, pods, 1)
            worker_cpu = children_cpu_ms(bed.warm.pid) - cpu0 if mode == "ipam-warm" else 0.0
            rows.append(_row(f"{command} serial {'ref (ipam rows)' if mode == 'ref' else mode}", res, wall,
                             worker_cpu))
    return rows


def scale_rows(bed: Bed, counts: list[int], samples: int) -> list[dict[str, Any]]:
    """ADD/DEL with k ports already on a bridge, and OVS's own raw port-add cost at k."""
    br = netbed.make_bridge("sc")
    rows: list[dict[str, Any]] = []
    try:
        have = 0
        conf = bed.conf("warm", bridge=br)
        for k in counts:
            names = [f"d{netbed.TOKEN}{i:05d}" for i in range(have, k)]
            for i in range(0, len(names), 200):
                args: list[str] = []
                for n in names[i : i + 200]:
                    args += ["--", "add-port", br, n, "--", "set", "Interface", n, "type=internal"]
                netbed.sh("ovs-vsctl", "--timeout=120", *args, timeout=180)
            have = k
            raw = []
            for j in range(samples):
                n = f"r{netbed.TOKEN}{j:04d}"
                t0 = time.perf_counter()
                netbed.sh(
                    "ovs-vsctl",
                    "--timeout=30",
                    "add-port",
                    br,
                    n,
                    "--",
                    "set",
                    "Interface",
                    n,
                    "type=internal",
                )
                while netbed.sh("ovs-vsctl", "get", "Interface", n, "ofport").stdout.strip() in (
                    "[]",
                    "-1",
                    "",
                ):
                    time.sleep(0.001)
                raw.append((time.perf_counter() - t0) * 1000)
                netbed.sh("ovs-vsctl", "--timeout=30", "del-port", br, n)
            rows.append({"row": f"raw OVS port add (ofport) @{k}", **summary(raw), "failed": 0})
            pods = [(netbed.container_id("s"), bed.netns[i]) for i in range(samples)]
            for command in ("ADD", "DEL"):
                res, wall = _batch(bed, "warm", command, conf, pods, 1)
                rows.append(_row(f"{command} warm @{k} ports", res, wall))
    finally:
        netbed.delete_bridge(br)
    return rows


def probe_rows(bed: Bed, samples: int) -> list[dict[str, Any]]:
    rows = []
    for probes in (False, True):
        conf = bed.conf("warm", probes=probes)
        pods = [(netbed.container_id("p"), bed.netns[i]) for i in range(samples)]
        res, wall = _batch(bed, "warm", "ADD", conf, pods, 1)
        rows.append(_row(f"ADD warm probes {'on' if probes else 'off'}", res, wall))
        _batch(bed, "warm", "DEL", conf, pods, 1)
    return rows
