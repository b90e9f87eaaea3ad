"""The agent's durable memory: one journal per provider network in --state-dir.

Why a journal: `apply` changes the node's own connectivity in several steps, and the process can
die between any two of them (kill -9, OOM, a reboot). The journal holds what is needed to finish
or undo the job without trusting the live state: the snapshot of the NIC (and its VLAN
interfaces) taken BEFORE the first change, what we created (so we never delete what we did not
make), and the phase and step reached. A later `apply`, `remove` or `serve` reads it first:
- phase "applying" (interrupted apply): roll forward from the snapshot, verify, and roll back to
  the snapshot if verification fails;
- "rolling-back" or "removing" (interrupted undo): finish restoring the snapshot first;
- "applied": the snapshot stays authoritative for `remove` and for re-applying after a reboot;
- "rolled-back": the last apply failed and was undone (the error is kept for `status`).
A network whose journal is gone was never applied, or was removed.

Writes are atomic and durable (temp file, fsync, rename, fsync of the directory), so a crash
leaves the previous or the next journal, never a torn one. A journal that cannot be read is
moved aside (`<name>.json.corrupt-<time>`) and reported, never trusted. The state dir is 0700 and
one lock (`flock` on `<state-dir>/lock`) serialises agents: `apply` from a shell while `serve`
runs waits for it instead of interleaving.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core import netstate
from core.netstate import IfaceState

VERSION = 1
PHASES = ("applying", "applied", "rolling-back", "rolled-back", "removing")
_log = logging.getLogger("ovs-underlay.agent.journal")


class JournalError(Exception):
    """The state dir cannot be used (permissions, lock timeout, a corrupt journal)."""


@dataclass(frozen=True)
class VlanPort:
    """A VLAN interface of the NIC carried to an OVS internal port of the bridge."""

    interface: str
    port: str
    vlan: int


@dataclass(frozen=True)
class Journal:
    network: str
    bridge: str
    nic: str
    phase: str
    step: str = ""
    nic_snapshot: IfaceState | None = None
    vlan_snapshots: tuple[IfaceState, ...] = ()
    vlan_ports: tuple[VlanPort, ...] = ()
    bridge_created: bool = False  # we made the bridge: `remove` may delete it
    taken_at: float = 0.0  # when the snapshot was taken
    updated_at: float = 0.0
    error: str = ""
    history: tuple[str, ...] = field(default=())  # last outcomes, newest last

    def at(self, phase: str | None = None, step: str | None = None, **kw: Any) -> Journal:
        return replace(
            self,
            phase=phase or self.phase,
            step=self.step if step is None else step,
            updated_at=time.time(),
            **kw,
        )

    def noted(self, outcome: str) -> Journal:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {outcome}"
        return replace(self, history=(*self.history, line)[-10:])

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "network": self.network,
            "bridge": self.bridge,
            "nic": self.nic,
            "phase": self.phase,
            "step": self.step,
            "snapshot": {
                "takenAt": self.taken_at,
                "nic": netstate.to_json(self.nic_snapshot) if self.nic_snapshot else None,
                "vlanInterfaces": [netstate.to_json(s) for s in self.vlan_snapshots],
            },
            "vlanPorts": [
                {"interface": v.interface, "port": v.port, "vlan": v.vlan} for v in self.vlan_ports
            ],
            "bridgeCreated": self.bridge_created,
            "updatedAt": self.updated_at,
            "error": self.error,
            "history": list(self.history),
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Journal:
        if d.get("version") != VERSION:
            raise ValueError(f"journal version {d.get('version')!r}, expected {VERSION}")
        if d["phase"] not in PHASES:
            raise ValueError(f"unknown phase {d['phase']!r}")
        snap = d.get("snapshot") or {}
        return Journal(
            network=str(d["network"]),
            bridge=str(d["bridge"]),
            nic=str(d["nic"]),
            phase=str(d["phase"]),
            step=str(d.get("step", "")),
            nic_snapshot=netstate.from_json(snap["nic"]) if snap.get("nic") else None,
            vlan_snapshots=tuple(netstate.from_json(s) for s in snap.get("vlanInterfaces", ())),
            vlan_ports=tuple(
                VlanPort(str(v["interface"]), str(v["port"]), int(v["vlan"])) for v in d.get("vlanPorts", ())
            ),
            bridge_created=bool(d.get("bridgeCreated", False)),
            taken_at=float(snap.get("takenAt", 0.0)),
            updated_at=float(d.get("updatedAt", 0.0)),
            error=str(d.get("error", "")),
            history=tuple(str(h) for h in d.get("history", ())),
        )

    @property
    def interrupted(self) -> bool:
        """A previous run died in the middle (the next run must finish or undo its work)."""
        return self.phase in ("applying", "rolling-back", "removing")


class StateDir:
    """The journals of one node: `<dir>/<network>.json`, plus `<dir>/lock`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def ensure(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise JournalError(f"cannot use state dir {self.path}: {exc.strerror or exc}") from exc

    def file(self, network: str) -> Path:
        return self.path / f"{network}.json"

    @contextlib.contextmanager
    def locked(self, timeout_s: float = 60.0) -> Iterator[None]:
        """Hold the state dir's lock (one agent at a time changes this node's networks)."""
        self.ensure()
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() > deadline:
                        raise JournalError(
                            f"another agent holds {self.path}/lock for more than {timeout_s:g} s"
                        ) from exc
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self, network: str) -> Journal | None:
        """The journal of `network`, None when there is none. A corrupt one is moved aside."""
        f = self.file(network)
        try:
            data = json.loads(f.read_text())
            return Journal.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = f.with_name(f"{f.name}.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(f, aside)
            raise JournalError(
                f"journal {f} is unreadable ({exc}); moved to {aside.name}. Check the "
                "interface by hand before applying again"
            ) from exc

    def names(self) -> list[str]:
        """Networks that have a journal."""
        try:
            return sorted(p.stem for p in self.path.glob("*.json"))
        except OSError:
            return []

    def write(self, j: Journal) -> None:
        """Atomically replace the journal (tmp + fsync + rename + fsync dir)."""
        self.ensure()
        f = self.file(j.network)
        tmp = f.with_name(f".{f.name}.tmp")
        data = json.dumps(j.to_json(), indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, f)
        self._sync_dir()

    def delete(self, network: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file(network))
        self._sync_dir()

    def _sync_dir(self) -> None:
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
