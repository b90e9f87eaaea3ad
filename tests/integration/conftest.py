"""Fixtures shared by the end-to-end tests that drive the frozen bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import e2e_helpers as e2e
import pytest

from testbed import netbed


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
