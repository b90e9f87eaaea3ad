"""The network test bed: independent oracles and disposable network objects.

Everything here talks to the system through `ip`, `ovs-vsctl` and friends, never through the
code under test, so tests assert against an independent view of the kernel and OVSDB.

Names: every object a test run creates carries the run's TOKEN (set once per pytest session),
so parallel runs cannot collide and the end-of-session check finds exactly our leftovers.
Host-side veths made by the plugin are recognised by their alias, which names the container
id; test container ids carry the TOKEN.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# 4 hex chars keep bridge/veth names within IFNAMSIZ (15) with room for a role suffix.
TOKEN = os.environ.get("OU_TEST_TOKEN") or secrets.token_hex(2)
_seq = itertools.count(1)
# Every daemon a fixture starts, restarts included: the session-end check kills survivors.
PROCS: list[subprocess.Popen[bytes]] = []
# Figures a test measured (loss windows, rollback times): printed in the run's summary.
REPORT: list[str] = []


PLUGIN_LOG_DIR = Path("/var/log/ovs-underlay")  # the plugin logs only there (cni/log.py)


def plugin_log(name: str) -> Path:
    """A plugin log file of this run (OVS_UNDERLAY_LOG_FILE takes the path): inside the plugin's
    log directory, named by the run's TOKEN so the session end removes it."""
    return PLUGIN_LOG_DIR / f"test-{TOKEN}-{name}.log"


def uniq(role: str, limit: int = 15) -> str:
    """A name for a kernel/OVS object: 't' + token + sequence + role, at most `limit` chars."""
    name = f"t{TOKEN}{next(_seq):02x}{role}"
    if len(name) > limit:
        raise ValueError(f"test name {name!r} is longer than {limit} chars")
    return name


def container_id(role: str = "c") -> str:
    return f"test{TOKEN}{role}{secrets.token_hex(8)}"


# ---------------------------------------------------------------------------------------------
# Running commands


