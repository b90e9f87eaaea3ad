"""Running plans as transactions: observe, journal, execute step by step, verify, roll back.

`apply_network` is the transaction of one provider network:
1. An interrupted rollback or remove found in the journal is finished first (the node goes back
   to its snapshot before anything new is tried).
2. Observe the live state, plan (agent/plan.py). Nothing to do: done, nothing written.
3. Journal phase "applying" with the snapshot, then each step: journal the step, run its
   actions. A crash anywhere leaves a journal that the next run rolls forward from.
4. Any failure (a step, or verification: the gateways do not answer from the bridge) writes
   phase "rolling-back", observes again and runs the restore plan, which ends by checking that
   the NIC is exactly its snapshot; then phase "rolled-back" and `ApplyFailed` naming the step
   and the cause.

`remove_network` runs the restore plan for a network that is applied (or half-applied) and
deletes its journal once the NIC matches its snapshot.

Failpoints (tests only): OVS_UNDERLAY_AGENT_FAILPOINT="<step>:<before|after>:<stop|kill|fail>"
makes the process stop itself (SIGSTOP, so a test can SIGKILL it at an exact point), die
(SIGKILL) or raise, just before a step's actions run or just after they ran and before the
journal records the next step. Unset, it costs one dict lookup per step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent import netmgr
from agent import plan as P
from agent.config import NodeNetwork
from agent.drivers import Drivers
from agent.journal import Journal, StateDir
from core import bridges as B
from core.errors import CoreError

FAILPOINT_ENV = "OVS_UNDERLAY_AGENT_FAILPOINT"
_log = logging.getLogger("ovs-underlay.agent")


class ApplyFailed(Exception):
    """apply failed at `step` and was rolled back (`restored`), or the rollback failed too."""

    def __init__(
        self,
        network: str,
        step: str,
        cause: str,
        restored: bool,
        rollback_error: str = "",
        rollback_s: float = 0.0,
    ) -> None:
        self.network, self.step, self.cause = network, step, cause
        self.restored, self.rollback_error, self.rollback_s = restored, rollback_error, rollback_s
        if restored:
            msg = (
                f"provider network {network}: apply failed at step {step}: {cause}; rolled back in "
                f"{rollback_s:.1f} s, the NIC is as in its snapshot"
            )
        else:
            msg = (
                f"provider network {network}: apply failed at step {step}: {cause}; ROLLBACK FAILED: "
                f"{rollback_error}. The journal keeps the snapshot: run apply or remove again"
            )
        super().__init__(msg)


class RemoveFailed(Exception):
    pass


@dataclass
class Options:
    host_run: Path = Path("/run")
    check_managers: bool = True  # consult NetworkManager / networkd state (host netns only)
    datapath_default: str = "system"
    failpoints: Mapping[str, str] = field(default_factory=dict)  # "step:when" -> action

    @staticmethod
    def failpoints_from_env(env: Mapping[str, str]) -> dict[str, str]:
        spec = env.get(FAILPOINT_ENV, "")
        out = {}
        for item in filter(None, spec.split(",")):
            parts = item.split(":")
            if (
                len(parts) != 3
                or parts[1] not in ("before", "after")
                or parts[2] not in ("stop", "kill", "fail")
            ):
                _log.warning(
                    "%s: ignoring %r (expected step:before|after:stop|kill|fail)", FAILPOINT_ENV, item
                )
                continue
            out[f"{parts[0]}:{parts[1]}"] = parts[2]
        return out


@dataclass
class Outcome:
    network: str
    changed: bool
    state: str
    plan: P.Plan | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Observing


def observe(nn: NodeNetwork, d: Drivers, j: Journal | None, opts: Options) -> P.Observed:
    nic = d.net.iface_state(nn.nic)
    vlans = {v: d.net.iface_state(v) for v in nn.network.vlan_interfaces}
    # Our VLAN ports: those the journal recorded, and those the VLAN interfaces map to now.
    vlan_ports = [vp.port for vp in j.vlan_ports] if j else []
    for v, st in vlans.items():
        if st is not None and nic is not None:
            with contextlib.suppress(P.Refused):  # plan_apply refuses it, with the reason
                vlan_ports.append(P.vlan_port_name(nn.bridge, P.vlan_id(v, st, nic)))
    vlan_ports = list(dict.fromkeys(vlan_ports))
    managed: dict[str, list[netmgr.Management]] = {}
    if opts.check_managers:
        for name, st in [(nn.nic, nic), *vlans.items()]:
            if st is not None:
                found = netmgr.detect(st.link.index, opts.host_run)
                if found:
                    managed[name] = found
    return P.Observed(
        nic=nic,
        nic_bridge=d.ovs.port_bridge(nn.nic),
        bridge=d.ovs.bridge(nn.bridge, [nn.bridge, nn.nic, *vlan_ports]),
        bridge_state=d.net.iface_state(nn.bridge),
        vlans=vlans,
        vlan_ports={p: d.net.iface_state(p) for p in vlan_ports},
        managed=managed,
    )


# ---------------------------------------------------------------------------------------------
# Executing


def _failpoint(opts: Options, step: str, when: str) -> None:
    what = opts.failpoints.get(f"{step}:{when}")
    if what is None:
        return
    _log.warning("failpoint %s:%s: %s", step, when, what)
    if what == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "fail":
        raise CoreError(f"failpoint {step}:{when}")


@dataclass
class _Cursor:
    """The journal as the run advances (the caller reads the step reached after a failure)."""

    journal: Journal


def _run(plan: P.Plan, d: Drivers, store: StateDir, cur: _Cursor, opts: Options) -> None:
    for step in plan.steps:
        cur.journal = cur.journal.at(step=step.name)
        store.write(cur.journal)
        _failpoint(opts, step.name, "before")
        for action in step.actions:
            _log.info("%s %s: %s", plan.network.name, step.name, action.text())
            action.run(d)
        _failpoint(opts, step.name, "after")


def apply_network(nn: NodeNetwork, d: Drivers, store: StateDir, opts: Options) -> Outcome:
    """Apply one provider network as a transaction (see module docstring). Raises P.Refused
    (nothing changed), ApplyFailed (rolled back, or the rollback failed)."""
    t0 = time.monotonic()
    j = store.read(nn.name)
    if j is not None and j.phase in ("rolling-back", "removing"):
        _log.warning(
            "%s: a %s was interrupted at step %s; finishing it first",
            nn.name,
            "rollback" if j.phase == "rolling-back" else "remove",
            j.step,
        )
        _restore(nn, d, store, j, opts, "rollback" if j.phase == "rolling-back" else "remove")
        j = store.read(nn.name)
    if j is not None and j.phase == "rolled-back":
        j = None  # its snapshot described the NIC before a failed apply; take a fresh one
    obs = observe(nn, d, j, opts)
    plan = P.plan_apply(nn, obs, j, opts.datapath_default)
    for w in plan.warnings:
        _log.warning("%s: %s", nn.name, w)
    if not plan.work:
        if j is None or j.phase != "applied":
            # Applied before the journal existed (or by an agent whose journal was lost).
            store.write(_journal_for(nn, plan, j, obs).at("applied", step=""))
        return Outcome(nn.name, False, plan.state, plan, time.monotonic() - t0)
    if j is not None and j.interrupted:
        _log.warning("%s: repairing a half-applied state (%s; last step %s)", nn.name, plan.state, j.step)
    else:
        _log.info("%s: applying (%s)", nn.name, plan.state)
    j = _journal_for(nn, plan, j, obs).at("applying", step="snapshot").noted(f"apply started ({plan.state})")
    store.write(j)
    cur = _Cursor(j)
    try:
        _run(plan, d, store, cur, opts)
        j = cur.journal
    except Exception as exc:  # any failure: restore the snapshot (never leave the node half-bridged)
        j = cur.journal
        step = j.step
        cause = str(getattr(exc, "msg", None) or exc)
        _log.error("%s: apply failed at step %s: %s; rolling back", nn.name, step, cause)
        j = j.at("rolling-back", error=f"step {step}: {cause}").noted(f"apply failed at {step}: {cause}")
        store.write(j)
        t1 = time.monotonic()
        try:
            _restore(nn, d, store, j, opts, "rollback")
        except Exception as rexc:
            rerr = str(getattr(rexc, "msg", None) or rexc)
            _log.critical("%s: rollback failed: %s", nn.name, rerr)
            _mark_error(d, nn, f"apply failed at {step}: {cause}; rollback failed: {rerr}")
            raise ApplyFailed(nn.name, step, cause, False, rerr) from exc
        took = time.monotonic() - t1
        _mark_error(d, nn, f"apply failed at {step}: {cause}")
        raise ApplyFailed(nn.name, step, cause, True, rollback_s=took) from exc
    store.write(j.at("applied", step="", error="").noted("applied"))
    _log.info("%s: applied in %.2f s", nn.name, time.monotonic() - t0)
    return Outcome(nn.name, True, plan.state, plan, time.monotonic() - t0)


def _journal_for(nn: NodeNetwork, plan: P.Plan, j: Journal | None, obs: P.Observed) -> Journal:
    if j is not None and j.nic_snapshot is not None and j.phase in ("applying", "applied"):
        return j
    return Journal(
        network=nn.name,
        bridge=nn.bridge,
        nic=nn.nic,
        phase="applying",
        nic_snapshot=plan.snapshot,
        vlan_snapshots=plan.vlan_snapshots,
        vlan_ports=plan.vlan_ports,
        bridge_created=obs.bridge is None or (j is not None and j.bridge_created),
        taken_at=time.time(),
    )


def _mark_error(d: Drivers, nn: NodeNetwork, error: str) -> None:
    """Best effort: leave the reason on a bridge that survived (status and the plugin show it)."""
    try:
        if d.ovs.bridge(nn.bridge) is not None:
            d.ovs.set_bridge_ids(nn.bridge, {B.READY: "false", B.ERROR: error[:500]})
    except CoreError as exc:
        _log.debug("%s: could not record the error on %s: %s", nn.name, nn.bridge, exc.msg)


def _restore(nn: NodeNetwork, d: Drivers, store: StateDir, j: Journal, opts: Options, kind: str) -> None:
    """Run the restore plan to the end (rollback or remove). On success a rollback leaves the
    journal "rolled-back" (with its error), a remove deletes it."""
    phase = "rolling-back" if kind == "rollback" else "removing"
    j = j.at(phase)
    store.write(j)
    obs = observe(nn, d, j, Options(opts.host_run, False, opts.datapath_default, opts.failpoints))
    plan = P.plan_restore(nn, obs, j, kind)
    for w in plan.warnings:
        _log.warning("%s: %s", nn.name, w)
    cur = _Cursor(j)
    _run(plan, d, store, cur, opts)
    j = cur.journal
    if kind == "rollback":
        store.write(j.at("rolled-back", step="").noted("rolled back"))
    else:
        store.delete(nn.name)


def remove_network(nn: NodeNetwork, d: Drivers, store: StateDir, opts: Options) -> Outcome:
    """Give the NIC back as in its snapshot; delete the bridge if we made it and nothing else
    uses it. Raises P.Refused when there is nothing the agent applied."""
    t0 = time.monotonic()
    j = store.read(nn.name)
    if j is None:
        raise P.Refused(
            f"provider network {nn.name} has no journal in {store.path}: the agent did not apply "
            f"it on this node (or removed it already); {nn.nic} is not touched"
        )
    if j.phase == "rolled-back":
        store.delete(nn.name)
        return Outcome(
            nn.name, False, "not applied (the last apply was rolled back)", None, time.monotonic() - t0
        )
    obs = observe(nn, d, j, opts)
    state = P.classify(nn, obs)
    try:
        _restore(nn, d, store, j, opts, "remove")
    except Exception as exc:
        raise RemoveFailed(
            f"provider network {nn.name}: remove failed: {getattr(exc, 'msg', None) or exc}; "
            "the journal keeps the snapshot: run remove again"
        ) from exc
    return Outcome(nn.name, True, state, None, time.monotonic() - t0)


def plan_only(nn: NodeNetwork, d: Drivers, store: StateDir, opts: Options, kind: str = "apply") -> P.Plan:
    """The plan `apply` (or `remove`) would run now, without running it (the dry run)."""
    j = store.read(nn.name)
    if kind == "remove":
        if j is None:
            raise P.Refused(f"provider network {nn.name} has no journal: nothing to remove")
        return P.plan_restore(nn, observe(nn, d, j, opts), j, "remove")
    if j is not None and j.phase in ("rolling-back", "removing"):
        return P.plan_restore(
            nn, observe(nn, d, j, opts), j, "rollback" if j.phase == "rolling-back" else "remove"
        )
    if j is not None and j.phase == "rolled-back":
        j = None
    return P.plan_apply(nn, observe(nn, d, j, opts), j, opts.datapath_default)
