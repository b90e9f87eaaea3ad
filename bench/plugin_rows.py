"""Rows 1, 2, 4 and 6: ADD/DEL latency and CPU of the frozen `ovs-underlay` (warm path and
in-process) next to the reference `bridge` + `host-local`, the reference `bridge` with
`ovs-underlay-ipam` as its IPAM (warm path and in-process), port-count scale, probe cost (probes
off, the defaults with the pre-probed pool warm, a cold pool), and the OVS floor (bench/floor.py).
Every warm row also carries the median of each ADD phase, read from the plugin's `phases:` log
lines of that row's calls.

Set-up comes from testbed/netbed.py (underlay bridge + ToR + router netns, ipamd process, pod
netns); every object carries the bench's token and is removed in `Bed.close()`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import statistics
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
        self.log = netbed.plugin_log("bench")  # the plugin's log (phases: lines), as OVS_UNDERLAY_LOG_FILE
        self.cleanup: list[Any] = []
        self.cleanup.append(lambda: self.log.unlink(missing_ok=True))
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
        self.log_mark = 0
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

    def conf(self, mode: str, *, bridge: str | None = None, probes: bool = False,
             ipamd: netbed.Ipamd | None = None, name: str = "") -> dict[str, Any]:
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
            "name": name or f"bench{netbed.TOKEN}",
            "type": "ovs-underlay",
            "bridge": bridge or self.underlay.bridge,
            "vlan": VLAN,
            "ipam": {
                "type": "ovs-underlay-ipam",
                "daemonSocket": (ipamd or self.ipamd).socket,
                "subnets": [{"subnet": SUBNET, "gateway": GATEWAY}],
                "gatewayCheck": probes,
                "gatewayCheckTimeoutMs": 1000,
                "conflictCheck": probes,
                "conflictCheckWaitMs": PROBE_WAIT_MS,
            },
        }

    def invoke(self, mode: str, command: str, conf: dict[str, Any], cid: str, ns: netbed.Netns,
               ifname: str = "eth0") -> Exec:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": ns.path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": f"{DIST}:{REF_DIR}" if mode.startswith("ipam-") else REF_DIR,
            "OVS_UNDERLAY_LOG_FILE": str(self.log),
            "OVS_UNDERLAY_WARM_SOCKET": self.warm_sock,
            "OVS_UNDERLAY_WARM": "0" if mode.endswith("inproc") else "1",
        }
        argv = [f"{REF_DIR}/bridge"] if mode == "ref" or mode.startswith("ipam-") else [str(FROZEN)]
        return run_exec(argv, env, json.dumps(conf).encode())


PROBE_WAIT_MS = 100
MODES: tuple[str, ...] = ("ref", "warm", "inproc")


def _batch(
    bed: Bed, mode: str, command: str, conf: dict[str, Any], pods: list[tuple[str, netbed.Netns]], conc: int,
    ifname: str = "eth0",
) -> tuple[list[Exec], float]:
    bed.log_mark = _log_size(bed)
    t0 = time.perf_counter()
    if conc <= 1:
        res = [bed.invoke(mode, command, conf, cid, ns, ifname) for cid, ns in pods]
    else:
        with concurrent.futures.ThreadPoolExecutor(conc) as ex:
            res = list(ex.map(lambda p: bed.invoke(mode, command, conf, p[0], p[1], ifname), pods))
    return res, time.perf_counter() - t0


def _log_size(bed: Bed) -> int:
    try:
        return bed.log.stat().st_size
    except OSError:
        return 0


def _phases(bed: Bed, command: str, ids: set[str] | None = None) -> dict[str, float]:
    """Median ms of each phase of the `command` calls logged since the last _batch began (of
    the containers `ids` only, when given)."""
    try:
        with open(bed.log, "rb") as fh:
            fh.seek(bed.log_mark)
            text = fh.read().decode(errors="replace")
    except OSError:
        return {}
    runs = [dict((k, float(v)) for k, v in re.findall(r"(\w+)=([\d.]+)ms", line.split(" phases: ", 1)[1]))
            for line in text.splitlines() if f"{command} phases: " in line
            and (ids is None or _cid(line) in ids)]
    names = list(dict.fromkeys(k for r in runs for k in r))
    return {k: round(statistics.median(r.get(k, 0.0) for r in runs), 2) for k in names} if runs else {}


def _cid(line: str) -> str:
    m = re.search(r"container_id=(\S+)", line)
    return m.group(1) if m else ""


def _row(name: str, res: list[Exec], wall_s: float, extra_cpu_ms: float = 0.0,
         bed: Bed | None = None, ids: set[str] | None = None) -> dict[str, Any]:
    ok = [r for r in res if r.code == 0]
    row: dict[str, Any] = {
        "row": name,
        **summary([r.wall_ms for r in ok]),
        "failed": len(res) - len(ok),
        "per_s": len(res) / wall_s if wall_s else 0.0,
        "cpu_ms": (sum(r.cpu_ms for r in res) + extra_cpu_ms) / max(1, len(res)),
    }
    command = name.split(" ", 1)[0]
    if bed is not None and command in ("ADD", "DEL"):
        phases = _phases(bed, command, ids)
        if phases:
            row["phases"] = phases
    bad = next((r for r in res if r.code != 0), None)
    if bad is not None:
        row["first_error"] = (bad.stdout.strip() or bad.stderr.strip())[-400:]
    return row


def latency_rows(bed: Bed, n_serial: int, n_conc: int, conc: int = 8,
                 floor: Any = None) -> list[dict[str, Any]]:
    """ADD and DEL of each mode, serial and at concurrency `conc`. The machine is shared, so the
    modes are interleaved and see the same load: the pods go in rounds (20 serially, 50 at
    `conc`), each mode adding then deleting its round's pods in turn (the order rotating from
    round to round), and serially the OVS floor's samples follow each round (bench/floor.py).
    So every mode and the floor see the same number of ports on the bridge (0 to the round's
    size: ovs-vswitchd reconfigures the whole bridge per port) and nothing of another mode's."""
    rows = []
    confs = {mode: bed.conf(mode) for mode in MODES}
    for label, n, c, size in (("serial", n_serial, 1, 20), (f"conc{conc}", n_conc, conc, 50)):
        pods = {m: [(netbed.container_id(m[0] + "b"), bed.netns[i]) for i in range(n)] for m in MODES}
        res: dict[tuple[str, str], list[Exec]] = {(cmd, m): [] for cmd in ("ADD", "DEL") for m in MODES}
        wall: dict[tuple[str, str], float] = dict.fromkeys(res, 0.0)
        cpu: dict[tuple[str, str], float] = dict.fromkeys(res, 0.0)
        mark = _log_size(bed)
        size = min(size, n)
        for r, k in enumerate(range(0, n, size)):
            for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
                for command in ("ADD", "DEL"):
                    cpu0 = children_cpu_ms(bed.warm.pid)
                    got, w = _batch(bed, mode, command, confs[mode], pods[mode][k:k + size], c)
                    if mode == "warm":
                        time.sleep(0.1)  # the last workers are reaped (their CPU counted) after they answered
                        cpu[(command, mode)] += children_cpu_ms(bed.warm.pid) - cpu0
                    res[(command, mode)] += got
                    wall[(command, mode)] += w
            if floor is not None and c == 1:
                for i in range(k, min(n, k + size)):
                    floor.sample(i)
                floor.remove_all()
        for command in ("ADD", "DEL"):
            for mode in MODES:
                bed.log_mark = mark
                ids = {cid for cid, _ in pods[mode]}
                key = (command, mode)
                rows.append(_row(f"{command} {label} {mode}", res[key], wall[key], cpu[key],
                                 bed if mode != "ref" else None, ids))
    return rows


