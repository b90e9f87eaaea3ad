"""Shared fixtures and the end-of-session leftover check.

Integration fixtures create uniquely named objects (see testbed/netbed.py) and remove them in
finalizers, even when the test fails. At the end of the session every netns, bridge, link, OVS
port and daemon carrying this run's token is looked for; any that is left is removed and the run
fails, naming it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed import netbed, nodebed, ovnbed


def pytest_configure(config: pytest.Config) -> None:
    os.environ["OU_TEST_TOKEN"] = netbed.TOKEN  # subprocesses (helpers) name things the same way


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.root)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("integration tests need root (netns, veth, OVS); CI runs them as root", pytrace=False)


# ---------------------------------------------------------------------------------------------
# leftovers


def _leftovers() -> list[str]:
    tok = f"t{netbed.TOKEN}"
    found: list[str] = []
    with contextlib.suppress(Exception):
        for line in netbed.sh("ip", "netns", "list").stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if tok in name:
                found.append(f"netns {name}")
                netbed.sh("ip", "netns", "del", name, check=False)
    with contextlib.suppress(Exception):
        for br in netbed.vsctl("list-br").stdout.split():
            if tok in br:
                found.append(f"OVS bridge {br}")
                netbed.delete_bridge(br)
    with contextlib.suppress(Exception):
        for row in netbed.ovs_rows("Interface", "name", "external_ids"):
            ids = row.get("external_ids") or {}
            ours = f"test{netbed.TOKEN}" in str(ids.get("container_id", ""))
            if ours or tok in str(ids.get("probe_netns", "")):  # a pod's port, or an ipamd's probe port
                found.append(f"OVS interface {row['name']} (container {ids.get('container_id')})")
                netbed.vsctl("--if-exists", "del-port", row["name"], check=False)
    with contextlib.suppress(Exception):
        for ln in netbed.links():
            name, alias = ln.get("ifname", ""), ln.get("ifalias", "") or ""
            if tok in name or f"test{netbed.TOKEN}" in alias:
                found.append(f"link {name} ({alias or ln.get('link_type')})")
                netbed.delete_link(name)
    for p in netbed.PROCS:
        if p.poll() is None:
            found.append(f"process {p.pid} {' '.join(map(str, p.args))[:80]}")  # type: ignore[arg-type]
            p.kill()
            p.wait()
    found += nodebed.leftovers()  # after the daemons above are dead
    found += ovnbed.leftovers()
    return found


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if netbed.REPORT:
        terminalreporter.section("measured")
        for line in netbed.REPORT:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() != 0:
        return
    for f in netbed.PLUGIN_LOG_DIR.glob(f"test-{netbed.TOKEN}-*.log"):  # this run's plugin logs
        with contextlib.suppress(OSError):
            f.unlink()
    left = _leftovers()
    if left:
        sys.stderr.write("\nLEFTOVERS: the tests left these behind (now removed):\n  "
                         + "\n  ".join(left) + "\n")
        session.exitstatus = 1


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def netns_factory() -> Iterator[Callable[[str], netbed.Netns]]:
    made: list[netbed.Netns] = []

    def make(role: str = "pod") -> netbed.Netns:
        ns = netbed.make_netns(role)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.delete()


@pytest.fixture
def pod_netns(netns_factory: Callable[[str], netbed.Netns]) -> netbed.Netns:
    return netns_factory("pod")


@pytest.fixture
def ovs_bridge() -> Iterator[str]:
    br = netbed.make_bridge("br")
    yield br
    netbed.delete_bridge(br)


@pytest.fixture
def underlay() -> Iterator[netbed.Underlay]:
    """Bridge + trunk uplink + ToR with routers: VLAN 100 (192.168.100.1/24, fd00:100::1/64)
    and VLAN 200 (192.168.200.1/24). Tests may add/remove routers."""
    u = netbed.make_underlay({100: ["192.168.100.1/24", "fd00:100::1/64"], 200: ["192.168.200.1/24"]})
    yield u
    u.destroy()


@pytest.fixture
def ipamd(tmp_path: Path) -> Iterator[netbed.Ipamd]:
    """A real ipamd process on a temp socket and state dir (SQLite)."""
    d = netbed.start_ipamd(str(tmp_path))
    yield d
    d.stop()


@pytest.fixture
def ipamd_factory(tmp_path: Path) -> Iterator[Callable[..., netbed.Ipamd]]:
    started: list[netbed.Ipamd] = []

    def make(*extra_args: str, name: str = "ipamd") -> netbed.Ipamd:
        work = tmp_path / name
        work.mkdir(exist_ok=True)
        d = netbed.start_ipamd(str(work), extra_args)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()
