"""Fixtures shared by the end-to-end tests that drive the frozen bundle."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import e2e_helpers as e2e
import pytest

from testbed import netbed, nodebed


@pytest.fixture(scope="session")
def bundle() -> Path:
    """dist/ovs-underlay/, built once per session when missing or older than the sources."""
    return e2e.ensure_bundle()


@pytest.fixture(scope="session")
def cnitool_bin() -> Path:
    return e2e.ensure_cnitool()


@pytest.fixture
def frozen_ipamd(bundle: Path, tmp_path: Path) -> Iterator[netbed.Ipamd]:
    """ipamd from the bundle (not `python -m ipamd`), on a private socket and state dir."""
    d = e2e.start_frozen_ipamd(tmp_path / "ipamd")
    yield d
    d.stop()


@pytest.fixture
def tor() -> Iterator[nodebed.Tor]:
    """An emulated ToR switch with the gateways of VLANs 100 and 200 (testbed/nodebed.py)."""
    t = nodebed.make_tor(vlans={100: ["192.168.100.1/24"], 200: ["192.168.200.1/24"]})
    yield t
    t.destroy()


@pytest.fixture
def node_factory() -> Iterator[Callable[[str], nodebed.Node]]:
    """Nodes made of namespaces (each with its own OVS), destroyed after the test."""
    made: list[nodebed.Node] = []

    def make(name: str) -> nodebed.Node:
        n = nodebed.make_node(name)
        made.append(n)
        return n

    yield make
    for n in made:
        n.destroy()
