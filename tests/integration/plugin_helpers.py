"""Exec the `ovs-underlay` plugin as a process (`python -m cni`), the way a runtime does.

`run_plugin` returns (exit code, parsed stdout JSON or None, stderr). `Attachment` remembers the
env of one ADD so tests can DEL it in a finalizer even when they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import netbed

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
CNI_PATH = "/usr/lib/cni"
LOG_FILE = os.environ.get("OU_PLUGIN_LOG", str(netbed.plugin_log("plugin")))


def host_ifname(container_id: str, ifname: str) -> str:
    """Independent re-statement of the naming rule (the lead's decision), not imported from cni."""
    return "ovu" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:12]


def run_plugin(command: str, conf: dict[str, Any] | bytes | str, *, container_id: str = "", netns: str = "",
               ifname: str = "eth0", cni_args: str = "", cni_path: str = CNI_PATH,
               extra_env: dict[str, str] | None = None, timeout: float = 60,
               prefix: tuple[str, ...] = ()) -> tuple[int, Any, str]:
    """`prefix` wraps the command, e.g. `("ip", "netns", "exec", NODE)` to run the plugin where a
    nodebed node's OVS runs."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update({"CNI_COMMAND": command, "CNI_PATH": cni_path, "OVS_UNDERLAY_LOG_FILE": LOG_FILE})
    if container_id:
        env["CNI_CONTAINERID"] = container_id
    if netns:
        env["CNI_NETNS"] = netns
    if ifname:
        env["CNI_IFNAME"] = ifname
    if cni_args:
        env["CNI_ARGS"] = cni_args
    env.update(extra_env or {})
    data = conf if isinstance(conf, bytes) else (conf.encode() if isinstance(conf, str) else json.dumps(conf).encode())
    proc = subprocess.run([*prefix, PYTHON, "-m", "cni"], input=data, env=env, capture_output=True, cwd=ROOT,
                          timeout=timeout, check=False)
    out = proc.stdout.decode()
    try:
        parsed = json.loads(out) if out.strip() else None
    except ValueError:
        parsed = {"__unparsable__": out}
    return proc.returncode, parsed, proc.stderr.decode(errors="replace")


@dataclass
class Attachment:
    conf: dict[str, Any]
    container_id: str
    netns: str  # path
    ifname: str = "eth0"
    cni_args: str = ""
    result: Any = None
    deleted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    run_kw: dict[str, Any] = field(default_factory=dict)  # run_plugin options of every call (prefix, env)

    @property
    def host(self) -> str:
        return host_ifname(self.container_id, self.ifname)

    def run(self, command: str, conf: dict[str, Any] | None = None, **kw: Any) -> tuple[int, Any, str]:
        return run_plugin(command, conf or self.conf, container_id=self.container_id, netns=self.netns,
                          ifname=self.ifname, cni_args=self.cni_args, **{**self.run_kw, **kw})

    def add(self, **kw: Any) -> Any:
        rc, out, err = self.run("ADD", **kw)
        assert rc == 0, f"ADD failed rc={rc} out={out} stderr={err[-2000:]}"
        self.result = out
        return out

    def delete(self) -> tuple[int, Any, str]:
        res = self.run("DEL")
        self.deleted = res[0] == 0
        return res


class Attacher:
    """Creates attachments and DELs every one of them at teardown (even after failures)."""

    def __init__(self) -> None:
        self.made: list[Attachment] = []

    def new(self, conf: dict[str, Any], netns: str, *, ifname: str = "eth0", cni_args: str = "",
            role: str = "c") -> Attachment:
        a = Attachment(conf, netbed.container_id(role), netns, ifname, cni_args)
        self.made.append(a)
        return a

    def cleanup(self) -> None:
        for a in reversed(self.made):
            if not a.deleted:
                a.delete()


def network(bridge: str, name: str | None = None, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {"cniVersion": version, "name": name or f"net{netbed.TOKEN}", "type": "ovs-underlay",
                            "bridge": bridge}  # no datapathType: the default accepts the netdev bridge
    conf.update(extra)
    return conf


def host_local(subnet: str, data_dir: str, **extra: Any) -> dict[str, Any]:
    rng: dict[str, Any] = {"subnet": subnet}
    rng.update(extra.pop("range", {}))
    return {"type": "host-local", "dataDir": data_dir, "ranges": [[rng]], **extra}


def wait_for(pred: Any, timeout: float = 5.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def no_trace(a: Attachment, bridge: str | None = None) -> list[str]:
    """What is left of an attachment: host veth, OVS port, OVS interface by container id."""
    left = []
    if netbed.link(a.host) is not None:
        left.append(f"veth {a.host}")
    if netbed.port(a.host) is not None:
        left.append(f"port {a.host}")
    for row in netbed.ovs_rows("Interface", "name", "external_ids"):
        if (row.get("external_ids") or {}).get("container_id") == a.container_id:
            left.append(f"interface {row['name']}")
    if bridge and a.host in netbed.bridge_ports(bridge):
        left.append(f"bridge port {a.host}")
    return left
