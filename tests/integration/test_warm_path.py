"""The warm path end to end: ADD/CHECK/DEL through `python -m cni --warm-server` on real OVS,
netns and ipamd, checked with the same independent oracles as the in-process path; fallback when
the server is down or killed mid-way; socket permissions.

Set OU_TEST_WARM_ALL=1 to also re-run the plugin's own lifecycle and datapath suites through a
warm server (their tests are imported here under a module-wide warm fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import plugin_helpers as ph
import pytest

from testbed import netbed


def warm_server(path: str, log: Path) -> netbed.WarmServer:
    return netbed.WarmServer([ph.PYTHON, "-m", "cni"], path, log, cwd=str(ph.ROOT))


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[netbed.WarmServer]:
    s = warm_server(str(tmp_path / "run" / "cni-warm.sock"), tmp_path / "warm.log")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def attacher() -> Iterator[ph.Attacher]:
    a = ph.Attacher()
    yield a
    a.cleanup()


def _net(underlay: netbed.Underlay, ipamd: netbed.Ipamd, **ipam: Any) -> dict[str, Any]:
    return ph.network(underlay.bridge, vlan=100, ipam={
        "type": "ovs-underlay-ipam", "daemonSocket": ipamd.socket,
        "subnets": [{"subnet": "192.168.100.0/24", "gateway": "192.168.100.1", "rangeStart": "192.168.100.10"}],
        "routes": [{"dst": "0.0.0.0/0"}], "gatewayCheck": True, "conflictCheck": True, **ipam})


def _env(sock: str, on: bool = True) -> dict[str, str]:
    return {"OVS_UNDERLAY_WARM_SOCKET": sock, "OVS_UNDERLAY_WARM": "1" if on else "0"}


def _worker_pids(log_file: str, container_id: str) -> set[str]:
    pids = set()
    for line in Path(log_file).read_text(errors="replace").splitlines():
        if f"container_id={container_id}" in line and " pid=" in line:
            pids.add(line.split(" pid=", 1)[1].split()[0])
    return pids


def _oracle(a: ph.Attachment, bridge: str) -> dict[str, Any]:
    port, iface = netbed.port(a.host), netbed.interface(a.host)
    assert port is not None and iface is not None
    ns = a.netns.rsplit("/", 1)[1]
    return {"tag": port["tag"], "bridge_has": a.host in netbed.bridge_ports(bridge),
            "addrs": netbed.addrs("eth0", ns=ns), "ids": {k: iface["external_ids"].get(k) for k in
                                                           ("owner", "container_id", "ifname", "netns")}}


def test_add_check_del_through_the_warm_server_match_in_process(
        warm: netbed.WarmServer, underlay: netbed.Underlay, ipamd: netbed.Ipamd,
        netns_factory: Callable[[str], netbed.Netns], attacher: ph.Attacher) -> None:
    conf = _net(underlay, ipamd)
    seen = {}
    for on in (True, False):
        ns = netns_factory("pod")
        a = attacher.new(conf, ns.path)
        out = a.add(extra_env=_env(warm.path, on))
        assert [i["name"] for i in out["interfaces"]] == [a.host, "eth0"]
        assert out["interfaces"][1]["sandbox"] == ns.path
        o = _oracle(a, underlay.bridge)
        assert o["ids"] == {"owner": "ovs-underlay", "container_id": a.container_id, "ifname": "eth0",
                            "netns": ns.path}  # the real path, not /proc/<pid>/fd/N
        assert o["tag"] == 100 and o["bridge_has"] and o["addrs"] == [out["ips"][0]["address"]]
        assert netbed.ping_retry(ns.name, "192.168.100.1")
        check = dict(conf, prevResult=out)
        rc, cout, err = a.run("CHECK", conf=check, extra_env=_env(warm.path, on))
        assert rc == 0 and cout is None, (cout, err)
        seen[on] = {k: v for k, v in o.items() if k != "ids"} | {"keys": sorted(out), "n_ips": len(out["ips"])}
        seen[on]["addrs"] = len(o["addrs"])
        assert [le["ip"] for le in ipamd.leases() if le.get("containerID") == a.container_id] == \
            [out["ips"][0]["address"].split("/")[0]]
        rc, dout, err = a.run("DEL", extra_env=_env(warm.path, on))
        assert rc == 0, (dout, err)
        a.deleted = True
        assert ph.no_trace(a, underlay.bridge) == []
        assert not [lease for lease in ipamd.leases() if lease.get("containerID") == a.container_id]
        pids = _worker_pids(ph.LOG_FILE, a.container_id)
        assert pids, "no log lines for the attachment"
        if on:
            assert warm.proc is not None and str(warm.proc.pid) not in pids
    assert seen[True] == seen[False]


def test_error_result_is_identical(warm: netbed.WarmServer, underlay: netbed.Underlay, ipamd: netbed.Ipamd,
                                   pod_netns: netbed.Netns) -> None:
    conf = _net(underlay, ipamd)
    conf["bridge"] = "nosuchbridge0"
    res = [ph.run_plugin("ADD", conf, container_id=netbed.container_id(), netns=pod_netns.path,
                         extra_env=_env(warm.path, on)) for on in (True, False)]
    assert res[0][0] == res[1][0] == 1
    assert res[0][1]["code"] == res[1][1]["code"] == 7 and res[0][1]["msg"] == res[1][1]["msg"]


def test_socket_permissions(warm: netbed.WarmServer) -> None:
    assert stat.S_IMODE(os.stat(warm.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(warm.path)).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(warm.path).st_mode)


def test_server_down_falls_back_in_process(warm: netbed.WarmServer, underlay: netbed.Underlay, ipamd: netbed.Ipamd,
                                           pod_netns: netbed.Netns, attacher: ph.Attacher) -> None:
    warm.stop(signal.SIGKILL)  # leaves a stale socket file behind: connect is refused
    assert os.path.exists(warm.path)
    a = attacher.new(_net(underlay, ipamd), pod_netns.path)
    rc, out, err = a.run("ADD", extra_env=_env(warm.path))
    assert rc == 0, (out, err)
    a.result = out
    assert "running in-process" in err
    assert netbed.port(a.host) is not None
    rc, out, err = a.delete()
    assert rc == 0 and ph.no_trace(a, underlay.bridge) == []


def test_worker_killed_mid_add_is_cleaned_up_and_rerun(
        warm: netbed.WarmServer, underlay: netbed.Underlay, ipamd: netbed.Ipamd, pod_netns: netbed.Netns,
        attacher: ph.Attacher) -> None:
    """The gateway router is away for a while, so the worker sits in the gateway check; it is
    killed there (half-built: veth, port, lease exist). The client cleans up with DEL and
    re-runs ADD in-process, which succeeds once the router is back."""
    router = underlay.routers[100]
    netbed.sh("ip", "link", "set", router.ifname, "down", ns=router.netns.name)
    a = attacher.new(_net(underlay, ipamd, gatewayCheckTimeoutMs=8000), pod_netns.path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update({"CNI_COMMAND": "ADD", "CNI_PATH": ph.CNI_PATH, "OVS_UNDERLAY_LOG_FILE": ph.LOG_FILE,
                "CNI_CONTAINERID": a.container_id, "CNI_NETNS": a.netns, "CNI_IFNAME": "eth0", **_env(warm.path)})
    proc = subprocess.Popen([ph.PYTHON, "-m", "cni"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ph.ROOT)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(a.conf).encode())
    proc.stdin.close()
    proc.stdin = None  # so that communicate() does not flush it
    assert ph.wait_for(lambda: netbed.port(a.host) is not None and warm.children(), timeout=20)
    time.sleep(0.3)
    workers = warm.children()
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    netbed.sh("ip", "link", "set", router.ifname, "up", ns=router.netns.name)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    doc = json.loads(out)  # exactly one document
    assert doc["ips"][0]["address"].startswith("192.168.100.")
    assert b"re-running ADD in-process" in err
    a.result = doc
    leases = [le for le in ipamd.leases() if le.get("containerID") == a.container_id]
    assert len(leases) == 1
    assert netbed.port(a.host) is not None
    rc, _, _err2 = a.delete()
    assert rc == 0 and ph.no_trace(a, underlay.bridge) == []


def test_disabled_by_env(warm: netbed.WarmServer, ovs_bridge: str, pod_netns: netbed.Netns, attacher: ph.Attacher) -> None:
    a = attacher.new(ph.network(ovs_bridge), pod_netns.path)
    a.add(extra_env=_env(warm.path, on=False))
    assert warm.proc is not None and str(warm.proc.pid) not in _worker_pids(ph.LOG_FILE, a.container_id)
    assert _worker_pids(ph.LOG_FILE, a.container_id)


# ---------------------------------------------------------------------------------------------
# issue 11: the review's defects, through the native client (compiled here) and a real server


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The native client next to an `ovs-underlay-py` that runs this checkout's Python plugin
    (exec keeps the pid, as the frozen ovs-underlay-py does)."""
    d = tmp_path_factory.mktemp("shim")
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", "-o", str(d / "ovs-underlay"),
                    str(ph.ROOT / "packaging" / "shim" / "ovs-underlay-shim.c")], check=True, timeout=120)
    py = d / "ovs-underlay-py"
    py.write_text(f'#!/bin/sh\nPYTHONPATH={ph.ROOT} exec {ph.PYTHON} -m cni "$@"\n')
    py.chmod(0o755)
    return d / "ovs-underlay"


