"""`make soak`: ADD/DEL churn through the frozen plugin with faults, then one reconcile, and the
books must balance. A report, never a CI gate; its one-minute version with real assertions is
tests/integration/test_soak.py (same code, `SoakConfig.quick()`).

The bed (testbed/cninode.py): one node (its own netns and Open vSwitch), the frozen ipamd with
its state dir on a small tmpfs and its reconciler on (short interval and grace, so it runs beside
the churn), the frozen warm server, and the frozen native client `ovs-underlay` for every call.
The harness plays the runtime: 8 workers each make a netns, ADD, hold the pod a moment, DEL
(retrying a failed DEL as kubelet does) and delete the netns; after a failed or killed ADD they
DEL, as a runtime must. A few pods are "forgotten" (netns deleted, no DEL: what Multus does when
its cache is gone) for the reconciler to find.

Faults at random moments, one at a time, each followed by its recovery (as systemd would):
kill -9 of a plugin call in flight; kill -9 of the warm server (restarted); kill -9 of ipamd
(restarted); an OVS restart (ovsdb-server and ovs-vswitchd); the state dir filled to the last
byte for a few seconds.

Checked while it runs: at every successful ADD, no live pod already holds one of its addresses;
every `sample_every_s`, ipamd's active leases hold no address twice and every live pod still
holds its lease (a reconciler must never free a live pod's address). Checked at the end, after
one `reconcile --grace-seconds 0`: no lease, OVS port, host veth or netns file of ours is left,
no daemon holds a netns handle, and every failed call answered with a CNI error JSON (calls the
harness killed excepted).

Writes bench/results/soak-<timestamp>.{md,json} and soak-latest.md. Exit 0 when the books
balance, 1 when they do not, 2 when the harness broke.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import machine, summary
from testbed import netbed
from testbed.cninode import Call, CniNode, make_cni_node

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FAULTS = ("kill-plugin", "kill-warm", "kill-ipamd", "restart-ovs", "fill-state")


@dataclass(frozen=True)
class SoakConfig:
    ops: int = 10_000  # plugin calls (ADD and DEL, DEL retries included)
    duration_s: float = 0.0  # > 0: stop after this long instead
    concurrency: int = 8
    fault_gap_s: tuple[float, float] = (4.0, 12.0)  # random pause between two faults
    forget_del: float = 0.02  # share of pods whose DEL never comes
    hold_s: tuple[float, float] = (0.0, 0.3)  # how long a pod lives
    sample_every_s: float = 1.0
    subnet: str = "10.250.0.0/23"
    cooldown_s: int = 5
    reconcile_interval_s: int = 5  # ipamd's periodic reconciler runs beside the churn
    reconcile_grace_s: int = 10
    fill_hold_s: tuple[float, float] = (2.0, 5.0)
    state_tmpfs_mb: int = 16
    del_attempts: int = 8
    seed: int = 0

    @staticmethod
    def quick(duration_s: float = 60.0, seed: int = 0) -> SoakConfig:
        """The one-minute version (make test): every fault at least once."""
        return SoakConfig(ops=0, duration_s=duration_s, fault_gap_s=(2.5, 5.0), forget_del=0.05, seed=seed)


@dataclass
class Pod:
    cid: str
    netns: netbed.Netns
    ips: tuple[str, ...] = ()
    add_done: float = 0.0  # monotonic; 0 = not (yet) live
    gone_at: float = 0.0  # DEL started or netns deleted


@dataclass
class Stats:
    calls: list[dict[str, Any]] = field(default_factory=list)  # every finished call
    faults: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    sample_errors: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost_leases: list[str] = field(default_factory=list)
    add_checks: int = 0
    forgotten: int = 0
    del_gave_up: int = 0
    pods: int = 0
    harness_errors: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, cfg: SoakConfig, work: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.rng = random.Random(cfg.seed)
        self.net = f"soak{netbed.TOKEN}"
        self.stats = Stats()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.live: dict[str, Pod] = {}  # cid -> pod whose ADD succeeded and whose DEL has not begun
        self.inflight: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
        self.killed: set[int] = set()  # pids the fault thread killed
        self.ops = 0
        self.t0 = 0.0
        self.cn: CniNode | None = None
        self.state_dir = work / "state"
        self.conf: dict[str, Any] = {}
        self.machine: dict[str, Any] = {}

    # ---- bed ---------------------------------------------------------------------------------------

    def setup(self) -> CniNode:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        netbed.sh("mount", "-t", "tmpfs", "-o", f"size={self.cfg.state_tmpfs_mb}m,mode=0700", "tmpfs",
                  str(self.state_dir))
        args = ("--reconcile-interval", str(self.cfg.reconcile_interval_s),
                "--reconcile-grace", str(self.cfg.reconcile_grace_s))
        self.cn = make_cni_node("sk", self.work / "node", frozen=True, warm=True, ipamd_args=args,
                                state_dir=self.state_dir)
        self.conf = self.cn.conf(self.net, self.cfg.subnet, cooldownSeconds=self.cfg.cooldown_s)
        return self.cn

    def teardown(self) -> None:
        if self.cn is not None:
            self.cn.destroy()
        subprocess.run(["umount", str(self.state_dir)], capture_output=True, check=False)

    # ---- the runtime's side ----------------------------------------------------------------------

    def _call(self, command: str, pod: Pod) -> Call:
        assert self.cn is not None
        t = time.monotonic()
        proc, data = self.cn.spawn(command, self.conf, pod.cid, pod.netns.path)
        with self.lock:
            self.inflight[proc.pid] = (proc, command)
            self.ops += 1
        try:
            out, err = proc.communicate(data, timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        finally:
            with self.lock:
                self.inflight.pop(proc.pid, None)
                killed = proc.pid in self.killed
        c = Call(command, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                 (time.monotonic() - t) * 1000, killed)
        rec = {"command": command, "rc": c.rc, "ms": round(c.ms, 1), "killed": killed,
               "t": round(t - self.t0, 2)}
        if c.rc != 0 and not killed:
            doc = c.json()
            rec["code"] = doc.get("code") if isinstance(doc, dict) else None
            rec["error_json"] = c.error_json()
            if not c.error_json():
                rec["stdout"], rec["stderr"] = c.stdout[-500:], c.stderr[-1500:]
        rec["traceback"] = "Traceback (most recent call last)" in c.stderr
        with self.lock:
            self.stats.calls.append(rec)
        return c

    def _done(self) -> bool:
        if self.stop.is_set():
            return True
        if self.cfg.duration_s > 0:
            return time.monotonic() - self.t0 >= self.cfg.duration_s
        return self.ops >= self.cfg.ops

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._done():
            try:
                self._cycle(rng)
            except Exception:
                with self.lock:
                    self.stats.harness_errors.append(traceback.format_exc())
                time.sleep(0.5)

    def _cycle(self, rng: random.Random) -> None:
        pod = Pod(netbed.container_id("s"), netbed.make_netns("s"))
        with self.lock:
            self.stats.pods += 1
        try:
            add = self._call("ADD", pod)
            if add.rc == 0 and not add.killed:
                self._went_live(pod, add)
                time.sleep(rng.uniform(*self.cfg.hold_s))
                if rng.random() < self.cfg.forget_del:
                    self._gone(pod)  # the runtime lost it: only the reconciler will clean up
                    with self.lock:
                        self.stats.forgotten += 1
                    return
            self._gone(pod)
            for attempt in range(self.cfg.del_attempts):
                d = self._call("DEL", pod)
                if d.rc == 0 and not d.killed:
                    return
                time.sleep(min(0.25 * (attempt + 1), 2.0))
            with self.lock:
                self.stats.del_gave_up += 1  # as Multus does; the reconciler's job now
        finally:
            pod.netns.delete()

    def _went_live(self, pod: Pod, add: Call) -> None:
        doc = add.json() or {}
        pod.ips = tuple(str(ip.get("address", "")).split("/")[0] for ip in doc.get("ips", []))
        with self.lock:
            self.stats.add_checks += 1
            if not pod.ips:
                self.stats.harness_errors.append(f"ADD {pod.cid} gave no addresses: {add.stdout[:300]}")
            holders = {ip: p.cid for p in self.live.values() for ip in p.ips}
            for ip in pod.ips:
                if ip in holders:
                    self.stats.duplicates.append(f"ADD of {pod.cid} got {ip}, held by live pod {holders[ip]}")
            pod.add_done = time.monotonic()
            self.live[pod.cid] = pod

    def _gone(self, pod: Pod) -> None:
        with self.lock:
            pod.gone_at = time.monotonic()
            self.live.pop(pod.cid, None)

    # ---- checks while it runs ----------------------------------------------------------------------

    def sampler(self) -> None:
        from core.ipamd_client import IpamClient

        assert self.cn is not None
        while not self.stop.wait(self.cfg.sample_every_s):
            t0 = time.monotonic()
            with self.lock:
                live = [p for p in self.live.values() if p.add_done and p.add_done < t0]
            try:
                with IpamClient(self.cn.ipamd.socket, timeout_ms=3000) as c:
                    leases = c.list_leases(network=self.net)
            except Exception:
                with self.lock:
                    self.stats.sample_errors += 1  # ipamd restarting: no sample
                continue
            held: dict[str, str] = {}
            dup = []
            for lease in leases:
                for ipc in lease.ips:
                    ip = ipc.address.split("/")[0]
                    if ip in held:
                        dup.append(f"sample: {ip} leased to {held[ip]} and {lease.container_id}")
                    held[ip] = lease.container_id
            lost = []
            for p in live:
                with self.lock:
                    still = p.cid in self.live  # its DEL had not begun when the listing ended
                if still and p.gone_at == 0 and any(held.get(ip) != p.cid for ip in p.ips):
                    lost.append(f"sample: live pod {p.cid} {p.ips} has no lease (leases: "
                                f"{[held.get(ip) for ip in p.ips]})")
            with self.lock:
                self.stats.samples += 1
                self.stats.duplicates += dup
                self.stats.lost_leases += lost

    # ---- faults ------------------------------------------------------------------------------------

    def faults(self) -> None:
        order: list[str] = []
        while not self.stop.wait(self.rng.uniform(*self.cfg.fault_gap_s)):
            if self._done():
                return
            if not order:
                order = list(FAULTS)
                self.rng.shuffle(order)
            kind = order.pop()
            t = time.monotonic()
            try:
                detail = getattr(self, "_" + kind.replace("-", "_"))()
                ok = True
            except Exception:
                detail, ok = traceback.format_exc()[-1500:], False
            with self.lock:
                self.stats.faults.append({"fault": kind, "t": round(t - self.t0, 2), "ok": ok,
                                          "detail": detail, "recovery_s": round(time.monotonic() - t, 2)})

    def _kill_plugin(self) -> str:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self.lock:
                calls = list(self.inflight.items())
            if calls:
                pid, (_, command) = self.rng.choice(calls)
                time.sleep(self.rng.uniform(0, 0.05))  # somewhere inside the call
                with self.lock:
                    if pid not in self.inflight:
                        continue
                    self.killed.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                return f"{command} pid {pid}"
            time.sleep(0.01)
        return "no call in flight"

    def _kill_warm(self) -> str:
        assert self.cn is not None and self.cn.warm is not None and self.cn.warm.proc is not None
        pid = self.cn.warm.proc.pid
        self.cn.warm.proc.kill()
        self.cn.warm.proc.wait()
        time.sleep(self.rng.uniform(0.2, 1.0))
        self._start_warm()  # on the stale socket file, as systemd would
        return f"pid {pid}"

    def _start_warm(self) -> None:
        """Start the warm server and wait until it accepts (its socket file may be stale)."""
        import socket

        assert self.cn is not None and self.cn.warm is not None
        self.cn.warm.start()
        deadline = time.monotonic() + 30
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(self.cn.warm.path)
                    return
                except OSError as exc:
                    assert self.cn.warm.proc is not None
                    if self.cn.warm.proc.poll() is not None or time.monotonic() > deadline:
                        log = self.cn.warm.log.read_text()[-2000:]
                        raise RuntimeError(f"warm server did not come back: {log}") from exc
            time.sleep(0.05)

    def _kill_ipamd(self) -> str:
        assert self.cn is not None and self.cn.ipamd.proc is not None
        pid = self.cn.ipamd.proc.pid
        self.cn.ipamd.proc.kill()
        self.cn.ipamd.proc.wait()
        time.sleep(self.rng.uniform(0.2, 1.0))
        self._start_ipamd()
        return f"pid {pid}"

    def _start_ipamd(self) -> None:
        assert self.cn is not None
        for attempt in range(10):
            try:
                self.cn.ipamd.start()
                return
            except RuntimeError:
                if attempt == 9:
                    raise
                time.sleep(1)

    def _restart_ovs(self) -> str:
        assert self.cn is not None
        self.cn.node.restart_ovs()
        return "ovsdb-server + ovs-vswitchd"

    def _fill_state(self) -> str:
        """Fill ipamd's state dir to the last byte for a few seconds, then free it."""
        ballast = self.state_dir / "ballast"
        written = 0
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for size in (1 << 20, 1 << 12, 1):
                while True:
                    try:
                        n = os.write(fd, b"\0" * size)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
                    written += n
                    if n < size:
                        break
            time.sleep(self.rng.uniform(*self.cfg.fill_hold_s))
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                ballast.unlink()
        return f"{written / (1 << 20):.1f} MiB"

    # ---- the end -------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Every daemon up again, the state dir free: what an operator would see after the storm."""
        assert self.cn is not None
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "ballast").unlink()
        if not self.cn.node.ovs_running():
            self.cn.node.start_ovs()
        if self.cn.ipamd.proc is None or self.cn.ipamd.proc.poll() is not None:
            self._start_ipamd()
        warm = self.cn.warm
        if warm is not None and (warm.proc is None or warm.proc.poll() is not None):
            self._start_warm()

    def settle(self, timeout_s: float = 30) -> float:
        """Wait until the kernel has destroyed the deleted netns (their veth pairs go with them)."""
        assert self.cn is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if not self.cn.our_veths():
                break
            time.sleep(0.2)
        return time.monotonic() - t0

    def books(self) -> dict[str, Any]:
        assert self.cn is not None
        tok = f"t{netbed.TOKEN}"
        netns_left = [ln.split()[0] for ln in netbed.sh("ip", "netns", "list").stdout.splitlines()
                      if ln.split() and ln.split()[0].startswith(tok)
                      and ln.split()[0] not in (self.cn.ns, self.cn.ipamd.probe_netns)]
        daemons = {"ipamd": self.cn.ipamd.proc, "warm": self.cn.warm.proc if self.cn.warm else None}
        return {
            "leases": [f"{r['containerID']} {r['ip']}" for r in self.cn.active_leases()],
            "ports": [r["name"] for r in self.cn.our_ports()],
            "bridge_ports": self.cn.bridge_ports(),
            "veths": [f"{ln['ifname']} ({ln.get('ifalias')})" for ln in self.cn.our_veths()],
            "netns_files": netns_left,
            "netns_handles": {k: self.cn.nsfs_fds(p.pid) for k, p in daemons.items() if p is not None},
            "stray_processes": self._strays(),
        }

    def _strays(self) -> list[str]:
        """Plugin processes or warm workers still running after the churn."""
        assert self.cn is not None
        out = []
        res = subprocess.run(["pgrep", "-af", str(self.cn.work)], capture_output=True, text=True, check=False)
        daemons = {p.pid for p in (self.cn.ipamd.proc, self.cn.warm.proc if self.cn.warm else None) if p}
        for line in res.stdout.splitlines():
            pid = int(line.split()[0])
            if pid not in daemons and pid != os.getpid():
                out.append(line[:200])
        warm = self.cn.warm
        if warm is not None and warm.proc is not None and warm.proc.poll() is None:
            out += [f"warm worker {pid}" for pid in warm.children()]
        return out

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.machine = machine()  # with the load average at the start
        self.t0 = time.monotonic()
        threads = [threading.Thread(target=self.worker, args=(cfg.seed * 1000 + i,), name=f"pod-{i}")
                   for i in range(cfg.concurrency)]
        side = [threading.Thread(target=self.faults, name="faults"),
                threading.Thread(target=self.sampler, name="sampler")]
        for t in threads + side:
            t.start()
        for t in threads:
            t.join()
        churn_s = time.monotonic() - self.t0
        self.stop.set()
        for t in side:
            t.join()
        assert self.cn is not None
        self.recover()
        settle_s = self.settle()
        final = self.cn.reconcile("--grace-seconds", "0")
        settle2_s = self.settle(10)  # the veths of ports it removed go with their pairs
        books = self.books()
        return self.report(churn_s, settle_s + settle2_s, final, books)

    # ---- the report ----------------------------------------------------------------------------------

    def report(self, churn_s: float, settle_s: float, final: dict[str, Any],
               books: dict[str, Any]) -> dict[str, Any]:
        assert self.cn is not None
        calls = self.stats.calls
        by: Counter[str] = Counter()
        for c in calls:
            if c["killed"]:
                by[f"{c['command']} killed"] += 1
            elif c["rc"] == 0:
                by[f"{c['command']} ok"] += 1
            else:
                by[f"{c['command']} failed {c.get('code')}"] += 1
        not_json = [c for c in calls if c["rc"] != 0 and not c["killed"] and not c.get("error_json")]
        periodic: Counter[str] = Counter()
        pat = r"trigger=periodic step=(\w+) outcome=(done|failed) "
        for m in re.finditer(pat, Path(self.cn.ipamd.log_path).read_text()):
            periodic[f"{m.group(1)} {m.group(2)}"] += 1
        final_actions = Counter(f"{a['step']} {a['outcome']}" for a in final.get("actions", []))
        leaks = {k: v for k, v in books.items() if k != "netns_handles" and v}
        leaks.update({f"netns handles held by {k}": v for k, v in books["netns_handles"].items() if v})
        doc: dict[str, Any] = {
            "config": asdict(self.cfg),
            "machine": self.machine,
            "churn_s": round(churn_s, 1),
            "settle_s": round(settle_s, 1),
            "calls": len(calls),
            "calls_per_s": round(len(calls) / churn_s, 1) if churn_s else 0,
            "pods": self.stats.pods,
            "outcomes": dict(sorted(by.items())),
            "add_ms": summary([c["ms"] for c in calls if c["command"] == "ADD" and c["rc"] == 0]),
            "del_ms": summary([c["ms"] for c in calls if c["command"] == "DEL" and c["rc"] == 0]),
            "faults": dict(Counter(f["fault"] for f in self.stats.faults)),
            "faults_failed": [f for f in self.stats.faults if not f["ok"]],
            "fault_log": self.stats.faults,
            "forgotten_dels": self.stats.forgotten,
            "dels_given_up": self.stats.del_gave_up,
            "add_checks": self.stats.add_checks,
            "samples": self.stats.samples,
            "sample_errors": self.stats.sample_errors,
            "duplicates": self.stats.duplicates,
            "lost_leases": self.stats.lost_leases,
            "failed_without_error_json": not_json[:20],
            "failed_without_error_json_count": len(not_json),
            "tracebacks": sum(c["traceback"] for c in calls),
            "periodic_reconcile_actions": dict(sorted(periodic.items())),
            "final_reconcile_actions": dict(sorted(final_actions.items())),
            "final_reconcile": final,
            "books": books,
            "leaks": leaks,
            "harness_errors": self.stats.harness_errors[:10],
        }
        doc["balanced"] = not (doc["duplicates"] or doc["lost_leases"] or leaks or not_json
                               or doc["faults_failed"] or doc["harness_errors"])
        return doc


