"""The node agent on test nodes (testbed/nodebed.py), for its tests and its fault soak
(bench/agent_faults.py): run `ovs-underlay-node` (and the CNI plugin) inside a node, read an
interface as an independent oracle (`ip -j`, not our netlink code), measure the loss window with
a 10 ms ping, stop the agent at a failpoint to SIGKILL it there.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import netbed, nodebed

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Agent:
    """`python -m agent` inside `node`, with its own config file and state dir."""

    node: nodebed.Node
    workdir: Path
    node_name: str = "node1"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.workdir / "provider-networks.json"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def write_config(self, networks: list[dict[str, Any]] | str) -> None:
        text = networks if isinstance(networks, str) else json.dumps({"providerNetworks": networks})
        self.config.write_text(text)

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "agent",
            "--config",
            str(self.config),
            "--node-name",
            self.node_name,
            "--ovsdb",
            self.node.ovsdb,
            "--state-dir",
            str(self.state_dir),
            *args,
        ]

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.node.exec(
            *self.argv(*args),
            check=False,
            timeout=timeout,
            env={**self.extra_env, **(env or {}), "PYTHONPATH": _pythonpath()},
        )

    def popen(
        self, *args: str, env: dict[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        out = open(log or self.workdir / "agent.log", "ab")  # noqa: SIM115
        try:
            return self.node.popen(
                *self.argv(*args),
                env={**self.extra_env, **(env or {}), "PYTHONPATH": _pythonpath()},
                stdout=out,
                stderr=out,
                cwd=str(ROOT),
            )
        finally:
            out.close()

    def status(self) -> list[dict[str, Any]]:
        r = self.run("status", "-o", "json")
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout))

    def journal(self, name: str) -> dict[str, Any] | None:
        f = self.state_dir / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None


def _pythonpath() -> str:
    extra = os.environ.get("PYTHONPATH", "")
    return f"{extra}:{ROOT}" if extra else str(ROOT)


# ---------------------------------------------------------------------------------------------
# Oracle: an interface as `ip -j` shows it, normalised for comparison


def iface_view(node: nodebed.Node, ifname: str) -> dict[str, Any]:
    """Link (MAC, MTU, admin state), addresses (without link-local IPv6; lifetimes as
    forever-or-not), routes of every table through it (without the kernel's own local/link-local
    ones), and rules naming it, all from `ip -j`. Interface indexes are left out."""
    ln = node.link(ifname)
    assert ln is not None, f"{ifname} missing in node {node.name}"
    addrs = []
    for entry in node.ip_json("addr", "show", "dev", ifname):
        for a in entry.get("addr_info", []):
            if a["family"] == "inet6" and a.get("scope") == "link":
                continue
            addrs.append(
                {
                    k: a.get(k)
                    for k in (
                        "family",
                        "local",
                        "prefixlen",
                        "scope",
                        "label",
                        "broadcast",
                        "address",
                        "nodad",
                        "noprefixroute",
                        "secondary",
                    )
                }
                | {"forever": a.get("valid_life_time") == 4294967295}
            )
    routes = []
    for fam in ("-4", "-6"):
        for r in node.ip_json(fam, "-d", "route", "show", "table", "all"):
            devs = [r.get("dev")] + [h.get("dev") for h in r.get("nexthops", [])]
            if ifname not in devs or r.get("table") == "local":
                continue
            if fam == "-6" and (r["dst"].startswith("fe80::") or r["dst"].startswith("ff00::")):
                continue
            routes.append(
                {k: v for k, v in r.items() if k not in ("dev", "expires")}
                | {"nexthops": [{k: v for k, v in h.items() if k != "dev"} for h in r.get("nexthops", [])]}
            )
    rules = []
    for fam in ("-4", "-6"):
        for ru in node.ip_json(fam, "rule", "show"):
            if ifname in (ru.get("iif"), ru.get("oif")):
                rules.append({k: ("<dev>" if v == ifname else v) for k, v in ru.items()})
    key = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
    return {
        "mac": ln["address"],
        "mtu": ln["mtu"],
        "up": "UP" in ln["flags"],
        "addresses": addrs,
        "routes": sorted(routes, key=key),
        "rules": sorted(rules, key=key),
    }


def _stable(text: str) -> str:
    """Without IPv6 link-local lines: the kernel finishes their DAD (and adds their local route)
    on its own time after a link comes up, which is not a change anyone made."""
    return "\n".join(line for line in text.splitlines() if "fe80::" not in line and "tentative" not in line)


def node_view(node: nodebed.Node) -> dict[str, Any]:
    """Everything a dry run must not change: links, addresses, routes, rules, OVS bridges/ports."""
    return {
        "links": sorted((ln["ifname"], ln["address"], ln["mtu"], ln["flags"]) for ln in node.ip_json("link")),
        "addrs": _stable(node.exec("ip", "addr").stdout),
        "routes": _stable(
            node.exec("ip", "route", "show", "table", "all").stdout
            + node.exec("ip", "-6", "route", "show", "table", "all").stdout
        ),
        "rules": node.exec("ip", "rule").stdout,
        "ovs": node.vsctl("--format=json", "list", "Bridge").stdout + node.vsctl("show").stdout,
    }


# ---------------------------------------------------------------------------------------------
# Loss window


class Pinger:
    """`ping -D -i 0.01` from inside the node while a block runs; `window_ms()` is the longest run
    of consecutive lost echoes times the interval."""

    def __init__(self, node: nodebed.Node, dst: str, interval_s: float = 0.01) -> None:
        self.node, self.dst, self.interval_s = node, dst, interval_s
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def __enter__(self) -> Pinger:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.node.ns,
                "ping",
                "-n",
                "-D",
                "-i",
                str(self.interval_s),
                "-W",
                "1",
                self.dst,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        netbed.PROCS.append(self.proc)  # type: ignore[arg-type]
        time.sleep(0.3)  # some replies before the change
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # and some after
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        self.lines = out.splitlines()

    def replies(self) -> list[int]:
        seqs = []
        for line in self.lines:
            m = re.search(r"icmp_seq=(\d+)", line)
            if m and "bytes from" in line and "DUP" not in line:
                seqs.append(int(m.group(1)))
        return sorted(set(seqs))

    def sent(self) -> int:
        m = re.search(r"(\d+) packets transmitted", "\n".join(self.lines))
        return int(m.group(1)) if m else 0

    def window_ms(self) -> float:
        """The longest run of unanswered echoes (also at the start and the end), in ms. A ping
        that reported nothing is an error, not a window of 0."""
        sent = self.sent()
        if sent == 0:
            raise AssertionError(f"ping reported no echoes sent: {self.lines[-10:]}")
        seqs = [0, *self.replies(), sent + 1]  # ping numbers its echoes from 1
        worst = max((b - a - 1 for a, b in itertools.pairwise(seqs)), default=0)
        return worst * self.interval_s * 1000


def wait_stopped(pid: int, timeout_s: float = 30) -> None:
    """Until process `pid` is stopped (SIGSTOP: state T), i.e. sits at its failpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            raise AssertionError(f"process {pid} exited before its failpoint") from None
        if state == "T":
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not reach its failpoint in {timeout_s}s")


def run_cni(
    node: nodebed.Node,
    command: str,
    conf: dict[str, Any],
    *,
    container_id: str = "",
    netns: str = "",
    ifname: str = "eth0",
) -> tuple[int, Any, str]:
    """The CNI plugin (`python -m cni`) run inside `node`, as that node's kubelet would."""
    env = {
        "CNI_COMMAND": command,
        "CNI_PATH": "/usr/lib/cni",
        "CNI_IFNAME": ifname,
        "OVS_UNDERLAY_LOG_FILE": str(node.workdir / "cni.log"),
        "PYTHONPATH": _pythonpath(),
    }
    if container_id:
        env["CNI_CONTAINERID"] = container_id
    if netns:
        env["CNI_NETNS"] = netns
    res = node.exec(sys.executable, "-m", "cni", check=False, input=json.dumps(conf), env=env)
    try:
        out = json.loads(res.stdout) if res.stdout.strip() else None
    except ValueError:
        out = {"__unparsable__": res.stdout}
    return res.returncode, out, res.stderr