def _raw_port_add(bridge: str, name: str) -> float:
    """ms for OVS alone to add an internal port until its ofport is set: one insert
    transaction and one wait (core.ovsdb, as the floor; not ovs-vsctl, whose own process start
    and database sync cost more than an ADD). The port is removed afterwards, untimed."""
    from core.ovsdb import NamedUuid, OvsdbClient, Step, eq, op_insert, op_mutate, op_wait, to_datum

    with OvsdbClient("unix:/run/openvswitch/db.sock", "Open_vSwitch") as ovs:
        t0 = time.perf_counter()
        ovs.transact([
            Step(op_insert("Interface", {"name": name, "type": "internal"}, "i"), "insert interface"),
            Step(op_insert("Port", {"name": name, "interfaces": [NamedUuid("i")]}, "p"), "insert port"),
            Step(op_mutate("Bridge", [eq("name", bridge)], [["ports", "insert", to_datum([NamedUuid("p")])]]),
                 "attach", count=1)])
        unset = [{"ofport": to_datum([])}]
        ovs.transact([Step(op_wait("Interface", [eq("name", name)], ["ofport"], "!=", unset, 30_000),
                           "wait for ofport")])
        ms = (time.perf_counter() - t0) * 1000
    netbed.sh("ovs-vsctl", "--timeout=30", "del-port", bridge, name)
    return ms


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
            raw = [_raw_port_add(br, f"r{netbed.TOKEN}{j:04d}") for j in range(samples)]
            rows.append({"row": f"raw OVS port add (ofport) @{k}", **summary(raw), "failed": 0})
            pods = [(netbed.container_id("s"), bed.netns[i]) for i in range(samples)]
            for command in ("ADD", "DEL"):
                res, wall = _batch(bed, "warm", command, conf, pods, 1)
                rows.append(_row(f"{command} warm @{k} ports", res, wall))
    finally:
        netbed.delete_bridge(br)
    return rows