def test_stopped_server_never_holds_the_runtimes_stdout(
        shim: Path, warm: netbed.WarmServer, ovs_bridge: str, pod_netns: netbed.Netns, attacher: ph.Attacher) -> None:
    """SIGSTOP on the server: DEL through the shim falls back, exits, and the runtime's stdout
    pipe sees EOF at once (the fds are sent only after the server's ready message)."""
    a = attacher.new(ph.network(ovs_bridge), pod_netns.path)
    a.add()
    assert warm.proc is not None
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": "DEL", "CNI_CONTAINERID": a.container_id,
           "CNI_NETNS": a.netns, "CNI_IFNAME": "eth0", "CNI_PATH": ph.CNI_PATH, "OVS_UNDERLAY_LOG_FILE": ph.LOG_FILE,
           "OVS_UNDERLAY_WARM_SOCKET": warm.path, "OVS_UNDERLAY_WARM_HANDOFF_MS": "300"}
    os.kill(warm.proc.pid, signal.SIGSTOP)
    try:
        proc = subprocess.Popen([str(shim)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd="/")
        t0 = time.monotonic()
        try:
            out, err = proc.communicate(json.dumps(a.conf).encode(), timeout=20)  # until EOF on stdout
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("DEL's stdout stayed open while the warm server was stopped")
        elapsed = time.monotonic() - t0
    finally:
        os.kill(warm.proc.pid, signal.SIGCONT)
    assert proc.returncode == 0 and out == b"", err
    a.deleted = True
    assert b"running in-process" in err and elapsed < 15
    assert ph.no_trace(a, ovs_bridge) == []


def _mounts_of(pid: int) -> list[str]:
    return [line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]


def test_warm_and_in_process_calls_share_host_local_state(
        tmp_path: Path, ovs_bridge: str, netns_factory: Callable[[str], netbed.Netns], attacher: ph.Attacher) -> None:
    """The warm server runs in its own mount namespace (as in a container) with a private tmpfs
    over the parent of host-local's dataDir. A warm ADD and an in-process ADD must still share
    host-local's state, i.e. get different addresses: workers see the caller's filesystem."""
    state = tmp_path / "state"
    state.mkdir()
    data_dir = state / "host-local"
    s = netbed.WarmServer(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           'mount -t tmpfs ovs-underlay-test "$0" && exec "$@"', str(state), ph.PYTHON, "-m", "cni"],
                          str(tmp_path / "run" / "cni-warm.sock"), tmp_path / "warm.log", cwd=str(ph.ROOT))
    s.start()
    try:
        assert s.proc is not None and str(state) in _mounts_of(s.proc.pid)  # the premise: its own view
        assert str(state) not in _mounts_of(os.getpid())
        conf = ph.network(ovs_bridge, ipam=ph.host_local("10.86.0.0/24", str(data_dir)))
        ips = []
        for on in (True, False, True):
            a = attacher.new(conf, netns_factory("pod").path)
            rc, out, err = a.run("ADD", extra_env=_env(s.path, on))
            assert rc == 0, (out, err)
            a.result = out
            assert ("running in-process" in err) is False
            pids = _worker_pids(ph.LOG_FILE, a.container_id)
            assert pids and (str(s.proc.pid) not in pids)
            ips.append(out["ips"][0]["address"])
        assert len(set(ips)) == 3, ips  # one host-local state, not one per mount namespace
        on_disk = sorted(p.name for p in (data_dir / conf["name"]).iterdir() if p.name.startswith("10.86."))
        assert on_disk == sorted(ip.split("/")[0] for ip in ips)  # in the caller's view of the disk
    finally:
        attacher.cleanup()
        s.stop()


