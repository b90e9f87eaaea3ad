"""End-to-end helpers: the frozen bundle, a real CNI runtime (cnitool) and example configs.

The e2e tests drive the product the way a node does: the FROZEN binaries from
`dist/ovs-underlay/` (PyInstaller bundle), exec'd by `cnitool` (the reference runtime CLI built
from Debian's golang-github-appc-cni source, libcni 1.1.2) with NETCONFPATH/CNI_PATH, and
assert through the test bed's oracles (`ip -j`, `ovs-vsctl`), never through our own code.

The artefacts are built on demand, once: the bundle when dist/ is missing or older than any
source file (under a file lock, so concurrent sessions in one tree do not build over each
other), the image archive when it is older than the bundle or its own inputs, cnitool when
build/cnitool/cnitool is missing. podman runs confined to a temp dir (`podman_env`).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
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
# ovs-underlay and ovs-underlay-ipam are the native warm-path client (one C source, built once
# per name); each execs its Python plugin, ovs-underlay-py / ovs-underlay-ipam-py.
PROGRAMS = ("ovs-underlay", "ovs-underlay-ipam", "ovs-underlay-ipam-py", "ovs-underlay-ipamd", "ovs-underlay-node",
            "ovs-underlay-py")  # sorted
LIBCNI_CACHE = Path("/var/lib/cni")
# Inputs of the bundle: a newer file means dist/ is stale (packaging/ holds the shim's .c).
_SOURCES = ("core", "cni", "ipamd", "packaging", "pyproject.toml", "scripts/build-bundle.sh")


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


# In packaging/ but not in the bundle: the image's files (their own freshness: ensure_image).
_NOT_BUNDLE_INPUTS = (ROOT / "packaging" / "image", ROOT / "packaging" / "install-bundle.sh")


def _newest_source() -> float:
    newest = 0.0
    for entry in _SOURCES:
        p = ROOT / entry
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                                          and not any(f == x or x in f.parents for x in _NOT_BUNDLE_INPUTS)]
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


# The image (`make image`): scripts/build_image.py and what it puts into the image.
BUILD_IMAGE = ROOT / "scripts" / "build_image.py"
_IMAGE_SOURCES = ("scripts/build_image.py", "packaging/image", "packaging/install-bundle.sh", "README.md",
                  "pyproject.toml")
sys.path.insert(0, str(ROOT / "scripts"))
import build_image  # noqa: E402

IMAGE_VERSION = build_image.project_version()
IMAGE = build_image.image_name(IMAGE_VERSION)
IMAGE_ARCHIVE = build_image.archive_path(IMAGE_VERSION)


def ensure_image() -> Path:
    """dist/ovs-underlay-<version>.oci.tar, rebuilt (as `make image`) from the bundle when missing
    or older than the bundle or the image's own inputs."""
    ensure_bundle()
    with _lock("image"):
        inputs = [*(DIST / p for p in PROGRAMS)]
        for entry in _IMAGE_SOURCES:
            path = ROOT / entry
            inputs += [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        if not IMAGE_ARCHIVE.exists() or IMAGE_ARCHIVE.stat().st_mtime < max(f.stat().st_mtime for f in inputs):
            t0 = time.monotonic()
            res = subprocess.run([sys.executable, str(BUILD_IMAGE)], cwd=ROOT, capture_output=True, text=True,
                                 timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"build_image.py failed ({res.returncode}):\n{res.stdout}{res.stderr[-4000:]}")
            sys.stderr.write(f"e2e: built {IMAGE_ARCHIVE.name} in {time.monotonic() - t0:.1f}s\n")
    return IMAGE_ARCHIVE


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
    prefix: Sequence[str] = ()  # e.g. ("ip", "netns", "exec", NODE): run where a nodebed node's OVS runs
    env: Mapping[str, str] = field(default_factory=dict)

    def run(self, verb: str, network: str, netns: str, *, container_id: str, ifname: str = "eth0",
            cni_args: str | Mapping[str, str] | None = None, cap_args: Mapping[str, Any] | None = None,
            timeout: float = 60) -> CniResult:
        env = {
            **os.environ,
            **self.env,
            "NETCONFPATH": str(self.netconfpath),
            "CNI_PATH": ":".join(str(p) for p in self.cni_path),
            "CNI_IFNAME": ifname,
            "CNI_CONTAINERID": container_id,
        }
        if cni_args:
            env["CNI_ARGS"] = cni_args if isinstance(cni_args, str) else ";".join(f"{k}={v}" for k, v in cni_args.items())
        if cap_args:
            env["CAP_ARGS"] = json.dumps(cap_args)
        argv = [*self.prefix, str(self.binary), verb, network, netns]
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
    # The probe ports' netns carries the run's token, so the leftover checks see it.
    args = [str(DIST / "ovs-underlay-ipamd"), "serve", "--socket", sock, "--state-dir", str(state),
            "--probe-netns", netbed.uniq("probe", limit=40), *netbed.NO_RECONCILE]
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


# ---------------------------------------------------------------------------------------------
# podman, confined to one directory

# Host config, storage and run state podman would use without our confinement: must not change.
PODMAN_HOST_PATHS = tuple(map(Path, ("/etc/containers", "/etc/cni", "/var/lib/containers", "/run/containers",
                                     "/run/libpod")))


def podman_env(base: Path, network: str | None = None) -> dict[str, str]:
    """containers.conf, storage.conf and an empty registries.conf under `base` (vfs storage,
    file locks and events, tmp dir, network config dir); returns podman's environment.

    What this machine (and CI, same image) forces:
    - OCI runtime runc, not crun: cgroups are hybrid (v1 + a cgroup2 mount holding the `hugetlb`
      controller) and crun 1.8 refuses that outright, even with cgroups disabled. runc does not
      support `cgroups=disabled`, so callers give containers a unique `--cgroup-parent` and
      remove it with `remove_cgroup_tree`.
    - explicit ulimits: as root podman asks for nofile=1048576, and podman itself lowers its
      nproc to 32768, while this root has no CAP_SYS_RESOURCE.
    `network`: the CNI network (a config in base/net.d) used when --network is not given; our
    plugins and the reference plugins are podman's CNI plugin dirs."""
    for d in ("net.d", "tmp", "root", "runroot"):
        (base / d).mkdir()
    plugin_dirs = ", ".join(json.dumps(str(p)) for p in (DIST, REFERENCE_PLUGINS))
    default_network = f"""# A forgotten --network must not fall back to podman's host bridge (cni-podman0); the fixture
# checks that this name is our network, not the bridge podman makes up when a file is rejected.
default_network = "{network}"
""" if network else ""
    (base / "containers.conf").write_text(f"""\
[containers]
cgroups = "no-conmon"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base}/tmp/events.log"
tmp_dir = "{base}/tmp"
lock_type = "file"

[network]
network_backend = "cni"
cni_plugin_dirs = [{plugin_dirs}]
network_config_dir = "{base}/net.d"
{default_network}""")
    (base / "storage.conf").write_text(f"""\
[storage]
driver = "vfs"
graphroot = "{base}/root"
runroot = "{base}/runroot"
""")
    (base / "registries.conf").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CONTAINERS_"))}
    env.update(CONTAINERS_CONF=str(base / "containers.conf"), CONTAINERS_STORAGE_CONF=str(base / "storage.conf"),
               CONTAINERS_REGISTRIES_CONF=str(base / "registries.conf"))
    return env


def podman_load(env: Mapping[str, str], archive: Path) -> subprocess.CompletedProcess[str]:
    """`podman load --input ARCHIVE` into the storage of `env`. podman 4.3 records blob digests in
    /var/lib/containers/cache whatever the storage config says (libimage only moved that cache
    into the graph root in 4.4), so the load runs in a private mount namespace with a throwaway
    tmpfs over that directory (or its nearest existing parent): the machine's cache is not
    touched."""
    target = next(p for p in ("/var/lib/containers/cache", "/var/lib/containers", "/var/lib") if os.path.isdir(p))
    script = f'mount -t tmpfs -o size=64m,mode=0700 ou-blob-cache {target} && exec podman load --input "$1"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(archive)],
                          env=dict(env), capture_output=True, text=True, timeout=300)


