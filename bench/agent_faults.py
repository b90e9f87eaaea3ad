"""`make bench-agent`: 100 fault-injected applies of the node agent; count the lost nodes.

A node made of namespaces (testbed/nodebed.py: its own ovsdb-server and ovs-vswitchd, NIC eth1
holding 172.31.0.11/24 + fd00:31::b/64 and the default routes, a trunk of a ToR whose router
holds the gateways) goes through N runs. Each run picks a start state (not applied / applied)
and a fault, injects it, then recovers the way an operator or `serve` would (apply again, or
remove again), and checks the node:
- kill9-apply:      SIGKILL at a random point of apply (before/after any step), then apply;
- dead-gateway:     the file names a gateway nobody answers: apply must roll back by itself;
- kill9-rollback:   dead gateway + SIGKILL at a random point of the rollback, then apply;
- ovs-restart:      OVS restarted (half the time with an empty database) while apply is stopped
                    at a random step; the agent is killed; then apply;
- ovsdb-down:       apply with ovsdb-server down (refused, nothing changed), OVS back, apply;
- kill9-remove:     (from applied) SIGKILL at a random point of remove, then remove again: the NIC
                    must be exactly its snapshot (ip -j oracle), then apply;
- reboot:           (from applied) the host config puts the addresses back on the NIC while the
                    bridge keeps the NIC: apply repairs;
A run "loses the node" when, after its recovery, the node cannot reach its gateway (IPv4 and
IPv6) or the network is not ready. A 10 ms ping runs through every run: the longest outage is
reported per fault (outages during an injected OVS outage are expected: the NIC is in the
bridge and its switch is down). Recovery retries a failed apply as `serve` does (4 attempts, 5 s
apart); a run that needed a retry is reported with whether a witness host on the node VLAN (no
agent) reached the gateway at that moment. Writes bench/results/agent-faults-<time>.{md,json}
and agent-faults-latest.md. Exit 0 when the harness ran and no node was lost, 1 when one was.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine
from testbed import netbed, nodebed
from testbed.agentbed import Agent, Pinger, iface_view, wait_stopped

RESULTS = ROOT / "bench" / "results"
GW4, GW6 = "172.31.0.1", "fd00:31::1"
APPLY_STEPS = [
    "snapshot",
    "prepare-nic",
    "create-bridge",
    "copy-addresses",
    "attach-nic",
    "move-routes",
    "move-rules",
    "clear-nic",
    "verify",
    "mark-ready",
]
RESTORE_STEPS = [
    "restore-nic-link",
    "restore-addresses",
    "restore-routes",
    "restore-rules",
    "detach-nic",
    "release-bridge",
    "restore-link-state",
    "check",
]
FROM_CLEAN = ["kill9-apply", "kill9-apply", "dead-gateway", "kill9-rollback", "ovs-restart", "ovsdb-down"]
FROM_APPLIED = ["kill9-remove", "reboot", "ovs-restart"]
ATTEMPTS, RETRY_S = 4, 5.0  # serve retries a failed apply (10 s, 20 s, ... backoff); this is quicker


def net(**kw: Any) -> dict[str, Any]:
    return {
        "name": "net1",
        "defaultInterface": "eth1",
        "datapathType": "netdev",
        "verify": {"timeoutMs": 2000},
        **kw,
    }


class Soak:
    def __init__(self, agent: Agent, rng: random.Random) -> None:
        self.agent, self.node, self.rng = agent, agent.node, rng
        self.snapshot = iface_view(self.node, "eth1")
        self.rollbacks: list[float] = []
        self.witness = ""  # netns of a plain host on the node VLAN (set by main)

    def good(self) -> None:
        self.agent.write_config([net()])

    def applied(self) -> bool:
        return (
            bool(self.agent.journal("net1")) and (self.agent.journal("net1") or {}).get("phase") == "applied"
        )

    def kill_at(self, command: list[str], point: str) -> int:
        """Run the agent until it stops at `point`, SIGKILL it; returns 1 if it never got there
        (the step was skipped because there was nothing to do: an exit is not a kill)."""
        proc = self.agent.popen(*command, env={"OVS_UNDERLAY_AGENT_FAILPOINT": f"{point}:stop"})
        try:
            wait_stopped(proc.pid, timeout_s=30)
        except AssertionError:
            proc.wait(30)
            return 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return 0

    def run_agent(self, *args: str) -> tuple[int, str]:
        r = self.agent.run(*args)
        return r.returncode, r.stdout + r.stderr

    # -- faults ----------------------------------------------------------------------------

    def fault(self, name: str) -> str:
        rng = self.rng
        if name == "kill9-apply":
            point = f"{rng.choice(APPLY_STEPS)}:{rng.choice(['before', 'after'])}"
            self.good()
            self.kill_at(["apply"], point)
            return point
        if name == "dead-gateway":
            self.agent.write_config([net(verify={"gateway": "172.31.0.99", "timeoutMs": 500})])
            rc, out = self.run_agent("apply")
            assert rc == 1, out
            m = re.search(r"rolled back in ([0-9.]+) s", out)
            assert m, out
            self.rollbacks.append(float(m.group(1)))
            assert iface_view(self.node, "eth1") == self.snapshot, "rollback not exact"
            self.good()
            return "rolled back"
        if name == "kill9-rollback":
            point = f"{rng.choice(RESTORE_STEPS)}:{rng.choice(['before', 'after'])}"
            self.agent.write_config([net(verify={"gateway": "172.31.0.99", "timeoutMs": 300})])
            self.kill_at(["apply"], point)
            self.good()
            return point
        if name == "ovs-restart":
            fresh = rng.random() < 0.5
            if self.applied():
                self.node.restart_ovs(fresh_db=fresh)
                return f"applied, fresh_db={fresh}"
            step = rng.choice(APPLY_STEPS)
            self.good()
            proc = self.agent.popen("apply", env={"OVS_UNDERLAY_AGENT_FAILPOINT": f"{step}:after:stop"})
            try:
                wait_stopped(proc.pid, timeout_s=30)
                self.node.restart_ovs(fresh_db=fresh)
                proc.send_signal(signal.SIGKILL)
            except AssertionError:
                pass
            proc.wait(30)
            return f"after {step}, fresh_db={fresh}"
        if name == "ovsdb-down":
            self.good()
            self.node.stop_ovs()
            rc, out = self.run_agent("apply")
            self.node.start_ovs()
            assert rc == 4, out
            return "refused while down"
        if name == "kill9-remove":
            point = f"{rng.choice(RESTORE_STEPS)}:{rng.choice(['before', 'after'])}"
            self.kill_at(["remove", "net1"], point)
            rc, out = self.run_agent("remove", "net1")
            assert rc in (0, 2), out  # 2: the killed remove had finished (journal gone)
            assert iface_view(self.node, "eth1") == self.snapshot, "remove not exact"
            return point
        if name == "reboot":
            for a in ("172.31.0.11/24", "fd00:31::b/64"):
                self.node.exec("ip", "addr", "del", a, "dev", "br-net1", check=False)
                self.node.exec(
                    "ip", "addr", "add", a, "dev", "eth1", *(["nodad"] if ":" in a else []), check=False
                )
            self.node.exec("ip", "route", "replace", "default", "via", GW4, "dev", "eth1")
            return "addresses back on eth1"
        raise ValueError(name)

    def recover(self) -> tuple[bool, str]:
        """Apply as `serve` would: again after a failed (rolled back) attempt, up to ATTEMPTS
        times RETRY_S apart. Each failed attempt notes whether the witness (a plain host on the
        node VLAN, no agent) reached the gateway then: if not, the shared switch stalled."""
        notes = []
        for attempt in range(1, ATTEMPTS + 1):
            self.good()
            rc, out = self.run_agent("apply")
            v4, v6 = self.node.ping_retry(GW4), self.node.ping_retry(GW6)
            st = json.loads(self.agent.run("status", "-o", "json").stdout or "[]")
            ready = bool(st) and st[0]["ready"] is True
            if rc == 0 and v4 and v6 and ready:
                return True, "; ".join(notes)
            witness = self.witness_ok()
            notes.append(
                f"attempt {attempt}: apply rc {rc}, ping v4 {v4}, v6 {v6}, ready {ready}, witness "
                f"{'reached' if witness else 'did NOT reach'} the gateway: {out[-600:]}"
            )
            time.sleep(RETRY_S)
        return False, "; ".join(notes)

    def witness_ok(self) -> bool:
        return bool(self.witness) and netbed.ping_retry(self.witness, GW4, attempts=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument(
        "--keep-on-loss",
        type=float,
        default=0,
        metavar="S",
        help="on the first lost node, keep the bed S seconds for inspection, then stop",
    )
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    print(f"seed {args.seed}", flush=True)
    tor = nodebed.make_tor()
    node = nodebed.make_node("soak")
    rows: list[dict[str, Any]] = []
    rollbacks: list[float] = []
    cleanup: list[Any] = []
    t_start = time.monotonic()
    try:
        tor.plug(node)
        witness = netbed.make_netns("wit")
        cleanup.append(witness.delete)
        w_tor = netbed.uniq("wt")
        netbed.sh("ip", "link", "add", w_tor, "type", "veth", "peer", "name", "eth0", "netns", witness.name)
        cleanup.append(lambda: netbed.delete_link(w_tor))
        netbed.sh("ip", "link", "set", w_tor, "up")
        netbed.vsctl("add-port", tor.bridge, w_tor, f"tag={tor.node_vlan}")
        witness.exec("ip", "addr", "add", "172.31.0.250/24", "dev", "eth0")
        witness.exec("ip", "link", "set", "eth0", "up")
        with tempfile.TemporaryDirectory(prefix="agent-faults-") as work:
            agent = Agent(node, Path(work))
            agent.write_config([net()])
            soak = Soak(agent, rng)
            soak.rollbacks = rollbacks
            soak.witness = witness.name
            for i in range(args.runs):
                start = rng.choice(["clean", "applied"])
                if start == "applied" and not soak.applied():
                    assert soak.recover()[0], "could not reach the applied start state"
                if start == "clean" and soak.applied():
                    assert soak.run_agent("remove", "net1")[0] == 0
                fault = rng.choice(FROM_APPLIED if start == "applied" else FROM_CLEAN)
                print(f"{i + 1:3d} ... {start:8s} {fault}", flush=True)
                t0 = time.monotonic()
                error = ""
                with Pinger(node, GW4) as ping:
                    try:
                        detail = soak.fault(fault)
                    except AssertionError as exc:
                        detail, error = "", f"fault check failed: {exc}"
                    ok, out = soak.recover()
                outage = ping.window_ms()
                retried = bool(out) and ok
                rows.append(
                    {
                        "run": i + 1,
                        "start": start,
                        "fault": fault,
                        "detail": detail,
                        "ok": ok and not error,
                        "error": error or ("" if ok else out),
                        "retried": retried,
                        "retry_notes": out if retried else "",
                        "outage_ms": outage,
                        "seconds": round(time.monotonic() - t0, 2),
                    }
                )
                mark = ("ok*" if retried else "ok ") if rows[-1]["ok"] else "LOST"
                if not rows[-1]["ok"]:
                    state = [
                        node.exec("ip", "-br", "addr").stdout,
                        node.exec("ip", "route").stdout,
                        node.vsctl("show").stdout,
                    ]
                    print(f"    {rows[-1]['error']}", *state, sep="\n    ", flush=True)
                    if args.keep_on_loss:
                        print(
                            f"keeping node netns {node.ns}, ToR {tor.bridge} for {args.keep_on_loss:.0f} s",
                            flush=True,
                        )
                        time.sleep(args.keep_on_loss)
                        break
                print(
                    f"{i + 1:3d} {mark} {start:8s} {fault:15s} {detail:32s} outage {outage:6.0f} ms",
                    flush=True,
                )
    finally:
        for fn in reversed(cleanup):
            fn()
        node.destroy()
        tor.destroy()
    return report(rows, args, time.monotonic() - t_start, rollbacks)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, took: float, rollbacks: list[float]) -> int:
    lost = [r for r in rows if not r["ok"]]
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["fault"]].append(r)
    lines = [
        f"# Node agent: {len(rows)} fault-injected applies",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, seed {args.seed}, {took:.0f} s. "
        + ", ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        f"**Lost nodes: {len(lost)} of {len(rows)}** (after recovery the node reaches its gateways over "
        "IPv4 and IPv6 and the network is ready).",
        "",
        "| fault | runs | lost | recovered on a retry | worst outage of a 10 ms ping (ms) | median (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for fault, rs in sorted(by.items()):
        outs = sorted(r["outage_ms"] for r in rs)
        lines.append(
            f"| {fault} | {len(rs)} | {sum(not r['ok'] for r in rs)} | {sum(r['retried'] for r in rs)} | "
            f"{outs[-1]:.0f} | "
            f"{outs[len(outs) // 2]:.0f} |"
        )
    if rollbacks:
        lines += [
            "",
            f"Rollback after a silent gateway: {len(rollbacks)} runs, worst {max(rollbacks):.2f} s, "
            f"median {sorted(rollbacks)[len(rollbacks) // 2]:.2f} s (target 10 s).",
        ]
    retried = [r for r in rows if r["retried"]]
    if retried:
        lines += [
            "",
            "Runs whose first recovery attempt failed and a later one (as `serve` retries) worked; the "
            "witness is a plain host on the node VLAN, without the agent: when it did not reach the "
            "gateway either, the shared switch (the system OVS, loaded by other runs) had stalled:",
        ]
        lines += [f"- run {r['run']} ({r['fault']} {r['detail']}): {r['retry_notes'][:400]}" for r in retried]
    for r in lost:
        lines.append(f"- LOST run {r['run']} ({r['fault']} {r['detail']}): {r['error']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"agent-faults-{stamp}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"agent-faults-{stamp}.json").write_text(
        json.dumps({"seed": args.seed, "runs": rows}, indent=1)
    )
    (RESULTS / "agent-faults-latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