def test_worker_declines_where_the_callers_view_holds_other_code(
        tmp_path: Path, ovs_bridge: str, pod_netns: netbed.Netns, attacher: ph.Attacher) -> None:
    """A server whose code is not the caller's files (here: its own copy of cni/ mounted over
    the checkout in its mount namespace, as an image's bundle differs from the node's) must not
    import from the caller's files: its worker answers "N" and the call runs in-process."""
    copy = tmp_path / "cni-copy"
    subprocess.run(["cp", "-a", str(ph.ROOT / "cni"), str(copy)], check=True)
    s = netbed.WarmServer(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           'mount --bind "$0" "$1" && shift && exec "$@"', str(copy), str(ph.ROOT / "cni"),
                           ph.PYTHON, "-m", "cni"],
                          str(tmp_path / "run" / "cni-warm.sock"), tmp_path / "warm.log", cwd=str(ph.ROOT))
    s.start()
    try:
        a = attacher.new(ph.network(ovs_bridge), pod_netns.path)
        rc, out, err = a.run("ADD", extra_env={**_env(s.path), "OVS_UNDERLAY_WARM_QUIET": "0"})
        assert rc == 0, (out, err)
        a.result = out
        assert "warm worker declined the call" in err
        assert "is not this server's own file in the caller's mount namespace" in s.log.read_text()
        assert netbed.port(a.host) is not None
    finally:
        attacher.cleanup()
        s.stop()


