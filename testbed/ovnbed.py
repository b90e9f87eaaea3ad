"""Real OVN for the tests: a central and chassis made of Debian's ovn-central / ovn-host binaries.

- `Central`: the NB and SB ovsdb-servers (schemas from /usr/share/ovn) and ovn-northd, on unix
  sockets in a temp dir (reachable from every netns). They run in a netns of their own, whose
  Linux bridge "mgmt" (10.254.0.1/24) is the management network that `attach(node)` wires a
  node into; with `tls=True` the NB also listens on pssl:6641 there, with a CA and
  certificates made by `ovs-pki`. Not the packaged services: nothing under /var/run/ovn.
- `Chassis`: ovn-controller inside a nodebed.Node, against that node's private OVS (its
  Open_vSwitch row carries system-id, ovn-remote, ovn-encap-ip and ovn-bridge-mappings, which are
  global to an OVS instance, so never the system OVS). br-int uses the userspace datapath and
  geneve encapsulation to the node's own address.

Every daemon is a child process tracked in netbed.PROCS (the session-end check kills survivors);
every logical object a test makes carries the run's TOKEN in its name and is removed by the
test's finalizer. The oracles are `ovn-nbctl` / `ovn-sbctl`, never the code under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import netbed, nodebed

NB_SCHEMA = "/usr/share/ovn/ovn-nb.ovsschema"
SB_SCHEMA = "/usr/share/ovn/ovn-sb.ovsschema"
WORKDIR_PREFIX = f"ou-t{netbed.TOKEN}-ovn-"


def _wait(cond: Callable[[], bool], wait_s: float, what: str) -> None:
    deadline = time.monotonic() + wait_s
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {wait_s}s waiting for {what}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _decode(v: Any) -> Any:
    return netbed._ovs_value(v)


# ---------------------------------------------------------------------------------------------
# Central


@dataclass
class Tls:
    """A CA and one client certificate for the NB's ssl: listener (made by ovs-pki)."""

    private_key: str
    certificate: str
    ca_cert: str


MGMT_NET = "10.254.0"
NB_SSL_PORT = 6641


