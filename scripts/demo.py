#!/usr/bin/env python3
"""ovs-underlay end to end, on this machine, in about a minute (`make demo`, `make demo KEEP=1`).

What it builds (all names start with `demo-`; the work dir is /tmp/ovs-underlay-demo):

    demo-pod1 (VLAN 100) --+                              +-- demo-r100  192.168.100.1/24
    demo-pod2 (VLAN 100) --+-- [demo-br] ==trunk== [demo-tor] --+
    demo-pod3 (VLAN 200) --+   (OVS, netdev)        (OVS "ToR") +-- demo-r200  192.168.200.1/24

It runs the product as a node runs it once installed, only on private sockets and state:
1. starts ipamd (the frozen `dist/ovs-underlay/ovs-underlay-ipamd serve`) and the warm-path
   server (`dist/ovs-underlay/ovs-underlay --warm-server`, as ovs-underlay-warm.service does),
2. builds the underlay: node bridge, trunk uplink veth, ToR bridge, one router netns per VLAN,
3. writes two CNI network configs (vlan100, vlan200) into a private NETCONFPATH with the
   defaults: no datapathType (the bridge is accepted as it is), gateway and conflict checks on,
4. attaches three pods with `cnitool add` (the reference runtime CLI; `make cnitool`), exec'ing
   the plugin from CNI_PATH=dist/ovs-underlay (the native client, handing each call to the warm
   server), and prints each pod's ADD time, which process ran it and whether its address was
   pre-probed by ipamd or probed inline (a network's first ADDs come before ipamd has any
   pre-probed address); then one more pod on VLAN 100, added and deleted once ipamd has
   pre-probed addresses, to show an ADD as most of a node's ADDs are,
5. shows addresses, the gateway checks, a ping matrix (same VLAN: yes, across VLANs: no), the
   OVS ports with their tags and ipamd's lease table,
6. tears everything down (cnitool del, ipamd and warm server stop, bridges, netns), also on
   Ctrl-C / SIGTERM.

`--keep` leaves it running and prints how to look around; `--cleanup` removes a kept demo.
Needs root, Open vSwitch running, and `make setup binary cnitool` done. Exits non-zero when any
step fails or the ping matrix is not what the VLANs promise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist" / "ovs-underlay"
IPAMD = DIST / "ovs-underlay-ipamd"
CNITOOL = ROOT / "build" / "cnitool" / "cnitool"
REFERENCE_PLUGINS = "/usr/lib/cni"
WORK = Path("/tmp/ovs-underlay-demo")
SOCKET = WORK / "ipamd.sock"
WARM_SOCKET = WORK / "warm" / "cni-warm.sock"
WARM_LOG = WORK / "warm-server.log"
# The plugin's log file (OVS_UNDERLAY_LOG_FILE): the plugin logs only inside /var/log/ovs-underlay.
PLUGIN_LOG = Path("/var/log/ovs-underlay/demo.log")
NETCONF = WORK / "net.d"
BRIDGE, TOR = "demo-br", "demo-tor"
UPLINK, UPLINK_TOR = "demo-up", "demo-up-tor"


@dataclass(frozen=True)
class Vlan:
    vid: int
    network: str
    subnet: str
    gateway: str

    @property
    def router(self) -> str:
        return f"demo-r{self.vid}"


@dataclass(frozen=True)
class Pod:
    name: str
    vlan: Vlan

    @property
    def netns(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def container_id(self) -> str:
        return f"ovs-underlay-{self.name}"


VLANS = [Vlan(100, "vlan100", "192.168.100.0/24", "192.168.100.1"),
         Vlan(200, "vlan200", "192.168.200.0/24", "192.168.200.1")]
PODS = [Pod("demo-pod1", VLANS[0]), Pod("demo-pod2", VLANS[0]), Pod("demo-pod3", VLANS[1])]
LATER = Pod("demo-pod4", VLANS[0])  # added and deleted once ipamd has pre-probed addresses


class DemoFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Output and commands

def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def info(text: str) -> None:
    print(f"   {text}", flush=True)


def run(*cmd: str, check: bool = True, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise DemoFailed(f"`{' '.join(cmd)}` failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res


def quiet(*cmd: str) -> None:
    """Teardown command: failures (already gone) are fine."""
    with contextlib.suppress(Exception):
        subprocess.run(cmd, capture_output=True, timeout=30)


def cnitool_env(pod: Pod) -> dict[str, str]:
    return {**os.environ, "NETCONFPATH": str(NETCONF), "CNI_PATH": f"{DIST}:{REFERENCE_PLUGINS}",
            "CNI_IFNAME": "eth0", "CNI_CONTAINERID": pod.container_id,
            "CNI_ARGS": f"IgnoreUnknown=true;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={pod.name}",
            "OVS_UNDERLAY_LOG_FILE": str(PLUGIN_LOG), "OVS_UNDERLAY_WARM_SOCKET": str(WARM_SOCKET)}


def gateway_answer(container_id: str) -> str | None:
    """The plugin's own record of the gateway check (ARP from inside the pod's netns by ipamd):
    'gateway 192.168.100.1 reachable (<mac>, <ms> ms)'."""
    try:
        lines = PLUGIN_LOG.read_text().splitlines()
    except OSError:
        return None
    found = [ln for ln in lines if f"container_id={container_id} " in ln and " reachable (" in ln]
    return found[-1].split(": ", 1)[-1].strip() if found else None


def warm_worker(container_id: str) -> str | None:
    """The warm server's record (debug log) of the worker that ran this pod's ADD."""
    try:
        lines = WARM_LOG.read_text().splitlines()
    except OSError:
        return None
    found = [ln.split("worker ", 1)[1].split(":", 1)[0] for ln in lines
             if f": ovs-underlay ADD container_id={container_id}" in ln]
    return found[-1] if found else None


def address_source(container_id: str) -> str:
    """Where the pod's address came from, by ipamd's log line of its Allocate."""
    try:
        lines = (WORK / "ipamd.log").read_text().splitlines()
    except OSError:
        return "address source unknown"
    found = [ln for ln in lines if "rpc=Allocate " in ln and f"container_id={container_id} " in ln]
    if not found:
        return "address source unknown"
    if "pre_probed=0" not in found[-1]:
        return "address pre-probed by ipamd: no wait"
    return "address probed inline: ipamd had no pre-probed one yet"


def ipamd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run(str(IPAMD), *args, "--socket", str(SOCKET), timeout=30)


# ---------------------------------------------------------------------------------------------
# Steps

def preflight() -> None:
    step("Preflight")
    if os.geteuid() != 0:
        raise DemoFailed("run as root (network namespaces, veths, OVS)")
    missing = [str(p) for p in (DIST / "ovs-underlay", IPAMD, CNITOOL) if not os.access(p, os.X_OK)]
    if missing:
        raise DemoFailed(f"missing {', '.join(missing)}: run `make setup binary cnitool` first")
    if shutil.which("ovs-vsctl") is None or run("ovs-vsctl", "--timeout=5", "show", check=False).returncode:
        raise DemoFailed("Open vSwitch is not running: run `make setup`")
    version = run(str(DIST / "ovs-underlay"), env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"})
    info(f"plugin VERSION: {version.stdout.strip()}")
    info(f"cnitool: {CNITOOL}")


def start_ipamd() -> subprocess.Popen[bytes]:
    step("Start ipamd")
    state = WORK / "state"
    state.mkdir(parents=True, exist_ok=True)
    log = open(WORK / "ipamd.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([str(IPAMD), "serve", "--socket", str(SOCKET), "--state-dir", str(state)],
                            stdout=log, stderr=log, start_new_session=True)
    log.close()
    (WORK / "ipamd.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoFailed(f"ipamd exited ({proc.returncode}); log:\n{tail(WORK / 'ipamd.log')}")
        healthy = SOCKET.exists() and run(str(IPAMD), "health", "--socket", str(SOCKET), check=False)
        if healthy and healthy.returncode == 0:
            info(f"ipamd pid {proc.pid}, socket {SOCKET}, state {state}, log {WORK / 'ipamd.log'}")
            return proc
        time.sleep(0.1)
    raise DemoFailed(f"ipamd not healthy after 20 s; log:\n{tail(WORK / 'ipamd.log')}")


def start_warm_server() -> subprocess.Popen[bytes]:
    step("Start the warm-path server")
    log = open(WARM_LOG, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([str(DIST / "ovs-underlay"), "--warm-server", "--socket", str(WARM_SOCKET),
                             "--log-level", "debug"], stdout=log, stderr=log, start_new_session=True)
    log.close()
    (WORK / "warm.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while not WARM_SOCKET.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise DemoFailed(f"the warm server did not start; log:\n{tail(WARM_LOG)}")
        time.sleep(0.05)
    info(f"warm server pid {proc.pid}, socket {WARM_SOCKET}, log {WARM_LOG}: plugin calls are forked from it")
    return proc


def build_underlay() -> None:
    step("Build the underlay: node bridge, trunk uplink, ToR, one router per VLAN")
    for br in (BRIDGE, TOR):
        run("ovs-vsctl", "--timeout=10", "add-br", br, "--", "set", "Bridge", br, "datapath_type=netdev")
    run("ip", "link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK_TOR)
    for dev in (UPLINK, UPLINK_TOR):
        run("ip", "link", "set", dev, "up")
    run("ovs-vsctl", "--timeout=10", "add-port", BRIDGE, UPLINK)  # no tag: trunk
    run("ovs-vsctl", "--timeout=10", "add-port", TOR, UPLINK_TOR)
    for v in VLANS:
        tor_side = f"demo-rt{v.vid}"
        run("ip", "netns", "add", v.router)
        run("ip", "netns", "exec", v.router, "ip", "link", "set", "lo", "up")
        run("ip", "link", "add", tor_side, "type", "veth", "peer", "name", "gw0", "netns", v.router)
        run("ip", "link", "set", tor_side, "up")
        run("ip", "netns", "exec", v.router, "ip", "addr", "add", f"{v.gateway}/24", "dev", "gw0")
        run("ip", "netns", "exec", v.router, "ip", "link", "set", "gw0", "up")
        run("ovs-vsctl", "--timeout=10", "add-port", TOR, tor_side, f"tag={v.vid}")
        info(f"VLAN {v.vid}: router netns {v.router} holds gateway {v.gateway}")
    info(f"{BRIDGE} --{UPLINK}/{UPLINK_TOR} (trunk)--> {TOR}")


def write_configs() -> None:
    step(f"Write CNI network configs to {NETCONF}")
    NETCONF.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(VLANS):
        conf = {
            "cniVersion": "1.0.0",
            "name": v.network,
            "plugins": [{
                "type": "ovs-underlay",
                "bridge": BRIDGE,
                "vlan": v.vid,
                "ipam": {  # the defaults: gateway check and conflict check on
                    "type": "ovs-underlay-ipam",
                    "daemonSocket": str(SOCKET),
                    "subnets": [{"subnet": v.subnet, "gateway": v.gateway,
                                 "rangeStart": v.subnet.replace(".0/24", ".10"),
                                 "rangeEnd": v.subnet.replace(".0/24", ".99")}],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }],
        }
        path = NETCONF / f"{10 + i}-{v.network}.conflist"
        path.write_text(json.dumps(conf, indent=2))
        info(f"{path.name}: VLAN {v.vid}, {v.subnet}, gateway {v.gateway}")


def attach_pods() -> dict[str, dict[str, Any]]:
    step("Attach three pods with `cnitool add`")
    results: dict[str, dict[str, Any]] = {}
    for pod in PODS:
        run("ip", "netns", "add", pod.name)
        run("ip", "netns", "exec", pod.name, "ip", "link", "set", "lo", "up")
        t0 = time.monotonic()
        res = run(str(CNITOOL), "add", pod.vlan.network, pod.netns, env=cnitool_env(pod))
        elapsed = (time.monotonic() - t0) * 1000
        result = json.loads(res.stdout)
        results[pod.name] = result
        addrs = ", ".join(ip["address"] for ip in result.get("ips", []))
        worker = warm_worker(pod.container_id)
        path = f"warm path, worker pid {worker}" if worker else "in-process (the warm server did not take it)"
        info(f"{pod.name}: eth0 {addrs} on VLAN {pod.vlan.vid}: ADD {elapsed:.0f} ms ({path}; "
             f"{address_source(pod.container_id)})")
        answer = gateway_answer(pod.container_id)
        if answer is None:
            raise DemoFailed(f"{pod.name}: the plugin log {PLUGIN_LOG} has no gateway check result")
        info(f"  gateway check: {answer}")
    return results


def later_pod() -> None:
    """One more ADD (and its DEL) on VLAN 100 once ipamd's probe port has pre-probed addresses:
    what most ADDs on a node look like."""
    step(f"A later pod on VLAN {LATER.vlan.vid}, once ipamd has pre-probed addresses")
    time.sleep(1.0)  # the probe port probes the next candidates (100 ms each) in the background
    run("ip", "netns", "add", LATER.name)
    try:
        t0 = time.monotonic()
        res = run(str(CNITOOL), "add", LATER.vlan.network, LATER.netns, env=cnitool_env(LATER))
        elapsed = (time.monotonic() - t0) * 1000
        addrs = ", ".join(ip["address"] for ip in json.loads(res.stdout).get("ips", []))
        info(f"{LATER.name}: eth0 {addrs}: ADD {elapsed:.0f} ms ({address_source(LATER.container_id)}; "
             "cnitool's own work included)")
        run(str(CNITOOL), "del", LATER.vlan.network, LATER.netns, env=cnitool_env(LATER))
        info(f"{LATER.name}: deleted (its address goes back to the pool after the cool-down)")
    finally:
        quiet("ip", "netns", "del", LATER.name)


def address_of(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"]).split("/")[0]


def ping(src: Pod, dst: str) -> bool:
    for _ in range(3):  # the userspace datapath installs flows on the first packets
        r = subprocess.run(["ip", "netns", "exec", src.name, "ping", "-c", "1", "-W", "1", dst],
                           capture_output=True, timeout=10)
        if r.returncode == 0:
            return True
    return False


def ping_matrix(results: dict[str, dict[str, Any]]) -> None:
    step("Ping matrix (rows ping columns): same VLAN answers, the other VLAN does not")
    targets = [(p.name, address_of(results[p.name]), p.vlan.vid) for p in PODS]
    targets += [(v.router, v.gateway, v.vid) for v in VLANS]
    width = 12
    print("   " + "from \\ to".ljust(width) + "".join(t[0].ljust(width) for t in targets))
    wrong = []
    for src in PODS:
        cells = []
        for name, ip, vid in targets:
            if name == src.name:
                cells.append("-".ljust(width))
                continue
            ok = ping(src, ip)
            expected = vid == src.vlan.vid
            mark = ("ok" if ok else "no") + ("" if ok == expected else " (!)")
            if ok != expected:
                wrong.append(f"{src.name} -> {name} {ip}: {'answered' if ok else 'no answer'}")
            cells.append(mark.ljust(width))
        print("   " + src.name.ljust(width) + "".join(cells))
    if wrong:
        raise DemoFailed("ping matrix differs from the VLAN plan:\n  " + "\n  ".join(wrong))
    info("as expected: VLANs are isolated, each pod reaches its own gateway")


def show_ovs() -> None:
    step(f"OVS ports on {BRIDGE} (ovs-vsctl)")
    data = json.loads(run("ovs-vsctl", "--timeout=10", "--format=json", "--data=json",
                          "--columns=name,tag,trunks,external_ids", "list", "Port").stdout)
    ports = set(run("ovs-vsctl", "--timeout=10", "list-ports", BRIDGE).stdout.split())
    print("   " + "port".ljust(16) + "tag".ljust(6) + "container / ifname")
    for name, tag, _trunks, ext in data["data"]:
        if name not in ports:
            continue
        ids = dict(ext[1]) if isinstance(ext, list) and ext[0] == "map" else {}
        tag_text = str(tag) if isinstance(tag, int) else "trunk"
        owner = f"{ids.get('container_id', '')} {ids.get('ifname', '')}".strip() or (
            "(ipamd's probe port)" if ids.get("owner") == "ovs-underlay-ipamd" else "(uplink)")
        print("   " + name.ljust(16) + tag_text.ljust(6) + owner)


def show_leases() -> None:
    step("ipamd leases (ovs-underlay-ipamd leases)")
    leases = json.loads(ipamd_cli("leases", "-o", "json").stdout)
    print("   " + "network".ljust(10) + "ip".ljust(18) + "ifname".ljust(8) + "state".ljust(10) + "container")
    for lease in leases:
        print("   " + str(lease.get("network", "")).ljust(10) + str(lease.get("ip", "")).ljust(18)
              + str(lease.get("ifname", "")).ljust(8) + str(lease.get("state", "")).ljust(10)
              + str(lease.get("containerID", "")))
    mine = {lease.get("containerID") for lease in leases}
    if not {p.container_id for p in PODS} <= mine:
        raise DemoFailed(f"ipamd does not list a lease for every pod: {sorted(map(str, mine))}")
    pools = json.loads(ipamd_cli("pools", "-o", "json").stdout)
    for pool in pools:
        info(f"pool {pool.get('network')}: {pool.get('subnet')} {pool.get('used')}/{pool.get('total')} used")


# ---------------------------------------------------------------------------------------------
# Teardown

def teardown(ipamd: subprocess.Popen[bytes] | None, warm: subprocess.Popen[bytes] | None = None) -> list[str]:
    """Remove everything, in reverse order, continuing after errors. Returns the problems."""
    problems: list[str] = []
    for pod in reversed([*PODS, LATER]):
        conf = NETCONF / f"{10 + VLANS.index(pod.vlan)}-{pod.vlan.network}.conflist"
        if Path(pod.netns).exists() and conf.exists():
            r = subprocess.run([str(CNITOOL), "del", pod.vlan.network, pod.netns], env=cnitool_env(pod),
                               capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                problems.append(f"cnitool del {pod.name}: {r.stdout.strip()} {r.stderr.strip()}")
        quiet("ip", "netns", "del", pod.name)
    _stop(ipamd, "ipamd.pid", b"ovs-underlay-ipamd", SOCKET)
    _stop(warm, "warm.pid", b"--warm-server", WARM_SOCKET)
    for v in VLANS:
        quiet("ip", "link", "del", f"demo-rt{v.vid}")
        quiet("ip", "netns", "del", v.router)
    quiet("ip", "link", "del", UPLINK)
    for br in (BRIDGE, TOR):
        quiet("ovs-vsctl", "--timeout=10", "--if-exists", "del-br", br)
    # Host veths the plugin made for our pods (if a DEL could not run).
    with contextlib.suppress(Exception):
        for link in json.loads(run("ip", "-j", "link", "show").stdout):
            alias = link.get("ifalias") or ""
            if any(p.container_id in alias for p in [*PODS, LATER]):
                quiet("ip", "link", "del", link["ifname"])
    for pod in [*PODS, LATER]:  # libcni's result cache
        for f in Path("/var/lib/cni/results").glob(f"*{pod.container_id}*"):
            with contextlib.suppress(OSError):
                f.unlink()
    shutil.rmtree(WORK, ignore_errors=True)
    with contextlib.suppress(OSError):
        PLUGIN_LOG.unlink()
    return problems


def _stop(proc: subprocess.Popen[bytes] | None, pidfile: str, marker: bytes, socket: Path) -> None:
    """Stop a daemon we started: `proc`, or for a kept demo only the pid we recorded ourselves
    (its command line must still name our socket)."""
    if proc is None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((WORK / pidfile).read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if marker in cmdline and str(socket).encode() in cmdline:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.1)
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def print_keep_help() -> None:
    step("Kept running. Look around:")
    env = f"NETCONFPATH={NETCONF} CNI_PATH={DIST}:{REFERENCE_PLUGINS} OVS_UNDERLAY_WARM_SOCKET={WARM_SOCKET}"
    p1 = PODS[0]
    print(f"""   ip netns exec {p1.name} ip addr show eth0
   ip netns exec {p1.name} ping -c2 {p1.vlan.gateway}
   ovs-vsctl show; ovs-vsctl --columns=name,tag,external_ids list Port
   tcpdump -e -nn -i {UPLINK} vlan          # tagged frames on the trunk uplink
   {IPAMD} leases --socket {SOCKET}
   {IPAMD} pools --socket {SOCKET}
   CNI_CONTAINERID={p1.container_id} {env} \\
       {CNITOOL} check {p1.vlan.network} {p1.netns}      # CNI CHECK through the runtime
   ipamd log: {WORK / 'ipamd.log'}; warm server log: {WARM_LOG}; plugin log: {PLUGIN_LOG}
 Clean up with:
   {sys.executable} {Path(__file__).resolve()} --cleanup""")


# ---------------------------------------------------------------------------------------------

def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="leave the demo running and print how to explore it")
    ap.add_argument("--cleanup", action="store_true", help="remove a demo left by --keep (or an aborted run)")
    opts = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)

    if opts.cleanup:
        problems = teardown(None)
        print("\n".join(problems) or "demo removed")
        return 1 if problems else 0

    ipamd: subprocess.Popen[bytes] | None = None
    warm: subprocess.Popen[bytes] | None = None
    ok = False
    try:
        preflight()
        teardown(None)  # leftovers of an aborted or kept earlier run
        WORK.mkdir(parents=True)
        ipamd = start_ipamd()
        warm = start_warm_server()
        build_underlay()
        write_configs()
        results = attach_pods()
        ping_matrix(results)
        later_pod()
        show_ovs()
        show_leases()
        ok = True
    except DemoFailed as exc:
        print(f"\n\033[31mdemo failed:\033[0m {exc}", file=sys.stderr)
        if ipamd is not None:
            print(f"ipamd log (last lines):\n{tail(WORK / 'ipamd.log')}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # let the teardown finish
            signal.signal(sig, signal.SIG_IGN)
        if ok and opts.keep:
            print_keep_help()
        else:
            step("Clean up")
            problems = teardown(ipamd, warm)
            for p in problems:
                print(f"   cleanup problem: {p}", file=sys.stderr)
            ok = ok and not problems
            info("removed pods, ipamd, the warm server, bridges, router namespaces and the work dir")
    if ok:
        print("\n\033[32mdemo passed\033[0m")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