def sh(*args: str, ns: str | None = None, check: bool = True, timeout: float = 30,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def ip_json(*args: str, ns: str | None = None) -> Any:
    out = sh("ip", "-j", *args, ns=ns).stdout
    return json.loads(out) if out.strip() else []


def links(ns: str | None = None) -> list[dict[str, Any]]:
    return list(ip_json("-d", "link", "show", ns=ns))


def link(name: str, ns: str | None = None) -> dict[str, Any] | None:
    res = sh("ip", "-j", "-d", "link", "show", "dev", name, ns=ns, check=False)
    if res.returncode != 0:
        return None
    data = json.loads(res.stdout)
    return data[0] if data else None


def addrs(ifname: str, ns: str | None = None) -> list[str]:
    """Addresses of an interface as CIDR strings (link-local IPv6 left out)."""
    out = []
    for entry in ip_json("addr", "show", "dev", ifname, ns=ns):
        for a in entry.get("addr_info", []):
            if a.get("scope") == "link" and a["family"] == "inet6":
                continue
            out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def routes(ns: str | None = None, family: str = "-4") -> list[dict[str, Any]]:
    return list(ip_json(family, "route", "show", ns=ns))


def ping(ns: str, dst: str, count: int = 1, wait_s: float = 1.0) -> bool:
    """True when `dst` answers from inside netns `ns`. Only ever targets test namespaces' addresses."""
    v6 = ":" in dst
    res = sh("ping", "-6" if v6 else "-4", "-n", "-q", "-c", str(count), "-W", str(wait_s), dst,
             ns=ns, check=False, timeout=count * wait_s + 5)
    return res.returncode == 0


def ping_retry(ns: str, dst: str, attempts: int = 5) -> bool:
    """The userspace datapath installs flows on first packet; allow a few tries to converge."""
    return any(ping(ns, dst) for _ in range(attempts))


# ---------------------------------------------------------------------------------------------
# OVS oracle


def vsctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # Generous: ovsdb-server and ovs-vswitchd share 2 cores with the tests under a loaded CI run.
    return sh("ovs-vsctl", "--timeout=30", *args, check=check, timeout=45)


def ovs_rows(table: str, *columns: str, where: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of an OVSDB table as dicts, decoded from `ovs-vsctl --format=json`."""
    cmd = ["--format=json", "--data=json"]
    if columns:
        cmd.append("--columns=" + ",".join(columns))
    cmd += ["find" if where else "list", table, *where]
    data = json.loads(vsctl(*cmd).stdout)
    return [{h: _ovs_value(v) for h, v in zip(data["headings"], row, strict=True)} for row in data["data"]]


def _ovs_value(v: Any) -> Any:
    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
        kind, payload = v
        if kind == "map":
            return {k: _ovs_value(x) for k, x in payload}
        if kind == "set":
            return [_ovs_value(x) for x in payload]
        if kind in ("uuid", "named-uuid"):
            return payload
    return v


def bridge_ports(bridge: str) -> list[str]:
    res = vsctl("list-ports", bridge, check=False)
    return res.stdout.split() if res.returncode == 0 else []


def port(name: str) -> dict[str, Any] | None:
    rows = ovs_rows("Port", "name", "tag", "trunks", "vlan_mode", "external_ids", where=[f"name={name}"])
    return rows[0] if rows else None


def interface(name: str) -> dict[str, Any] | None:
    rows = ovs_rows("Interface", "name", "ofport", "mac_in_use", "external_ids", "type",
                    where=[f"name={name}"])
    return rows[0] if rows else None


def set_empty(v: Any) -> Any:
    """OVSDB shows an empty optional column as an empty set; normalise to None."""
    return None if v == [] else v


# ---------------------------------------------------------------------------------------------
# Disposable objects


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*args, ns=self.name, check=check)

    def delete(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)


def make_netns(role: str) -> Netns:
    ns = Netns(uniq(role, limit=40))
    sh("ip", "netns", "add", ns.name)
    sh("ip", "link", "set", "lo", "up", ns=ns.name)
    return ns


def make_bridge(role: str = "br", datapath: str = "netdev") -> str:
    name = uniq(role)
    vsctl("add-br", name, "--", "set", "Bridge", name, f"datapath_type={datapath}")
    return name


def delete_bridge(name: str) -> None:
    vsctl("--if-exists", "del-br", name, check=False)


def delete_link(name: str, ns: str | None = None) -> None:
    sh("ip", "link", "del", name, ns=ns, check=False)


@dataclass
class Router:
    """A namespace on the 'physical switch' holding a VLAN's gateway address(es)."""

    vlan: int
    netns: Netns
    ifname: str
    gateways: list[str]  # CIDRs, e.g. "192.168.100.1/24"
    tor_port: str

    def gateway_ips(self) -> list[str]:
        return [g.split("/")[0] for g in self.gateways]


def add_router(tor: str, vlan: int, gateways: Sequence[str], cleanup: list[Any]) -> Router:
    """A router netns holding `gateways` (CIDRs) on interface gw0, plugged into the switch bridge
    `tor` as an access port of `vlan`. Its undo steps are appended to `cleanup`."""
    ns = make_netns(f"r{vlan}")
    cleanup.append(ns.delete)
    tor_side, r_side = uniq("rt"), uniq("rn")
    sh("ip", "link", "add", tor_side, "type", "veth", "peer", "name", r_side, "netns", ns.name)
    cleanup.append(lambda: delete_link(tor_side))
    sh("ip", "link", "set", tor_side, "up")
    ifname = "gw0"
    sh("ip", "link", "set", r_side, "name", ifname, ns=ns.name)
    for g in gateways:
        extra = ["nodad"] if ":" in g else []
        sh("ip", "addr", "add", g, "dev", ifname, *extra, ns=ns.name)
    sh("ip", "link", "set", ifname, "up", ns=ns.name)
    vsctl("add-port", tor, tor_side, f"tag={vlan}")
    return Router(vlan, ns, ifname, list(gateways), tor_side)


@dataclass
class Underlay:
    """Node bridge + trunk uplink to a ToR bridge with one router namespace per VLAN.

        pod --veth--> [bridge] --uplink (trunk)--> [tor] --access tag N--> router netns (gateway)

    Both bridges use the userspace datapath; the uplink is a veth pair (this kernel has no
    802.1Q devices), so tags are visible with `tcpdump -e -i <uplink>`.
    """

    bridge: str
    tor: str
    uplink: str  # node side of the trunk veth (in the root netns, on `bridge`)
    uplink_tor: str
    routers: dict[int, Router] = field(default_factory=dict)
    _cleanup: list[Any] = field(default_factory=list)

    def add_router(self, vlan: int, gateways: Sequence[str]) -> Router:
        r = add_router(self.tor, vlan, gateways, self._cleanup)
        self.routers[vlan] = r
        return r

    def remove_router(self, vlan: int) -> None:
        r = self.routers.pop(vlan)
        vsctl("--if-exists", "del-port", self.tor, r.tor_port, check=False)
        delete_link(r.tor_port)
        r.netns.delete()

    def destroy(self) -> None:
        for fn in reversed(self._cleanup):
            with contextlib.suppress(Exception):
                fn()
        self._cleanup.clear()


def make_underlay(vlans: dict[int, Sequence[str]] | None = None) -> Underlay:
    bridge = make_bridge("br")
    u = Underlay(bridge=bridge, tor="", uplink="", uplink_tor="")
    u._cleanup.append(lambda: delete_bridge(bridge))
    try:
        u.tor = make_bridge("tor")
        u._cleanup.append(lambda: delete_bridge(u.tor))
        u.uplink, u.uplink_tor = uniq("up"), uniq("ut")
        sh("ip", "link", "add", u.uplink, "type", "veth", "peer", "name", u.uplink_tor)
        u._cleanup.append(lambda: delete_link(u.uplink))
        for dev in (u.uplink, u.uplink_tor):
            sh("ip", "link", "set", dev, "up")
        vsctl("add-port", bridge, u.uplink)  # no tag: trunk of every VLAN
        vsctl("add-port", u.tor, u.uplink_tor)
        for vlan, gws in (vlans or {}).items():
            u.add_router(vlan, gws)
    except BaseException:
        u.destroy()
        raise
    return u


# ---------------------------------------------------------------------------------------------
# tcpdump


@contextlib.contextmanager
def capture(ifname: str, bpf: str = "", ns: str | None = None, count: int = 0) -> Iterator[list[str]]:
    """Capture with `tcpdump -e -nn` on `ifname` while the block runs; the list is filled with
    the printed lines when the block exits."""
    lines: list[str] = []
    out = tempfile.NamedTemporaryFile("w+", prefix="ou-tcpdump-", delete=False)  # noqa: SIM115
    cmd = ["tcpdump", "-e", "-nn", "-l", "-U", "-i", ifname]
    if count:
        cmd += ["-c", str(count)]
    if bpf:
        cmd += bpf.split()
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
    try:
        # tcpdump prints "listening on" to stderr once the capture is armed.
        deadline = time.monotonic() + 5
        assert proc.stderr is not None
        buf = b""
        while b"listening on" not in buf and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 0.05)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 4096)
                buf += chunk
                if not chunk and proc.poll() is not None:
                    raise RuntimeError(f"tcpdump exited: {buf.decode(errors='replace')}")
        yield lines
        time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.seek(0)
        lines.extend(line.rstrip("\n") for line in out)
        out.close()
        os.unlink(out.name)