def settle_ovs(bed: Bed, limit_s: float = 60.0) -> float:
    """Wait until ovs-vswitchd is idle again (after a section that added or removed hundreds of
    ports it reconfigures for many seconds, and rows measured meanwhile would time out): until
    an `ovs-vsctl add-port` (which waits for ovs-vswitchd to apply it) returns within 100 ms
    twice in a row. Returns the seconds waited."""
    t0 = time.monotonic()
    quick = 0
    i = 0
    while quick < 2 and time.monotonic() - t0 < limit_s:
        name = f"s{netbed.TOKEN}{i:04d}"
        i += 1
        t1 = time.perf_counter()
        netbed.sh("ovs-vsctl", "--timeout=30", "add-port", bed.underlay.bridge, name, "--",
                  "set", "Interface", name, "type=internal")
        quick = quick + 1 if (time.perf_counter() - t1) * 1000 < 100 else 0
        netbed.sh("ovs-vsctl", "--timeout=30", "--if-exists", "del-port", bed.underlay.bridge, name)
        time.sleep(0.2)
    return time.monotonic() - t0


def probe_rows(bed: Bed, samples: int, n_conc: int = 0) -> list[dict[str, Any]]:
    """The probes' cost: off; the defaults (conflict and gateway checks on, the gateway
    answering, the pre-probed pool warm: ADD takes fresh candidates, the gateway is answered by
    ipamd's probe port); a cold pool (a second ipamd keeping no candidates: every address is
    probed when it is handed out, from the probe port). And the defaults at concurrency 8."""
    cold = netbed.start_ipamd(str(bed.work / "ipamd-cold"), ["--probe-candidates", "0"])
    settle_ovs(bed)
    try:
        cases = [("probes off", bed.conf("warm", probes=False, name=f"poff{netbed.TOKEN}")),
                 ("defaults", bed.conf("warm", probes=True, name=f"pdef{netbed.TOKEN}")),
                 ("cold pool", bed.conf("warm", probes=True, ipamd=cold, name=f"pcold{netbed.TOKEN}"))]
        rows = []
        for label, conf in cases:
            _warm_up(bed, conf)
            pods = [(netbed.container_id("p"), bed.netns[i]) for i in range(samples)]
            cpu0 = children_cpu_ms(bed.warm.pid)
            res, wall = _batch(bed, "warm", "ADD", conf, pods, 1)
            rows.append(_row(f"ADD warm {label}", res, wall, children_cpu_ms(bed.warm.pid) - cpu0, bed))
            _batch(bed, "warm", "DEL", conf, pods, 1)
        if n_conc:
            conf = cases[1][1]
            _warm_up(bed, conf)
            # in rounds of 50 as the conc8 latency rows (the same number of ports on the bridge)
            pods = [(netbed.container_id("q"), bed.netns[i]) for i in range(n_conc)]
            res, wall, cpu, mark = [], 0.0, 0.0, _log_size(bed)
            for k in range(0, n_conc, 50):
                cpu0 = children_cpu_ms(bed.warm.pid)
                got, w = _batch(bed, "warm", "ADD", conf, pods[k:k + 50], 8)
                time.sleep(0.1)  # the last workers are reaped (their CPU counted) after they answered
                res, wall, cpu = res + got, wall + w, cpu + children_cpu_ms(bed.warm.pid) - cpu0
                _batch(bed, "warm", "DEL", conf, pods[k:k + 50], 8)
            bed.log_mark = mark
            rows.append(_row("ADD conc8 warm defaults", res, wall, cpu, bed, {cid for cid, _ in pods}))
    finally:
        cold.stop()
    return rows


def _warm_up(bed: Bed, conf: dict[str, Any]) -> None:
    """One ADD and DEL on the network (ipamd learns its segment and makes the probe port), then
    time for the background probes to make the next candidates fresh and the gateway answered."""
    pods = [(netbed.container_id("w"), bed.netns[0])]
    _batch(bed, "warm", "ADD", conf, pods, 1)
    _batch(bed, "warm", "DEL", conf, pods, 1)
    time.sleep(1.5)