def test_client_never_talks_to_a_server_of_another_user(
        shim: Path, ovs_bridge: str, pod_netns: netbed.Netns, attacher: ph.Attacher) -> None:
    """A socket in a shared directory could be anybody's: both clients check the server's uid
    (SO_PEERCRED) and send it nothing (no env, no stdin, no fds) unless it is root's."""
    import socket
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix=f"ou-test-{netbed.TOKEN}-"))
    shared.chmod(0o1777)
    path = str(shared / "warm.sock")
    ready_r, ready_w = os.pipe()
    counts_r, counts_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a "server" of uid 65534: tells how many bytes each of two callers sent
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            lsock = socket.socket(socket.AF_UNIX)
            lsock.bind(path)
            lsock.listen(8)
            os.write(ready_w, b"x")
            counts = []
            for _ in range(2):
                conn, _ = lsock.accept()
                conn.settimeout(5)
                n = 0
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(65536):
                        n += len(chunk)
                counts.append(n)
                conn.close()
            os.write(counts_w, json.dumps(counts).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(counts_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        a = attacher.new(ph.network(ovs_bridge), pod_netns.path)
        rc, out, err = a.run("ADD", extra_env={**_env(path), "OVS_UNDERLAY_WARM_QUIET": "0"})
        assert rc == 0 and "runs as uid 65534" in err, (out, err)
        a.result = out
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": "DEL", "CNI_CONTAINERID": a.container_id,
               "CNI_NETNS": a.netns, "CNI_IFNAME": "eth0", "CNI_PATH": ph.CNI_PATH,
               "OVS_UNDERLAY_LOG_FILE": ph.LOG_FILE, "OVS_UNDERLAY_WARM_SOCKET": path}
        res = subprocess.run([str(shim)], env=env, input=json.dumps(a.conf).encode(), capture_output=True, timeout=60)
        assert res.returncode == 0 and b"the server runs as another user" in res.stderr, res.stderr
        a.deleted = True
        assert json.loads(os.read(counts_r, 100)) == [0, 0]  # neither client sent it a single byte
    finally:
        os.close(ready_r)
        os.close(counts_r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.rmtree(shared, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The plugin's own suites through the warm path (opt-in: doubles their run time)

if os.environ.get("OU_TEST_WARM_ALL") == "1":
    from test_plugin_datapath import *  # type: ignore[import-not-found]  # noqa: F403
    from test_plugin_lifecycle import *  # type: ignore[import-not-found]  # noqa: F403

    @pytest.fixture(autouse=True, scope="module")
    def _all_through_warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        d = tmp_path_factory.mktemp("warm")
        s = warm_server(str(d / "cni-warm.sock"), d / "warm.log")
        s.start()
        old = os.environ.get("OVS_UNDERLAY_WARM_SOCKET")
        os.environ["OVS_UNDERLAY_WARM_SOCKET"] = s.path
        yield
        if old is None:
            os.environ.pop("OVS_UNDERLAY_WARM_SOCKET", None)
        else:
            os.environ["OVS_UNDERLAY_WARM_SOCKET"] = old
        s.stop()
