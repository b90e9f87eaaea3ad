"""The image of `make image`, run by a real runtime (podman 4.3 + runc) the way the DaemonSet runs it.

No kubelet runs here. Instead the containers are made from conf-examples/kubernetes/ itself: the
DaemonSet's args, env, probes, privileged, hostNetwork and hostPID, and its volumes: the
ConfigMap as files, every hostPath as a directory of a per-run "node" root, except /run/netns
and /run/openvswitch, which are this machine's own (the test bed's network namespaces and OVS).
So nothing of the machine's /opt, /run/ovs-underlay or /var/lib is touched, while each container
sees exactly the paths the manifest gives it. The one change: ipamd's metrics port is 0 (a fixed
TCP port on the host network of a shared machine would collide).

What runs: `podman load` of the OCI archive (named as the manifests say), `--version` and every
role's `--help`, the install-cni init container into the node root (twice: idempotent), ipamd
with its three probes and `kubectl exec`-style commands, and a pod attached through the warm
container: the plugin exec'd on the "node" (a process whose mount namespace shows the node root's
directories at their node paths) hands the call to the warm server in the image, ipamd
in the image allocates and checks the gateway inside a netns made after both containers started
(the HostToContainer mounts), then DEL. Stopping the containers must leave no process behind.

podman is confined to one temp dir (e2e.podman_env: vfs storage, file locks, its own config) and
a unique cgroup parent; the image, containers and storage go with the dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import e2e_helpers as e2e
import pytest
import yaml

from testbed import netbed

pytestmark = pytest.mark.timeout(900)  # may build the bundle (PyInstaller) and the image

KUBE = e2e.EXAMPLES / "kubernetes"
SHARED_WITH_THE_BED = ("/run/netns", "/run/openvswitch")
GATEWAY = "192.168.100.1"


def daemonset() -> dict[str, Any]:
    (ds,) = [d for d in yaml.safe_load_all((KUBE / "20-daemonset.yaml").read_text()) if d]
    return dict(ds)


def configmap_data() -> dict[str, str]:
    (cm,) = [d for d in yaml.safe_load_all((KUBE / "10-ipamd-config.yaml").read_text()) if d]
    return dict(cm["data"])


def role(name: str) -> dict[str, Any]:
    spec = daemonset()["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] + spec["initContainers"] if c["name"] == name]
    return dict(c)


@dataclass
class Node:
    """podman with the image loaded, and a directory standing for the node's file system."""

    base: Path
    env: dict[str, str]
    cgroup_parent: str
    host_before: dict[str, int]
    names: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.base / "node"

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr[-3000:]}")
        return res

    def path(self, node_path: str) -> Path:
        """Where a node path lives for this run (created, as hostPath DirectoryOrCreate does)."""
        p = Path(node_path) if node_path in SHARED_WITH_THE_BED else self.root / node_path.lstrip("/")
        p.mkdir(parents=True, exist_ok=True)
        return p

    def run_args(self, c: Mapping[str, Any], name: str, config_overrides: Mapping[str, Any]) -> list[str]:
        """`podman run` options for DaemonSet container `c`, from the manifest."""
        pod = daemonset()["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        opts = ["--name", name, "--cgroup-parent", self.cgroup_parent,
                "--network", "host" if pod.get("hostNetwork") else "none"]
        if pod.get("hostPID"):
            opts += ["--pid", "host"]
        if c.get("securityContext", {}).get("privileged"):
            opts.append("--privileged")
        for e in c.get("env", []):
            opts += ["--env", f"{e['name']}={e['value']}"]
        for m in c.get("volumeMounts", []):
            vol = volumes[m["name"]]
            flags = []
            if m.get("readOnly"):
                flags.append("ro")
            if m.get("mountPropagation") == "HostToContainer":
                flags.append("rslave")
            if "hostPath" in vol:
                source = self.path(vol["hostPath"]["path"])
            else:  # the ConfigMap, as the kubelet projects it: one file per key
                source = self.base / "configmaps" / vol["configMap"]["name"]
                source.mkdir(parents=True, exist_ok=True)
                for key, value in configmap_data().items():
                    data = json.loads(value)
                    data.update(config_overrides)
                    (source / key).write_text(json.dumps(data, indent=2))
                flags = [*{*flags, "ro"}]
            opts += ["--volume", f"{source}:{m['mountPath']}" + (f":{','.join(flags)}" if flags else "")]
        assert c["image"] == e2e.IMAGE and c["imagePullPolicy"] == "IfNotPresent"
        return [*opts, c["image"], *c["args"]]

    def start(self, role_name: str, **overrides: Any) -> str:
        name = f"ou-{netbed.TOKEN}-{role_name}-{len(self.names)}"
        self.names.append(name)
        self("run", "--detach", *self.run_args(role(role_name), name, overrides))
        return name

    def run_once(self, role_name: str) -> subprocess.CompletedProcess[str]:
        name = f"ou-{netbed.TOKEN}-{role_name}-{len(self.names)}"
        self.names.append(name)
        return self("run", "--rm", *self.run_args(role(role_name), name, {}), timeout=180)

    def logs(self, name: str) -> str:
        res = self("logs", name, check=False)
        return (res.stdout + res.stderr)[-3000:]

    def exec(self, name: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return self("exec", name, *cmd, check=False, timeout=60)

    def stop(self, name: str, grace_s: float) -> int:
        """Stop a container as the kubelet's runtime does (containerd, CRI-O): SIGTERM to its
        process, SIGKILL after the grace period; returns the exit code. (`podman stop` signals
        every process of a hostPID container with `runc kill --all`, which, after a `podman exec`
        under podman 4.3 + runc 1.1, does not reach the process: not what a kubelet does.)"""
        self("kill", "--signal", "TERM", name)
        res = self("wait", name, check=False, timeout=grace_s)
        if res.returncode != 0:
            self("kill", "--signal", "KILL", name, check=False)
            raise AssertionError(f"{name} ignored SIGTERM for {grace_s}s:\n{self.logs(name)}")
        return int(res.stdout.strip().splitlines()[-1])

    def processes(self) -> set[int]:
        return e2e.cgroup_pids(self.cgroup_parent)

    def teardown(self) -> list[str]:
        left: list[str] = []
        if self.names:
            self("rm", "--all", "--force", "--time", "0", check=False, timeout=180)
            self.names.clear()
        for point in e2e.mounts_under(self.base):
            left.append(f"mount {point}")
            netbed.sh("umount", "-l", point, check=False)
        left += e2e.remove_cgroup_tree(self.cgroup_parent)
        subprocess.run(["rm", "-rf", str(self.base)], check=False)
        return left


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    archive = e2e.ensure_image()
    netbed.tool("podman")
    netbed.tool("runc")
    Path("/run/netns").mkdir(exist_ok=True)  # hostPath DirectoryOrCreate
    host_before = e2e.podman_host_state()
    base = Path(tempfile.mkdtemp(prefix=f"ou-image-{netbed.TOKEN}-"))
    n = Node(base, e2e.podman_env(base), "/" + netbed.uniq("imgcg", limit=40), host_before)
    try:
        t0 = time.monotonic()
        res = e2e.podman_load(n.env, archive)
        assert res.returncode == 0 and f"Loaded image: {e2e.IMAGE}" in res.stdout, res.stdout + res.stderr
        print(f"\nimage: {archive.stat().st_size / 1e6:.1f} MB archive, podman load {time.monotonic() - t0:.1f} s")
        yield n
    finally:
        left = n.teardown()
        assert left == [], f"left behind: {left}"
        assert e2e.podman_host_state() == host_before  # the machine's podman config and storage untouched


def wait_for(what: str, check: Any, timeout: float = 30.0, diag: Any = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f}s\n{diag()}")
        time.sleep(0.1)


def host_health(socket: Path) -> subprocess.CompletedProcess[str]:
    return e2e.run_frozen("ovs-underlay-ipamd", "health", "--socket", str(socket))


def assert_gone(pids: set[int], what: str) -> None:
    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    alive = {p: cmdline(p) for p in pids if Path(f"/proc/{p}").exists()}
    assert not alive, f"{what}: processes still running: {alive}"


# ---------------------------------------------------------------------------------------------


def test_image_is_named_as_the_manifests_say_and_stays_small(node: Node) -> None:
    names = node("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert names == [e2e.IMAGE], names
    (info,) = json.loads(node("image", "inspect", e2e.IMAGE).stdout)
    assert info["Config"]["Entrypoint"] == [e2e.build_image.ENTRYPOINT]
    assert f"OVS_UNDERLAY_VERSION={e2e.IMAGE_VERSION}" in info["Config"]["Env"]
    assert info["Config"]["Labels"]["org.opencontainers.image.version"] == e2e.IMAGE_VERSION
    spec = daemonset()["spec"]["template"]["spec"]
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} == {e2e.IMAGE}
    # The bundle is ~52 MB unpacked, ~30 MB compressed; libc and busybox add ~4 MB. A jump means
    # something (a second libcrypto, a Python stdlib) came in by accident.
    assert e2e.IMAGE_ARCHIVE.stat().st_size < 45e6
    assert info["Size"] < 75e6


def test_every_role_of_the_daemonset_runs_in_the_image(node: Node) -> None:
    base = ["run", "--rm", "--network", "none", "--cgroup-parent", node.cgroup_parent, e2e.IMAGE]
    out = node(*base, "--version").stdout
    assert f"ovs-underlay image {e2e.IMAGE_VERSION}" in out
    assert f"ovs-underlay {e2e.IMAGE_VERSION} (CNI" in out and f"ovs-underlay-ipam {e2e.IMAGE_VERSION} (CNI" in out
    spec = daemonset()["spec"]["template"]["spec"]
    for c in spec["initContainers"] + spec["containers"]:
        res = node(*base, c["args"][0], "--help", check=False)
        assert res.returncode == 0 and "usage" in res.stdout.lower(), f"{c['name']}: {res.stdout}{res.stderr}"
    bad = node(*base, "no-such-program", check=False)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_install_cni_installs_the_bundle_into_the_node(node: Node) -> None:
    first = node.run_once("install-cni")
    env = {e["name"]: e["value"] for e in role("install-cni")["env"]}
    prefix, cni_bin = node.root / env["PREFIX"].lstrip("/"), node.root / env["CNI_BIN_DIR"].lstrip("/")
    assert prefix.is_symlink()
    release = os.readlink(prefix)
    assert release.startswith(f"ovs-underlay.releases/{e2e.IMAGE_VERSION}-"), release
    assert "(new)" in first.stderr, first.stderr
    # Every file of the bundle arrived unchanged.
    for f in e2e.DIST.rglob("*"):
        if f.is_file():
            assert (prefix / f.relative_to(e2e.DIST)).read_bytes() == f.read_bytes(), f
    # The runtime execs CNI_BIN_DIR/<plugin>: absolute links to PREFIX as the node sees it.
    for plugin in ("ovs-underlay", "ovs-underlay-ipam"):
        assert os.readlink(cni_bin / plugin) == f"{env['PREFIX']}/{plugin}"
        res = subprocess.run([str(prefix / plugin)], env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                             input='{"cniVersion": "1.0.0"}', capture_output=True, text=True, timeout=30, cwd="/")
        assert res.returncode == 0 and "1.1.0" in json.loads(res.stdout)["supportedVersions"], res.stderr
    # A restarted pod installs again: same content, same release, nothing copied over it.
    again = node.run_once("install-cni")
    assert "(unchanged)" in again.stderr, again.stderr
    assert os.readlink(prefix) == release
    assert sorted(p.name for p in (prefix.parent / "ovs-underlay.releases").iterdir()) == [release.split("/")[1]]


def test_ipamd_container_serves_its_probes_on_a_node_socket(node: Node) -> None:
    conf = json.loads(configmap_data()["ipamd.json"])
    name = node.start("ipamd", metricsPort=0)
    socket = node.path("/run/ovs-underlay") / Path(conf["socket"]).name
    wait_for("ipamd in the image serving", lambda: host_health(socket).returncode == 0, diag=lambda: node.logs(name))
    c = role("ipamd")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        res = node.exec(name, *c[probe]["exec"]["command"])
        assert res.returncode == 0 and "SERVING" in res.stdout, f"{probe}: {res.stdout}{res.stderr}"
    # What the README tells an operator to run (`kubectl exec ... -c ipamd -- ...`): PATH finds it.
    res = node.exec(name, "ovs-underlay-ipamd", "leases")
    assert res.returncode == 0, res.stderr
    assert (node.path("/var/lib/ovs-underlay") / conf["dbFile"]).is_file()  # the state on the node
    pids = node.processes()
    assert pids, "no process in the container's cgroup"
    grace = daemonset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert node.stop(name, grace) == 0, node.logs(name)  # SIGTERM: graceful
    assert "ipamd stopped" in node.logs(name)
    assert_gone(pids, "ipamd stopped")
    node("rm", name)
    node.names.remove(name)


def test_a_pod_is_attached_through_the_warm_container(node: Node, underlay: netbed.Underlay) -> None:
    node.run_once("install-cni")
    ipamd = node.start("ipamd", metricsPort=0)
    warm = node.start("warm")
    run = node.path("/run/ovs-underlay")
    wait_for("ipamd serving", lambda: host_health(run / "ipamd.sock").returncode == 0, diag=lambda: node.logs(ipamd))
    wait_for("warm server listening", lambda: (run / "cni-warm.sock").exists(), diag=lambda: node.logs(warm))
    # The pod's netns appears after both containers started: they see it through the
    # HostToContainer mounts of /run/netns, as pods created after the DaemonSet are.
    pod = netbed.make_netns("imgpod")
    cid = netbed.container_id("img")
    network = netbed.uniq("imgnet", limit=40)
    # datapathType: the bed's bridges are userspace (netdev); stated, as the default may differ.
    conf = {"cniVersion": "1.0.0", "name": network, "type": "ovs-underlay", "bridge": underlay.bridge, "vlan": 100,
            "datapathType": "netdev",
            "ipam": {"type": "ovs-underlay-ipam", "gatewayCheckTimeoutMs": 5000,
                     "subnets": [{"subnet": "192.168.100.0/24", "gateway": GATEWAY}]}}
    # The runtime on the node: a process whose view of the node paths is the node's (this run's
    # node root bound at /opt, /run/ovs-underlay, /var/log/ovs-underlay in a private mount
    # namespace). The warm worker enters that mount namespace, as it enters the node's.
    views = ("/opt", "/run/ovs-underlay", "/var/log/ovs-underlay")
    made = [v for v in views if not os.path.isdir(v)]  # mount points: the product's own dirs
    for v in made:
        os.makedirs(v)
    binds = " && ".join(f'mount --bind "{node.path(v)}" "{v}"' for v in views)

    def call(command: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
               "CNI_NETNS": f"/run/netns/{pod.name}", "CNI_IFNAME": "net1", "CNI_PATH": "/opt/cni/bin",
               "CNI_ARGS": "IgnoreUnknown=true;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=u1",
               "OVS_UNDERLAY_WARM_HANDOFF_MS": "5000", "OVS_UNDERLAY_WARM_QUIET": "0"}
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f"{binds} && exec /opt/cni/bin/ovs-underlay"],  # what the runtime execs
                              env=env, input=json.dumps(conf), capture_output=True, text=True, timeout=60, cwd="/")

    try:
        add = call("ADD")
        assert add.returncode == 0, f"{add.stdout}\n{add.stderr}\nwarm:\n{node.logs(warm)}\nipamd:\n{node.logs(ipamd)}"
        assert "running in-process" not in add.stderr, f"{add.stderr}\nwarm:\n{node.logs(warm)}"
        result = json.loads(add.stdout)
        (ip,) = [i["address"] for i in result["ips"]]
        assert ip.startswith("192.168.100.") and ip.endswith("/24"), result
        assert netbed.addrs("net1", ns=pod.name) == [ip]
        (port,) = netbed.ovs_rows("Port", "name", "tag", where=[f"external_ids:container_id={cid}"])
        assert port["tag"] == 100 and port["name"] in netbed.bridge_ports(underlay.bridge)
        # Served by the containers, not by an in-process fallback on the node: the lease is in
        # the image's ipamd (the config names the node path /run/ovs-underlay/ipamd.sock), and
        # the plugin log is in the node's /var/log/ovs-underlay, written by a warm worker.
        leases = json.loads(e2e.run_frozen("ovs-underlay-ipamd", "leases", "-o", "json", "--network", network,
                                           "--socket", str(run / "ipamd.sock")).stdout)
        assert [(le["containerID"], le["ifname"], le["ip"]) for le in leases] == [(cid, "net1", ip.split("/")[0])]
        log = node.path("/var/log/ovs-underlay") / "ovs-underlay.log"
        assert cid in log.read_text(), "no plugin log line in the node's log dir"
        delete = call("DEL")
        assert delete.returncode == 0, f"{delete.stdout}\n{delete.stderr}"
        assert "running in-process" not in delete.stderr, delete.stderr
        assert not netbed.ovs_rows("Port", "name", where=[f"external_ids:container_id={cid}"])
        assert json.loads(e2e.run_frozen("ovs-underlay-ipamd", "leases", "-o", "json", "--network", network,
                                         "--socket", str(run / "ipamd.sock")).stdout) == []
    finally:
        for row in netbed.ovs_rows("Port", "name", where=[f"external_ids:container_id={cid}"]):
            netbed.vsctl("--if-exists", "del-port", row["name"], check=False)
            netbed.delete_link(row["name"])
        pod.delete()
        for v in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(v)
    # Deleting the DaemonSet: SIGTERM to each container, then nothing of ours may run.
    pids = node.processes()
    assert len(pids) >= 2
    grace = daemonset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    for name in (ipamd, warm):
        assert node.stop(name, grace) == 0, f"{name}:\n{node.logs(name)}"
    node("rm", ipamd, warm)
    node.names[:] = [n for n in node.names if n not in (ipamd, warm)]
    assert_gone(pids, "DaemonSet deleted")
    assert not (run / "cni-warm.sock").exists() and not (run / "ipamd.sock").exists()

