"""End-to-end helpers: the frozen bundle, a real CNI runtime (cnitool) and example configs.

The e2e tests drive the product the way a node does: the FROZEN binaries from
`dist/ovs-underlay/` (PyInstaller bundle), exec'd by `cnitool` (the reference runtime CLI built
from Debian's golang-github-appc-cni source, libcni 1.1.2) with NETCONFPATH/CNI_PATH, and
assert through the test bed's oracles (`ip -j`, `ovs-vsctl`), never through our own code.

Both artefacts are built on demand, once: the bundle when dist/ is missing or older than any
source file (under a file lock, so concurrent sessions in one tree do not build over each
other), cnitool when build/cnitool/cnitool is missing.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import netbed

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist" / "ovs-underlay"
CNITOOL_DIR = ROOT / "build" / "cnitool"
CNITOOL = CNITOOL_DIR / "cnitool"
EXAMPLES = ROOT / "conf-examples"
REFERENCE_PLUGINS = Path("/usr/lib/cni")
BUILD = ROOT / "scripts" / "build-bundle.sh"
SHIM_SOURCE = ROOT / "packaging" / "shim" / "ovs-underlay-shim.c"
# ovs-underlay is the native warm-path client; it execs ovs-underlay-py (the Python plugin).
PROGRAMS = ("ovs-underlay", "ovs-underlay-ipam", "ovs-underlay-ipamd", "ovs-underlay-py")
LIBCNI_CACHE = Path("/var/lib/cni")
# Inputs of the bundle: a newer file means dist/ is stale (packaging/ holds the shim's .c).
_SOURCES = ("cni", "ipamd", "packaging", "pyproject.toml", "scripts/build-bundle.sh")


# ---------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    (ROOT / "build").mkdir(exist_ok=True)
    with open(ROOT / "build" / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _newest_source() -> float:
    newest = 0.0
    for entry in _SOURCES:
        p = ROOT / entry
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        newest = max([newest, *(f.stat().st_mtime for f in files)])
    return newest


def bundle_is_fresh() -> bool:
    exes = [DIST / p for p in PROGRAMS]
    if not all(e.exists() for e in exes) or not (DIST / "_internal").is_dir():
        return False
    return min(e.stat().st_mtime for e in exes) >= _newest_source()


def ensure_bundle() -> Path:
    """dist/ovs-underlay/, rebuilt (scripts/build-bundle.sh, as `make binary`) when missing or stale."""
    with _lock("bundle"):
        if not bundle_is_fresh():
            t0 = time.monotonic()
            res = subprocess.run([str(BUILD)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                                 env={**os.environ, "PYTHON_BIN": str(Path(sys.executable).parent)})
            if res.returncode != 0:
                raise RuntimeError(f"build-bundle.sh failed ({res.returncode}):\n{res.stderr[-4000:]}")
            sys.stderr.write(f"e2e: built {DIST} in {time.monotonic() - t0:.1f}s\n")
            for exe in PROGRAMS:  # mark the build time, not the copy time of an old artefact
                os.utime(DIST / exe)
    return DIST


def ensure_cnitool() -> Path:
    """build/cnitool/cnitool from Debian's source package (scripts/build-cnitool.sh, cached)."""
    with _lock("cnitool"):
        if not os.access(CNITOOL, os.X_OK):
            res = subprocess.run([str(ROOT / "scripts" / "build-cnitool.sh"), str(CNITOOL_DIR)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise RuntimeError(f"build-cnitool.sh failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return CNITOOL


# ---------------------------------------------------------------------------------------------
# Running the frozen binaries and cnitool


def run_frozen(program: str, *args: str, env: Mapping[str, str] | None = None, stdin: str = "",
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DIST / program), *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@dataclass
class CniResult:
    """One cnitool call: exit code, stdout (the CNI result or error JSON) and stderr."""

    rc: int
    stdout: str
    stderr: str
    argv: list[str]

    def json(self) -> Any:
        return json.loads(self.stdout)

    def ok(self) -> CniResult:
        if self.rc != 0:
            raise AssertionError(f"{' '.join(self.argv)} failed ({self.rc}):\n{self.stdout}\n{self.stderr}")
        return self


@dataclass
class Cnitool:
    """A container runtime in a box: NETCONFPATH holds the configs, CNI_PATH finds the plugins.

    `container_id` goes through the CNI_CONTAINERID patch of build-cnitool.sh (upstream
    cnitool derives it from the netns path), so ids come from `netbed.container_id()`."""

    netconfpath: Path
    cni_path: Sequence[Path]
    binary: Path = CNITOOL
    calls: list[list[str]] = field(default_factory=list)

    def run(self, verb: str, network: str, netns: str, *, container_id: str, ifname: str = "eth0",
            cni_args: str | Mapping[str, str] | None = None, cap_args: Mapping[str, Any] | None = None,
            timeout: float = 60) -> CniResult:
        env = {
            **os.environ,
            "NETCONFPATH": str(self.netconfpath),
            "CNI_PATH": ":".join(str(p) for p in self.cni_path),
            "CNI_IFNAME": ifname,
            "CNI_CONTAINERID": container_id,
        }
        if cni_args:
            env["CNI_ARGS"] = cni_args if isinstance(cni_args, str) else ";".join(f"{k}={v}" for k, v in cni_args.items())
        if cap_args:
            env["CAP_ARGS"] = json.dumps(cap_args)
        argv = [str(self.binary), verb, network, netns]
        self.calls.append(argv)
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        return CniResult(res.returncode, res.stdout, res.stderr, argv)

    def add(self, network: str, netns: str, **kw: Any) -> CniResult:
        return self.run("add", network, netns, **kw)

    def check(self, network: str, netns: str, **kw: Any) -> CniResult:
        return self.run("check", network, netns, **kw)

    def delete(self, network: str, netns: str, **kw: Any) -> CniResult:
        return self.run("del", network, netns, **kw)


def forget_cached_results(container_id: str) -> None:
    """libcni caches ADD results under /var/lib/cni/results; DEL removes them. After a failed
    test, drop ours so no state of this run survives it."""
    results = LIBCNI_CACHE / "results"
    if results.is_dir():
        for f in results.iterdir():
            if container_id in f.name:
                with contextlib.suppress(OSError):
                    f.unlink()


def start_frozen_ipamd(workdir: Path) -> netbed.Ipamd:
    """ipamd from the bundle (not `python -m ipamd`) on a private socket and state dir under
    `workdir`; the caller stops it."""
    state = workdir / "state"
    state.mkdir(parents=True, exist_ok=True)
    sock = str(workdir / "ipamd.sock")
    args = [str(DIST / "ovs-underlay-ipamd"), "serve", "--socket", sock, "--state-dir", str(state)]
    d = netbed.Ipamd(sock, str(state), None, str(workdir / "ipamd.log"), args)
    d.start()
    return d


# ---------------------------------------------------------------------------------------------
# Configs


def load_example(name: str) -> dict[str, Any]:
    return dict(json.loads((EXAMPLES / name).read_text()))


def adapt(conf: Mapping[str, Any], *, bridge: str | None = None, daemon_socket: str | None = None,
          name: str | None = None, cni_version: str | None = None) -> dict[str, Any]:
    """An example made runnable on the test bed: our bridge and the test ipamd's socket. The
    datapath is left alone: the examples run unchanged on the bed's userspace (netdev) bridges."""
    out = copy.deepcopy(dict(conf))
    if name:
        out["name"] = name
    if cni_version:
        out["cniVersion"] = cni_version
        out.pop("cniVersions", None)
    for p in out.get("plugins", [out]):
        if p.get("type") == "ovs-underlay" and bridge:
            p["bridge"] = bridge
        ipam = p.get("ipam")
        if ipam and ipam.get("type") == "ovs-underlay-ipam" and daemon_socket:
            ipam["daemonSocket"] = daemon_socket
    return out


def write_conf(netconfpath: Path, conf: Mapping[str, Any], prio: int = 10) -> Path:
    """Store a network config the way libcni finds it by name (`.conflist` or `.conf`)."""
    netconfpath.mkdir(parents=True, exist_ok=True)
    suffix = ".conflist" if "plugins" in conf else ".conf"
    path = netconfpath / f"{prio:02d}-{conf['name']}{suffix}"
    path.write_text(json.dumps(conf, indent=2))
    return path


def network_status(result: Mapping[str, Any], network: str) -> list[dict[str, Any]]:
    """What Multus (NAD client CreateNetworkStatuses) derives from a CNI result: one entry per
    interface with a sandbox, IPs mapped by `ips[].interface`, gateway only from default routes."""
    ifaces = result.get("interfaces", [])
    sandboxed = [i for i, itf in enumerate(ifaces) if itf.get("sandbox")]
    gateways = [r["gw"] for r in result.get("routes", []) if r.get("dst") in ("0.0.0.0/0", "::/0") and r.get("gw")]
    out = []
    for idx in sandboxed:
        itf = ifaces[idx]
        ips = [ip["address"].split("/")[0] for ip in result.get("ips", [])
               if ip.get("interface", sandboxed[-1]) == idx]
        out.append({"name": network, "interface": itf["name"], "mac": itf.get("mac", ""), "ips": ips,
                    "gateway": gateways, "dns": result.get("dns", {})})
    return out
