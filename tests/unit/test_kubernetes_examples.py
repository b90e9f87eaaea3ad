"""conf-examples/kubernetes/: what `kubectl apply -f conf-examples/kubernetes/` creates, offline.

No kubelet runs here, so this checks everything short of one:
  - every object validates (strict: unknown fields fail) against the Kubernetes 1.29 and 1.33
    OpenAPI schemas shipped in the kubernetes-validate wheel;
  - the cross-references a schema cannot see: volume names, the paths install-cni writes
    against the paths the node and the daemons use, the warm container's node paths at their
    node path, the image name `make image` builds, container commands and probes that exist in
    the image, ipamd's config against its ConfigMap and its socket against the plugin default;
  - every NetworkAttachmentDefinition (a CRD: no schema in the wheel) by hand, and its CNI config
    through the plugin's own parser (`cni.netconf.parse_netconf`) and IPAM parser.
tests/integration/test_e2e_image.py then runs the same containers from the real image.
"""

from __future__ import annotations

import json
import posixpath
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni import warm
from cni.netconf import parse_netconf
from cni.types import CmdArgs
from cni.usage import PRODUCT_VERSION
from core.spec import DEFAULT_DAEMON_SOCKET, IpamConf, parse_ipam

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "conf-examples" / "kubernetes"
NADS = sorted((KUBE / "nad").glob("*.yaml"))
sys.path.insert(0, str(ROOT / "scripts"))
import build_image  # noqa: E402

VERSION = build_image.project_version()


def docs_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def applied() -> list[dict[str, Any]]:
    """What `kubectl apply -f conf-examples/kubernetes/` sends (not recursive: nad/ is apart)."""
    return [d for f in sorted(KUBE.glob("*.yaml")) for d in docs_of(f)]


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    (obj,) = [d for d in applied() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return obj


def pod_spec() -> dict[str, Any]:
    return dict(the("DaemonSet")["spec"]["template"]["spec"])


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    (c,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return dict(c)


def volumes() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec()["volumes"]}


def host_path_of(c: dict[str, Any], path: str) -> str | None:
    """The node path behind `path` in container `c` (through its hostPath mounts), or None."""
    vols = volumes()
    best = None
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"]
        if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best["mountPath"])):
            best = m
    if best is None or "hostPath" not in vols[best["name"]]:
        return None
    return posixpath.normpath(vols[best["name"]]["hostPath"]["path"] + path[len(best["mountPath"]):])


def bundle_programs() -> set[str]:
    """The programs `make binary` puts in the bundle: the spec's PROGRAMS plus the native client
    (built by scripts/build-bundle.sh once per plugin name)."""
    spec = (ROOT / "packaging" / "ovs-underlay.spec").read_text()
    build = (ROOT / "scripts" / "build-bundle.sh").read_text()
    (names,) = re.findall(r"^for name in ([a-z -]+); do$", build, re.M)
    return {*names.split(), *re.findall(r'\("(ovs-underlay-[a-z-]+)", "\w+\.py"\)', spec)}


def ipamd_config() -> dict[str, Any]:
    return dict(json.loads(the("ConfigMap", "ovs-underlay-ipamd")["data"]["ipamd.json"]))


# ---------------------------------------------------------------------------------------------
# Schemas and the objects kubectl applies