def podman_host_state() -> dict[str, int]:
    """mtime of every entry of the host's podman config and storage, three levels deep."""
    state = {}
    for root in PODMAN_HOST_PATHS:
        for dirpath, dirnames, filenames in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            if depth >= 3:
                dirnames.clear()
            for n in [".", *dirnames, *filenames]:
                p = os.path.join(dirpath, n)
                state[os.path.normpath(p)] = os.lstat(p).st_mtime_ns
    return state


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below `base`, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == str(base) or point.startswith(f"{base}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_cgroup_tree(parent: str) -> list[str]:
    """Remove the cgroup `parent` (a --cgroup-parent) from every hierarchy; returns the child
    cgroups that were still there (runc removes a container's own cgroup, not our parent)."""
    if not parent.strip("/") or ".." in parent:
        raise ValueError(f"refusing to remove the cgroup tree {parent!r}: not a cgroup parent of ours")
    left: list[str] = []
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        cg = hierarchy / parent.lstrip("/")
        if not cg.is_dir():
            continue
        for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            left.append(f"cgroup {d}")
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            cg.rmdir()
    return left


def cgroup_pids(parent: str) -> set[int]:
    """Every process in the cgroup `parent` and below (the pids hierarchy)."""
    pids: set[int] = set()
    root = Path("/sys/fs/cgroup/pids") / parent.lstrip("/")
    if root.is_dir():
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in procs.read_text().split())
    return pids