def run_soak(cfg: SoakConfig, work: Path, *, stop_on_signal: bool = False) -> dict[str, Any]:
    """Set the bed up, churn with faults, reconcile once, count; always tear the bed down.
    `stop_on_signal` (main thread only): SIGTERM or SIGINT ends the churn early, and the run
    still reconciles, counts and tears down (a second signal is not caught)."""
    soak = Soak(cfg, work)
    if stop_on_signal:
        def stop(signum: int, frame: object) -> None:
            print(f"soak: {signal.Signals(signum).name}: ending the churn", file=sys.stderr, flush=True)
            soak.stop.set()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)

        for sig in (signal.SIGTERM, signal.SIGINT):  # also when started with SIGINT ignored (`&`)
            signal.signal(sig, stop)
    try:
        soak.setup()
        return soak.run()
    finally:
        soak.stop.set()
        soak.teardown()


def markdown(doc: dict[str, Any]) -> str:
    m, cfg = doc["machine"], doc["config"]
    a, d = doc["add_ms"], doc["del_ms"]
    lines = [
        f"# ovs-underlay soak {doc.get('started', '')}",
        "",
        f"nproc {m['nproc']}, {m['cpu']}, kernel {m['kernel']}, {m['ovs']}; load average start "
        f"{m['loadavg_start']}, end {doc.get('loadavg_end')}",
        "",
        f"**{'BALANCED' if doc['balanced'] else 'NOT BALANCED'}**: {doc['calls']} plugin calls "
        f"({doc['pods']} pods) in {doc['churn_s']:.0f} s ({doc['calls_per_s']} calls/s) at concurrency "
        f"{cfg['concurrency']}, frozen plugin over the warm path; settle {doc['settle_s']} s.",
        "",
        "| check | count |",
        "|---|---|",
        f"| duplicate addresses (at {doc['add_checks']} ADDs and {doc['samples']} lease samples) | "
        f"{len(doc['duplicates'])} |",
        f"| live pods whose lease was gone at a sample | {len(doc['lost_leases'])} |",
        f"| failed calls without a CNI error JSON | {doc['failed_without_error_json_count']} |",
        f"| calls with a Python traceback on stderr | {doc['tracebacks']} |",
    ]
    for k in ("leases", "ports", "bridge_ports", "veths", "netns_files", "stray_processes"):
        lines.append(f"| leaked {k.replace('_', ' ')} after one reconcile | {len(doc['books'][k])} |")
    for k, v in doc["books"]["netns_handles"].items():
        lines.append(f"| netns handles held by {k} | {v} |")
    lines += ["", "| calls | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in doc["outcomes"].items()]
    lines += ["", f"ADD ok: p50 {a['p50']:.0f} ms, p99 {a['p99']:.0f} ms, max {a['max']:.0f} ms; "
              f"DEL ok: p50 {d['p50']:.0f} ms, p99 {d['p99']:.0f} ms, max {d['max']:.0f} ms.", ""]
    lines += ["| fault | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(doc["faults"].items())]
    lines += ["", f"DELs the runtime forgot: {doc['forgotten_dels']}; DELs given up after "
              f"{cfg['del_attempts']} attempts: {doc['dels_given_up']}; lease samples that found ipamd "
              f"down: {doc['sample_errors']}.", "",
              f"Periodic reconciler (interval {cfg['reconcile_interval_s']} s, grace "
              f"{cfg['reconcile_grace_s']} s) during the churn: "
              f"{doc['periodic_reconcile_actions'] or 'nothing'}; the final `reconcile --grace-seconds 0`: "
              f"{doc['final_reconcile_actions'] or 'nothing'}."]
    keys = ("duplicates", "lost_leases", "failed_without_error_json", "faults_failed", "harness_errors",
            "leaks")
    problems = [(k, doc[k]) for k in keys if doc[k]]
    for k, v in problems:
        lines += ["", f"## {k}", "", "```", json.dumps(v, indent=1, default=str)[:4000], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=10_000, help="plugin calls to make (default 10000)")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds instead")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (netns, veth, OVS, tmpfs)", file=sys.stderr)
        return 2
    from testbed.cninode import DIST

    if not (DIST / "ovs-underlay").exists():
        print(f"soak: {DIST} is missing: run `make binary`", file=sys.stderr)
        return 2
    cfg = SoakConfig(ops=a.ops, duration_s=a.duration, concurrency=a.concurrency, seed=a.seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    work = Path(tempfile.mkdtemp(prefix="ovs-underlay-soak-"))
    size = f"{cfg.duration_s:.0f} s" if cfg.duration_s else f"{cfg.ops} calls"
    print(f"soak: {size}, seed {cfg.seed}, work dir {work}", file=sys.stderr, flush=True)
    try:
        doc = run_soak(cfg, work, stop_on_signal=True)
    except Exception:
        print(f"soak: the harness broke:\n{traceback.format_exc()}", file=sys.stderr)
        return 2
    doc["started"], doc["loadavg_end"] = started, os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = markdown(doc)
    (RESULTS / f"soak-{stamp}.json").write_text(json.dumps(doc, indent=1, default=str))
    (RESULTS / f"soak-{stamp}.md").write_text(md)
    (RESULTS / "soak-latest.md").write_text(md)
    print(md)
    print(f"soak: wrote {RESULTS}/soak-{stamp}.md and .json", file=sys.stderr)
    return 0 if doc["balanced"] else 1


if __name__ == "__main__":
    sys.exit(main())
