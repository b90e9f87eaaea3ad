#!/usr/bin/env python3
"""Three nodes' ipamds on one etcd, pods of all three on one VLAN (`make demo-cluster`).

What it does (all on this machine; the work dir is /tmp/ovs-underlay-demo-cluster):
1. starts a local etcd (Debian's etcd-server) on a loopback port (testbed/etcd.py),
2. starts three ipamds (the frozen `ovs-underlay-ipamd serve --store etcd`), one per "node",
   each with its own socket, state directory and --node-name,
3. builds the underlay (testbed/netbed.py): an OVS bridge the three nodes share (one machine),
   a trunk to a ToR bridge and a router netns holding the VLAN 100 gateway 192.168.110.1,
4. writes one CNI network config per node (the same network `cluster100`, each pointing at its
   node's ipamd socket) and attaches two pods per node with `cnitool add`,
5. pings: every pod reaches a pod of every other node and the gateway,
6. shows `ovs-underlay-ipamd nodes` (the blocks each node claimed) and the leases with their node,
7. tears everything down (also on Ctrl-C): cnitool del, ipamds, etcd, bridges, netns.
Exits non-zero when a step fails, an address is handed out twice, or a ping fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed import netbed  # noqa: E402  (after the path: scripts/ is not a package)
from testbed.etcd import EtcdCluster, start_cluster  # noqa: E402

DIST = ROOT / "dist" / "ovs-underlay"
IPAMD = DIST / "ovs-underlay-ipamd"
CNITOOL = ROOT / "build" / "cnitool" / "cnitool"
WORK = Path("/tmp/ovs-underlay-demo-cluster")
NETWORK, VLAN, SUBNET, GATEWAY = "cluster100", 100, "192.168.110.0/24", "192.168.110.1"
NODES = ("demo-node1", "demo-node2", "demo-node3")
PODS_PER_NODE = 2


class DemoFailed(Exception):
    pass


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def info(text: str) -> None:
    print(f"   {text}", flush=True)


def run(*cmd: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if check and r.returncode != 0:
        raise DemoFailed(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


class Demo:
    def __init__(self) -> None:
        self.etcd: EtcdCluster | None = None
        self.ipamds: dict[str, netbed.Ipamd] = {}
        self.underlay: netbed.Underlay | None = None
        self.pods: list[tuple[str, netbed.Netns]] = []  # (node, netns)

    def sock(self, node: str) -> str:
        return str(WORK / node / "ipamd.sock")

    def netconf(self, node: str) -> Path:
        return WORK / node / "net.d"

    def cnitool(self, verb: str, node: str, ns: netbed.Netns) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "NETCONFPATH": str(self.netconf(node)), "CNI_PATH": f"{DIST}:/usr/lib/cni",
               "CNI_IFNAME": "eth0", "CNI_CONTAINERID": f"ovs-underlay-{ns.name}",
               "CNI_ARGS": f"IgnoreUnknown=true;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={ns.name}",
               "OVS_UNDERLAY_LOG_FILE": str(WORK / "ovs-underlay.log")}
        return run(str(CNITOOL), verb, NETWORK, ns.path, env=env, check=verb == "add")

    def start(self) -> None:
        step("Preflight")
        if os.geteuid() != 0:
            raise DemoFailed("run as root (network namespaces, veths, OVS)")
        missing = [str(p) for p in (DIST / "ovs-underlay", IPAMD, CNITOOL) if not os.access(p, os.X_OK)]
        if missing:
            raise DemoFailed(f"missing {', '.join(missing)}: run `make setup binary cnitool` first")
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)

        step("Start a local etcd (loopback)")
        self.etcd = start_cluster(1, workdir=str(WORK / "etcd"))
        info(f"etcd {self.etcd.endpoints[0]}, data in {WORK / 'etcd'}")

        step("Start three nodes' ipamds on it (--store etcd)")
        for node in NODES:
            d = WORK / node
            d.mkdir()
            args = [*self.etcd.ipamd_args("/ovs-underlay-demo"), "--node-name", node]
            argv = [str(IPAMD), "serve", "--socket", self.sock(node), "--state-dir", str(d / "state"), *args]
            ipamd = netbed.Ipamd(self.sock(node), str(d / "state"), None, str(d / "ipamd.log"), argv)
            ipamd.start(wait_s=30)
            self.ipamds[node] = ipamd
            info(f"{node}: socket {self.sock(node)}, journal {d / 'state' / 'etcd-journal.db'}")

        step(f"Build the underlay: one bridge, trunk to a ToR, VLAN {VLAN} router {GATEWAY}")
        self.underlay = netbed.make_underlay({VLAN: [f"{GATEWAY}/24"]})
        info(f"bridge {self.underlay.bridge} (the three nodes share it on this machine), "
             f"ToR {self.underlay.tor}")

    def attach(self) -> dict[str, str]:
        assert self.underlay is not None
        step(f"Attach {PODS_PER_NODE} pods per node with `cnitool add` (network {NETWORK}, each node's "
             "config points at its own ipamd)")
        for node in NODES:
            self.netconf(node).mkdir()
            conf = {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [{
                "type": "ovs-underlay", "bridge": self.underlay.bridge, "vlan": VLAN,
                "ipam": {"type": "ovs-underlay-ipam", "daemonSocket": self.sock(node),
                         "subnets": [{"subnet": SUBNET, "gateway": GATEWAY}],
                         "exclude": ["192.168.110.200-192.168.110.254"], "routes": [{"dst": "0.0.0.0/0"}],
                         "gatewayCheckTimeoutMs": 2000}}]}
            (self.netconf(node) / f"10-{NETWORK}.conflist").write_text(json.dumps(conf, indent=2))
        addrs: dict[str, str] = {}
        for node in NODES:
            for _ in range(PODS_PER_NODE):
                ns = netbed.make_netns("pod")
                self.pods.append((node, ns))
                result = json.loads(self.cnitool("add", node, ns).stdout)
                addrs[ns.name] = result["ips"][0]["address"].split("/")[0]
                info(f"{node}: pod {ns.name} eth0 {result['ips'][0]['address']}")
        if len(set(addrs.values())) != len(addrs):
            raise DemoFailed(f"an address was handed out twice: {addrs}")
        return addrs

    def ping(self, addrs: dict[str, str]) -> None:
        step("Ping: every pod reaches the first pod of every other node, and the gateway")
        first = {}
        for node, ns in self.pods:
            first.setdefault(node, addrs[ns.name])
        failed = []
        for node, ns in self.pods:
            cells = []
            for target, a in [*((n, a) for n, a in first.items() if n != node), ("gateway", GATEWAY)]:
                ok = netbed.ping_retry(ns.name, a)
                cells.append(f"{target} {a} {'ok' if ok else 'FAILED'}")
                if not ok:
                    failed.append(f"{ns.name} -> {a}")
            info(f"{ns.name} ({node}): " + ", ".join(cells))
        if failed:
            raise DemoFailed("pings failed: " + ", ".join(failed))

    def show(self) -> None:
        step("ovs-underlay-ipamd nodes (blocks claimed by each node)")
        out = run(str(IPAMD), "nodes", "--socket", self.sock(NODES[0])).stdout
        print("\n".join("   " + line for line in out.splitlines()))
        step("ovs-underlay-ipamd leases (each lease records its node)")
        out = run(str(IPAMD), "leases", "--socket", self.sock(NODES[1])).stdout
        print("\n".join("   " + line for line in out.splitlines()))

    def teardown(self) -> list[str]:
        problems = []
        for node, ns in reversed(self.pods):
            r = self.cnitool("del", node, ns)
            if r.returncode != 0:
                problems.append(f"cnitool del {ns.name}: {r.stdout}{r.stderr}")
            ns.delete()
        for ipamd in self.ipamds.values():
            ipamd.stop()
        if self.underlay is not None:
            self.underlay.destroy()
        if self.etcd is not None:
            self.etcd.destroy()
        shutil.rmtree(WORK, ignore_errors=True)
        return problems


def main() -> int:
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))
    demo = Demo()
    ok = False
    try:
        demo.start()
        demo.ping(demo.attach())
        demo.show()
        ok = True
    except DemoFailed as exc:
        print(f"\n\033[31mdemo failed:\033[0m {exc}", file=sys.stderr)
        for node, ipamd in demo.ipamds.items():
            print(f"--- {node} ipamd log:\n{ipamd.log()[-1500:]}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        step("Clean up")
        problems = demo.teardown()
        for p in problems:
            print(f"   cleanup problem: {p}", file=sys.stderr)
        ok = ok and not problems
    print("\n\033[32mdemo-cluster passed\033[0m" if ok else "\n\033[31mdemo-cluster failed\033[0m")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