def test_apply_creates_namespace_config_and_daemonset_only() -> None:
    kinds = sorted(d["kind"] for d in applied())
    assert kinds == ["ConfigMap", "ConfigMap", "DaemonSet", "Namespace"], kinds
    ns = the("Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == ns for d in applied() if d["kind"] != "Namespace")
    # Privileged hostPath pods: Pod Security Admission must allow them in this namespace.
    assert the("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    # No RBAC: nothing calls the API server, so the pods get no token either.
    assert pod_spec()["automountServiceAccountToken"] is False


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_manifests_validate_against_the_kubernetes_schema(version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:  # pragma: no cover - the dev extras must provide it
        pytest.fail("kubernetes-validate is missing: it belongs to the [dev] extras (pip install -e '.[dev]')")
    for doc in applied():
        kubernetes_validate.validate(doc, version, strict=True)


def test_there_is_one_daemonset_example() -> None:
    # conf-examples/daemonset.yaml was replaced by this directory: no second, diverging copy.
    found = [p.relative_to(ROOT) for p in (ROOT / "conf-examples").rglob("*.yaml")
             if any(d.get("kind") == "DaemonSet" for d in docs_of(p))]
    assert found == [Path("conf-examples/kubernetes/20-daemonset.yaml")], found


# ---------------------------------------------------------------------------------------------
# The image and the commands


def test_image_is_the_one_make_image_builds() -> None:
    assert VERSION == PRODUCT_VERSION, "pyproject.toml and cni/usage.py disagree on the version"
    spec = pod_spec()
    for c in spec["initContainers"] + spec["containers"]:
        assert c["image"] == build_image.image_name(VERSION) == f"localhost/ovs-underlay:{VERSION}", c["name"]
        assert c["imagePullPolicy"] == "IfNotPresent", c["name"]


def test_containers_run_commands_of_the_image() -> None:
    entrypoint = (ROOT / "packaging" / "image" / "entrypoint.sh").read_text()
    programs = bundle_programs()
    assert {"ovs-underlay", "ovs-underlay-py", "ovs-underlay-ipam", "ovs-underlay-ipam-py", "ovs-underlay-ipamd"} <= programs
    spec = pod_spec()
    for c in spec["initContainers"] + spec["containers"]:
        # args only: the image's entry point dispatches, and exec's the program (it gets SIGTERM).
        assert "command" not in c, f"{c['name']}: use args, keep the image's entry point"
        verb = c["args"][0]
        if verb in ("install-cni", "warm"):
            assert re.search(rf"^\s*{verb}\)", entrypoint, re.M), f"entrypoint.sh has no {verb} command"
        else:
            assert verb in programs or f"ovs-underlay-{verb}" in programs, f"{c['name']}: {verb} is not in the bundle"
    assert [c["args"][0] for c in spec["initContainers"]] == ["install-cni"]
    assert container("warm")["args"][:1] == ["warm"]
    assert container("ipamd")["args"][:2] == ["ipamd", "serve"]


def test_probes_call_ipamd_health_on_its_socket() -> None:
    c = container("ipamd")
    socket = ipamd_config()["socket"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        # Probes bypass the entry point: an absolute path into the image's bundle.
        assert cmd[0] == f"/{build_image.BUNDLE_DIR}/ovs-underlay-ipamd", cmd
        assert cmd[1] == "health" and cmd[cmd.index("--socket") + 1] == socket, cmd
        assert c[probe]["timeoutSeconds"] >= 2
    assert "exec" in c["livenessProbe"] and c["livenessProbe"]["failureThreshold"] >= 3


# ---------------------------------------------------------------------------------------------
# Volumes and paths


def test_volume_mounts_name_existing_volumes_and_every_volume_is_used() -> None:
    spec = pod_spec()
    names = [v["name"] for v in spec["volumes"]]
    assert len(names) == len(set(names)), "a volume defined twice (the API server refuses the pod)"
    used = set()
    for c in spec["initContainers"] + spec["containers"]:
        paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        assert len(paths) == len(set(paths)), f"{c['name']}: a mount path twice"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes(), f"{c['name']}: volume {m['name']} is not defined"
            used.add(m["name"])
    assert used == set(volumes()), f"unused volumes: {set(volumes()) - used}"


def test_install_cni_writes_where_the_node_and_the_daemons_look() -> None:
    init = container("install-cni")
    env = {e["name"]: e["value"] for e in init["env"]}
    root, prefix, cni_bin = env["HOST_ROOT"], env["PREFIX"], env["CNI_BIN_DIR"]
    # The release directory sits next to PREFIX and PREFIX is switched by rename: both, and the
    # CNI bin dir, must be on the node path of the same name, through the init container's mounts.
    for node_path in (prefix, posixpath.dirname(prefix), cni_bin):
        assert host_path_of(init, root + node_path) == node_path, node_path
    # The runtime execs CNI_BIN_DIR/ovs-underlay -> PREFIX; the warm server runs that very
    # release, at the same path (its workers check that their code is the node's files).
    assert host_path_of(container("warm"), prefix) == prefix == f"/{build_image.BUNDLE_DIR}"
    # The other daemons run the image's own bundle: nothing may hide it.
    bundle = f"/{build_image.BUNDLE_DIR}"
    for c in pod_spec()["containers"]:
        if c["name"] == "warm":
            continue
        for m in c.get("volumeMounts", []):
            mp = m["mountPath"]
            assert not (bundle == mp or bundle.startswith(mp + "/")), f"{c['name']}: {mp} hides {bundle}"


def test_warm_container_runs_the_nodes_bundle_and_its_workers_enter_the_nodes_mounts() -> None:
    """The workers enter the mount namespace of the plugin exec that called (the node's), so the
    container needs privileged (setns), the node's PIDs and network, the node's bundle at its
    node path (the workers' code must be the same files there) and the socket's directory;
    no other node path: a delegated IPAM, the CNI dirs, the log dir are the node's own."""
    spec = pod_spec()
    assert spec["hostNetwork"] is True and spec["hostPID"] is True  # /proc/<pid>/ns/net netns paths
    w = container("warm")
    assert w["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in w["volumeMounts"]}
    assert set(mounts) == {"/opt", "/run/ovs-underlay"}
    for path in mounts:
        assert host_path_of(w, path) == path, f"warm: {path} is not the node's {path}"
    assert mounts["/opt"].get("readOnly") is True
    assert w["args"][w["args"].index("--socket") + 1] == warm.DEFAULT_SOCKET
    entrypoint = (ROOT / "packaging" / "image" / "entrypoint.sh").read_text()
    assert re.search(r'^\s*exec "\$BUNDLE/ovs-underlay" --warm-server "\$@"', entrypoint, re.M)
    assert "BUNDLE=/opt/ovs-underlay\n" in entrypoint  # i.e. the node's, under the /opt mount


def test_ipamd_runs_the_configmap_config_on_node_paths() -> None:
    conf = ipamd_config()
    shipped = json.loads((ROOT / "conf-examples" / "ipamd.json").read_text())
    assert conf == shipped, "the ConfigMap and conf-examples/ipamd.json must stay equal"
    c = container("ipamd")
    config_file = c["args"][c["args"].index("--config") + 1]
    (cm_mount,) = [m for m in c["volumeMounts"] if "configMap" in volumes()[m["name"]]]
    assert config_file == posixpath.join(cm_mount["mountPath"], "ipamd.json")
    assert volumes()[cm_mount["name"]]["configMap"]["name"] == "ovs-underlay-ipamd"
    # The socket the plugins use by default, on the node path the warm server and the node see.
    assert conf["socket"] == DEFAULT_DAEMON_SOCKET
    sock_dir = posixpath.dirname(conf["socket"])
    assert host_path_of(c, sock_dir) == sock_dir == host_path_of(container("warm"), sock_dir)
    assert posixpath.dirname(warm.DEFAULT_SOCKET) == sock_dir
    assert host_path_of(c, conf["stateDir"]) == conf["stateDir"]  # leases survive the pod
    assert host_path_of(c, "/run/netns") == "/run/netns"  # probes open the pod's netns
    # the reconciler and the probe ports: the node's OVSDB socket, and the pods' netns as they
    # appear after ipamd started
    ovsdb_dir = posixpath.dirname(conf["ovsdbSocket"].removeprefix("unix:"))
    assert host_path_of(c, ovsdb_dir) == ovsdb_dir == "/run/openvswitch"
    assert [m.get("mountPropagation") for m in c["volumeMounts"] if m["mountPath"] == "/run/netns"] == [
        "HostToContainer"]
    # SIGTERM: ipamd finishes in-flight RPCs within its grace, well before the kubelet's SIGKILL.
    assert conf["shutdownGraceSeconds"] < pod_spec()["terminationGracePeriodSeconds"]


# ---------------------------------------------------------------------------------------------
# NetworkAttachmentDefinitions


def nad_config(path: Path) -> dict[str, Any]:
    (nad,) = docs_of(path)
    assert nad["apiVersion"] == "k8s.cni.cncf.io/v1" and nad["kind"] == "NetworkAttachmentDefinition"
    assert set(nad) == {"apiVersion", "kind", "metadata", "spec"} and set(nad["spec"]) == {"config"}
    conf = json.loads(nad["spec"]["config"])
    assert conf["name"] == nad["metadata"]["name"], "CNI network name = NAD name (ipamd's pool identity)"
    return dict(conf)


def parse(conf: dict[str, Any], runtime_config: dict[str, Any] | None = None) -> Any:
    """The plugin's parser over what Multus hands a delegate (CNI_IFNAME net1, its CNI_ARGS)."""
    full = {**conf, **({"runtimeConfig": runtime_config} if runtime_config else {})}
    args = CmdArgs(command="ADD", container_id="0123abcd", netns="/var/run/netns/cni-1", ifname="net1",
                   args="IgnoreUnknown=true;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=u1",
                   path=("/opt/cni/bin",), stdin_data=json.dumps(full).encode(), config=full,
                   cni_version=conf["cniVersion"])
    return parse_netconf(args)


def ipam_of(conf: dict[str, Any]) -> IpamConf | None:
    if "ipam" in conf:
        assert conf["ipam"]["type"] == "ovs-underlay-ipam"
        return parse_ipam(conf["ipam"])
    return parse_ipam(None, top_level=conf) if "subnets" in conf else None


def test_the_nad_examples_exist() -> None:
    assert [p.name for p in NADS] == ["trunk-100-300.yaml", "vlan110-access.yaml", "vlan120-dual-stack.yaml",
                                      "vlan130-static.yaml"]


@pytest.mark.parametrize("path", NADS, ids=[p.stem for p in NADS])
def test_nad_config_parses_and_its_ipam_is_valid(path: Path) -> None:
    conf = nad_config(path)
    assert conf["type"] == "ovs-underlay" and conf["cniVersion"] in ("1.0.0", "1.1.0")
    assert "datapathType" not in conf, "an assertion users add on purpose, not part of an example"
    nc = parse(conf)
    assert nc.bridge == conf["bridge"]
    ipam = ipam_of(conf)
    if ipam is not None:
        # The default socket: the one ipamd of the DaemonSet serves.
        assert ipam.daemon_socket == ipamd_config()["socket"]
        # A secondary network must not take the pod's default route from the cluster network.
        assert all(r.dst.prefixlen > 0 for r in ipam.pool.routes), "default route in a NAD example"


def test_nad_access_vlan() -> None:
    conf = nad_config(KUBE / "nad" / "vlan110-access.yaml")
    nc = parse(conf)
    assert nc.vlan == 110 and nc.trunk == ()
    ipam = ipam_of(conf)
    assert ipam is not None and ipam.gateway_check
    (subnet,) = ipam.pool.subnets
    assert str(subnet.gateway) == "192.168.110.1"
    assert not subnet.allocatable(subnet.subnet[20]) and subnet.allocatable(subnet.subnet[21])


def test_nad_trunk() -> None:
    conf = nad_config(KUBE / "nad" / "trunk-100-300.yaml")
    nc = parse(conf)
    assert nc.vlan is None and nc.trunk == ((100, 199), (300, 300)) and ipam_of(conf) is None


def test_nad_dual_stack() -> None:
    conf = nad_config(KUBE / "nad" / "vlan120-dual-stack.yaml")
    ipam = ipam_of(conf)
    assert ipam is not None and sorted(s.version for s in ipam.pool.subnets) == [4, 6]
    assert parse(conf).vlan == 120


def test_nad_static_ip_and_mac_reach_the_plugin_through_capabilities() -> None:
    conf = nad_config(KUBE / "nad" / "vlan130-static.yaml")
    assert conf["capabilities"] == {"ips": True, "mac": True}
    # What libcni puts into runtimeConfig from the selection in the file's comment.
    nc = parse(conf, {"ips": ["192.168.130.50/24"], "mac": "0a:58:c0:a8:82:32"})
    assert [str(ip) for ip in nc.requested_ips] == ["192.168.130.50"] and nc.mac == "0a:58:c0:a8:82:32"
    nc = parse(conf)  # no selection: ipamd picks
    assert nc.requested_ips == () and nc.mac is None
    ipam = ipam_of(conf)
    assert ipam is not None
    (subnet,) = ipam.pool.subnets
    assert subnet.allocatable(subnet.subnet[50])


def test_node_agent_container() -> None:
    """The provider-network agent: its file from its ConfigMap (empty: nothing is bridged until
    an admin lists networks), its journal on a node path that survives restarts and reboots,
    OVSDB, the node's name, the host's /run read-only, readiness from `status --check` and no
    liveness probe (a restart mid-apply is what must not be provoked)."""
    from agent.config import parse_text

    c = container("node")
    args = c["args"]
    assert args[:2] == ["node", "serve"]
    config_file = args[args.index("--config") + 1]
    (cm_mount,) = [m for m in c["volumeMounts"] if "configMap" in volumes()[m["name"]]]
    assert posixpath.dirname(config_file) == cm_mount["mountPath"]
    cm = the("ConfigMap", volumes()[cm_mount["name"]]["configMap"]["name"])
    assert parse_text(cm["data"][posixpath.basename(config_file)]).networks == ()
    state = args[args.index("--state-dir") + 1]
    assert host_path_of(c, state) == state and volumes()["var-lib-ovs-underlay"]["hostPath"]["path"] == "/var/lib/ovs-underlay"
    assert host_path_of(c, "/run/openvswitch") == "/run/openvswitch"
    host_run = args[args.index("--host-run") + 1]
    assert host_path_of(c, host_run) == "/run"
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["mountPath"] in (host_run, cm_mount["mountPath"]))
    (env,) = [e for e in c["env"] if e["name"] == "NODE_NAME"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe[0] == "/opt/ovs-underlay/ovs-underlay-node" and probe[-2:] == ["status", "--check"]
    assert "livenessProbe" not in c and pod_spec()["hostNetwork"] is True