# ---------------------------------------------------------------------------------------------
# ipamd as a real process


@dataclass
class Ipamd:
    socket: str
    state_dir: str
    proc: subprocess.Popen[bytes] | None
    log_path: str
    args: list[str]

    @property
    def probe_netns(self) -> str:
        """The netns of this ipamd's probe ports (its --probe-netns)."""
        return self.args[self.args.index("--probe-netns") + 1] if "--probe-netns" in self.args else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(sys.executable, "-m", "ipamd", *args, "--socket", self.socket, check=check)

    def leases(self, network: str | None = None, all: bool = False) -> list[dict[str, Any]]:
        args = ["leases", "-o", "json"] + (["--network", network] if network else [])
        if all:
            args.append("--all")
        return list(json.loads(self.cli(*args).stdout))

    def pools(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("pools", "-o", "json").stdout))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def start(self, wait_s: float = 15) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, cwd=ROOT)
        PROCS.append(self.proc)
        log.close()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ipamd exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket) and self.cli("health", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"ipamd did not become healthy in {wait_s}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""


# The system OVS and the root netns are shared with other test runs: a test ipamd reconciles only
# when a test asks for it (with its own node: tests/integration/test_reconcile.py).
NO_RECONCILE = ("--reconcile-interval", "0")


def start_ipamd(workdir: str, extra_args: Sequence[str] = ()) -> Ipamd:
    sock = os.path.join(workdir, "ipamd.sock")
    state = os.path.join(workdir, "state")
    os.makedirs(state, exist_ok=True)
    quiet = () if "--reconcile-interval" in extra_args else NO_RECONCILE
    # The probe ports' netns carries the run's token, so the leftover check sees it.
    args = [sys.executable, "-m", "ipamd", "serve", "--socket", sock, "--state-dir", state,
            "--probe-netns", uniq("probe", limit=40), *quiet, *extra_args]
    d = Ipamd(sock, state, None, os.path.join(workdir, "ipamd.log"), args)
    d.start()
    return d


@dataclass
class WarmServer:
    """The plugin's warm-path fork server as a real process (`<argv> --warm-server --socket S`):
    `argv` is `[python, -m, cni]` or the frozen `ovs-underlay`."""

    argv: list[str]
    path: str
    log: Path
    cwd: str = "/"
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()  # more server flags, e.g. ("--log-level", "debug")

    def start(self, wait_s: float = 30) -> None:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([*self.argv, "--warm-server", "--socket", self.path, *self.args],
                                         stdout=f, stderr=f, cwd=self.cwd)
        PROCS.append(self.proc)
        deadline = time.monotonic() + wait_s
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"warm server exited ({self.proc.returncode}):\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm server did not start in {wait_s}s:\n{self.log.read_text()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def children(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} is not installed: run `make setup` (scripts/setup-system.sh)")
    return path