@dataclass
class Central:
    workdir: Path
    netns: netbed.Netns
    tls: Tls | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    attached: list[str] = field(default_factory=list)  # node netns wired to mgmt

    @property
    def nb_sock(self) -> str:
        return str(self.workdir / "nb.sock")

    @property
    def sb_sock(self) -> str:
        return str(self.workdir / "sb.sock")

    @property
    def nb(self) -> str:
        return f"unix:{self.nb_sock}"

    @property
    def sb(self) -> str:
        return f"unix:{self.sb_sock}"

    @property
    def nb_ssl(self) -> str:
        """The NB's ssl: remote, as seen from an attached node."""
        return f"ssl:{MGMT_NET}.1:{NB_SSL_PORT}"

    def attach(self, node: nodebed.Node) -> str:
        """Wire `node` into the management network (its "mgmt0", 10.254.0.N/24); returns the address."""
        n = len(self.attached) + 2
        ours, theirs = netbed.uniq("mg"), netbed.uniq("mn")
        netbed.sh("ip", "link", "add", ours, "netns", self.netns.name, "type", "veth", "peer", "name", theirs,
                  "netns", node.ns)
        netbed.sh("ip", "link", "set", ours, "master", "mgmt", "up", ns=self.netns.name)
        node.exec("ip", "link", "set", theirs, "name", "mgmt0")
        node.exec("ip", "addr", "add", f"{MGMT_NET}.{n}/24", "dev", "mgmt0")
        node.exec("ip", "link", "set", "mgmt0", "up")
        self.attached.append(node.ns)
        return f"{MGMT_NET}.{n}"

    def env(self) -> dict[str, str]:
        d = str(self.workdir)
        return {**os.environ, "OVS_RUNDIR": d, "OVN_RUNDIR": d, "OVS_LOGDIR": d, "OVN_LOGDIR": d}

    def _popen(self, name: str, *args: str) -> None:
        with open(self.workdir / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns.name, *args], env=self.env(),
                                    stdout=out, stderr=out, cwd=self.workdir)
        netbed.PROCS.append(proc)
        self.procs[name] = proc

    def _db_server(self, name: str, schema: str, extra: list[str]) -> None:
        db = self.workdir / f"{name}.db"
        if not db.exists():
            subprocess.run(["ovsdb-tool", "create", str(db), schema], check=True, capture_output=True)
        sock = self.workdir / f"{name}.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        self._popen(name, "ovsdb-server", str(db), f"--remote=punix:{sock}", *extra,
                    f"--unixctl={self.workdir}/{name}.ctl", f"--pidfile={self.workdir}/{name}.pid",
                    f"--log-file={self.workdir}/{name}.log", "-vconsole:off", "--no-chdir")
        _wait(sock.exists, 15, f"{name} ovsdb-server socket")

    def start(self) -> None:
        extra: list[str] = []
        if self.tls is not None:
            pki = self.workdir / "pki"
            extra = [f"--remote=pssl:{NB_SSL_PORT}:{MGMT_NET}.1", f"--private-key={pki}/server-privkey.pem",
                     f"--certificate={pki}/server-cert.pem", f"--ca-cert={self.tls.ca_cert}"]
        self._db_server("nb", NB_SCHEMA, extra)
        self._db_server("sb", SB_SCHEMA, [])
        self.nbctl("init")
        self.sbctl("init")
        self.start_northd()

    def start_northd(self) -> None:
        self._popen("northd", "ovn-northd", f"--ovnnb-db={self.nb}", f"--ovnsb-db={self.sb}",
                    f"--unixctl={self.workdir}/northd.ctl", f"--pidfile={self.workdir}/northd.pid",
                    f"--log-file={self.workdir}/northd.log", "-vconsole:off", "--no-chdir")

    def stop_northd(self) -> None:
        _stop(self.procs.pop("northd", None))

    def stop(self) -> None:
        for name in ("northd", "sb", "nb"):
            _stop(self.procs.pop(name, None))

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.netns.delete()  # and with it the mgmt bridge and every node's mgmt0 peer
        shutil.rmtree(self.workdir, ignore_errors=True)

    def nbctl(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(["ovn-nbctl", f"--db={self.nb}", "--timeout=20", *args], capture_output=True,
                             text=True, timeout=30, env=self.env())
        if check and res.returncode:
            raise RuntimeError(f"ovn-nbctl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def sbctl(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(["ovn-sbctl", f"--db={self.sb}", "--timeout=20", *args], capture_output=True,
                             text=True, timeout=30, env=self.env())
        if check and res.returncode:
            raise RuntimeError(f"ovn-sbctl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def _rows(self, ctl: Callable[..., str], table: str, columns: tuple[str, ...],
              where: tuple[str, ...]) -> list[dict[str, Any]]:
        cmd = ["--format=json", "--data=json"]
        if columns:
            cmd.append("--columns=" + ",".join(columns))
        cmd += ["find" if where else "list", table, *where]
        data = json.loads(ctl(*cmd))
        return [{h: _decode(v) for h, v in zip(data["headings"], row, strict=True)} for row in data["data"]]

    def nb_rows(self, table: str, *columns: str, where: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return self._rows(self.nbctl, table, columns, where)

    def sb_rows(self, table: str, *columns: str, where: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return self._rows(self.sbctl, table, columns, where)

    def lsp(self, name: str) -> dict[str, Any] | None:
        rows = self.nb_rows("Logical_Switch_Port", where=(f"name={name}",))
        return rows[0] if rows else None

    def switch_ports(self, switch: str) -> list[str]:
        out = self.nbctl("lsp-list", switch, check=False)
        return [line.split("(")[1].rstrip(")") for line in out.splitlines() if "(" in line]

    def binding_chassis(self, logical_port: str) -> str | None:
        """The name of the chassis whose ovn-controller claimed `logical_port` (SB Port_Binding)."""
        rows = self.sb_rows("Port_Binding", "chassis", where=(f"logical_port={logical_port}",))
        if not rows or not rows[0]["chassis"]:
            return None
        return self.sbctl("get", "Chassis", str(rows[0]["chassis"]), "name").strip().strip('"')

    def delete_switch(self, name: str) -> None:
        self.nbctl("--if-exists", "ls-del", name, check=False)


def make_tls(workdir: Path) -> Tls:
    """A throw-away PKI: CA, server and client certificates (ovs-pki, no prompts)."""
    pki = workdir / "pki"
    subprocess.run(["ovs-pki", "--dir", str(pki / "ca"), "init", "--force"], check=True, capture_output=True)
    for who in ("server", "client"):  # a relative name: it becomes the CN, which has 64 chars at most
        subprocess.run(["ovs-pki", "--dir", str(pki / "ca"), "req+sign", who, "switch", "--force"],
                       check=True, capture_output=True, cwd=pki, stdin=subprocess.DEVNULL)
    return Tls(str(pki / "client-privkey.pem"), str(pki / "client-cert.pem"),
               str(pki / "ca" / "switchca" / "cacert.pem"))


def start_central(tls: bool = False) -> Central:
    c = Central(Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX + "central-")), netbed.make_netns("ovn"))
    try:
        netbed.sh("ip", "link", "add", "mgmt", "type", "bridge", ns=c.netns.name)
        netbed.sh("ip", "addr", "add", f"{MGMT_NET}.1/24", "dev", "mgmt", ns=c.netns.name)
        netbed.sh("ip", "link", "set", "mgmt", "up", ns=c.netns.name)
        if tls:
            c.tls = make_tls(c.workdir)
        c.start()
    except BaseException:
        c.destroy()
        raise
    return c


# ---------------------------------------------------------------------------------------------
# Chassis


@dataclass
class Chassis:
    """ovn-controller on a node: the node's OVS is its Open_vSwitch, `name` its system-id."""

    node: nodebed.Node
    central: Central
    name: str
    encap_ip: str
    proc: subprocess.Popen[bytes] | None = None

    def configure(self, bridge_mappings: Mapping[str, str] | None = None) -> None:
        ids = {"system-id": self.name, "ovn-remote": self.central.sb, "ovn-encap-type": "geneve",
               "ovn-encap-ip": self.encap_ip, "ovn-bridge": "br-int",
               "ovn-bridge-datapath-type": "netdev"}
        if bridge_mappings is not None:
            ids["ovn-bridge-mappings"] = ",".join(f"{k}:{v}" for k, v in bridge_mappings.items())
        self.node.vsctl("set", "Open_vSwitch", ".", *[f'external_ids:{k}="{v}"' for k, v in ids.items()])

    def set_bridge_mappings(self, mappings: Mapping[str, str]) -> None:
        text = ",".join(f"{k}:{v}" for k, v in mappings.items())
        if text:
            self.node.vsctl("set", "Open_vSwitch", ".", f'external_ids:ovn-bridge-mappings="{text}"')
        else:
            self.node.vsctl("remove", "Open_vSwitch", ".", "external_ids", "ovn-bridge-mappings")

    def start(self, wait_s: float = 30) -> None:
        self.node.vsctl("--may-exist", "add-br", "br-int", "--", "set", "Bridge", "br-int",
                        "datapath_type=netdev", "fail_mode=secure", "other_config:disable-in-band=true")
        d = self.node.workdir
        with open(d / "ovn-controller.out", "ab") as out:
            self.proc = self.node.popen(
                "ovn-controller", self.node.ovsdb, f"--pidfile={d}/ovn-controller.pid",
                f"--log-file={d}/ovn-controller.log", "-vconsole:off", "--no-chdir",
                env={"OVN_RUNDIR": str(d), "OVN_LOGDIR": str(d)}, stdout=out, stderr=out)
        _wait(lambda: self._registered(), wait_s, f"chassis {self.name} in the SB")

    def _registered(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ovn-controller exited:\n{self.log()}")
        return bool(self.central.sb_rows("Chassis", "name", where=(f"name={self.name}",)))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.proc, sig)
        self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return (self.node.workdir / "ovn-controller.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):  # the SB row of a stopped chassis stays: remove it
            self.central.sbctl("--if-exists", "chassis-del", self.name, check=False)


def make_chassis(node: nodebed.Node, central: Central, encap_ip: str,
                 bridge_mappings: Mapping[str, str] | None = None) -> Chassis:
    ch = Chassis(node, central, f"t{netbed.TOKEN}-{node.name}", encap_ip)
    try:
        ch.configure(bridge_mappings)
        ch.start()
    except BaseException:
        ch.destroy()
        raise
    return ch


def leftovers() -> list[str]:
    found = []
    for d in Path(tempfile.gettempdir()).glob(WORKDIR_PREFIX + "*"):
        found.append(f"OVN run dir {d}")
        shutil.rmtree(d, ignore_errors=True)
    return found


def make_ovn_node(central: Central, tor: nodebed.Tor, name: str,
                  bridge_mappings: Mapping[str, str] | None = None) -> tuple[nodebed.Node, Chassis]:
    """A nodebed node that is an OVN chassis and can tunnel: its NIC eth1 (on `tor`) is a port
    of `br-ex` (netdev), whose internal port holds the node's address and default route. The
    userspace datapath sends geneve only from an address on an OVS bridge (it routes and ARPs
    tunnels itself), so this is how a netdev chassis reaches the others, as on real DPDK nodes.
    The node is also wired into the central's management network (ssl: NB). Undo: the caller
    destroys the chassis, then the node."""
    node = nodebed.make_node(name)
    try:
        nic = tor.plug(node)
        central.attach(node)
        addr = nic.addresses[0]
        node.vsctl("add-br", "br-ex", "--", "set", "Bridge", "br-ex", "datapath_type=netdev",
                   "--", "add-port", "br-ex", nic.name)
        node.exec("ip", "addr", "flush", "dev", nic.name)
        node.exec("ip", "addr", "add", addr, "dev", "br-ex")
        node.exec("ip", "link", "set", "br-ex", "up")
        node.exec("ip", "route", "replace", "default", "via", nic.gateways[0], "dev", "br-ex")
        chassis = make_chassis(node, central, addr.split("/")[0], bridge_mappings)
    except BaseException:
        node.destroy()
        raise
    return node, chassis
