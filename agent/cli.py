"""`ovs-underlay-node`: the node agent's command line (a contract scripts and units rely on).

    apply  [--dry-run] [NAME ...]   apply the file's provider networks for this node (or only NAME);
                                    --dry-run prints the plan and the persistent configuration and
                                    changes nothing
    status [-o table|json] [--check]  per network: ready, interface, MTU, bridge, state; --check
                                    exits 1 unless every network is ready (readiness probe)
    remove NAME [--dry-run]         give the NIC back as in its snapshot, delete the bridge if the
                                    agent made it and nothing else uses it
    serve  [--interval S]           apply at start, then keep applied (OVS restarts, file changes)

Options (before or after the command): --config FILE, --node-name NAME, --ovsdb unix:PATH,
--state-dir DIR, --host-run DIR, --log-level L.

Exit codes: 0 done (or nothing to do); 1 apply failed and was rolled back (the NIC is as it was),
or remove failed; 2 bad usage, invalid file, or refused before any change; 3 the rollback failed
too (the journal keeps the snapshot; the message says what is left); 4 OVSDB or the state dir
unusable before any change. Messages are single lines on stderr; `status -o json` and the dry
run write to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import config as C
from agent import engine as E
from agent import netmgr
from agent import plan as P
from agent.drivers import Drivers
from agent.journal import JournalError, StateDir
from core.errors import CoreError
from core.names import DEFAULT_OVSDB, is_ovsdb_remote

PROG = "ovs-underlay-node"
DEFAULT_CONFIG = "/etc/ovs-underlay/provider-networks.yaml"
DEFAULT_STATE_DIR = "/var/lib/ovs-underlay/node"
_log = logging.getLogger("ovs-underlay.agent")


def _options(p: argparse.ArgumentParser, top: bool) -> None:
    # Defined on the top parser and every subcommand, so options work before or after the command;
    # SUPPRESS on subcommands keeps a value given before the command.
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument(
        "--config",
        default=d(DEFAULT_CONFIG),
        metavar="FILE",
        help=f"provider networks, JSON or YAML (default {DEFAULT_CONFIG})",
    )
    p.add_argument(
        "--node-name",
        default=d(None),
        metavar="NAME",
        help="this node's name in the file (default: $NODE_NAME, else the hostname)",
    )
    p.add_argument(
        "--ovsdb",
        default=d(DEFAULT_OVSDB),
        metavar="REMOTE",
        help=f"OVSDB endpoint (default {DEFAULT_OVSDB})",
    )
    p.add_argument(
        "--state-dir",
        default=d(DEFAULT_STATE_DIR),
        metavar="DIR",
        help=f"journal and snapshots; must survive reboots (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--host-run",
        default=d(None),
        metavar="DIR",
        help="the host's /run, to see NetworkManager/networkd state (default /run; in a "
        "container mount the host's /run there)",
    )
    p.add_argument("--log-level", default=d("info"), choices=("debug", "info", "warning", "error"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="ovs-underlay node agent: bridge this node's NICs into OVS provider-network "
        "bridges (br-<name>) transactionally: snapshot, apply, verify the gateway, roll back on failure.",
        epilog="Exit codes: 0 ok, 1 failed and rolled back, 2 usage/config/refused (nothing changed), "
        "3 rollback failed, 4 OVSDB or state dir unusable (nothing changed).",
    )
    _options(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    a = sub.add_parser("apply", help="apply the provider networks for this node")
    a.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and the persistent configuration; change nothing",
    )
    a.add_argument("names", nargs="*", metavar="NAME", help="only these networks")
    s = sub.add_parser("status", help="readiness per provider network")
    s.add_argument("-o", "--output", choices=("table", "json"), default="table")
    s.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless every network for this node is ready (a readiness probe)",
    )
    r = sub.add_parser("remove", help="give a provider network's NIC back and delete its bridge")
    r.add_argument("name", metavar="NAME")
    r.add_argument("--dry-run", action="store_true", help="print what remove would do; change nothing")
    v = sub.add_parser("serve", help="apply, then keep applied (OVS restarts, file changes)")
    v.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="seconds between checks (default 2)"
    )
    for sp in (a, s, r, v):
        _options(sp, top=False)
    return p


def _setup_logging(level: str) -> None:
    root = logging.getLogger("ovs-underlay")
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False


def real_drivers(ovsdb: str) -> Drivers:
    from core.bridges import Bridges
    from core.gateway import GatewayProbe
    from core.hostnet import HostNet

    return Drivers(HostNet(), Bridges(ovsdb), GatewayProbe())


def _node(args: argparse.Namespace) -> str:
    return str(args.node_name or os.environ.get("NODE_NAME") or socket.gethostname())


def _opts(args: argparse.Namespace) -> E.Options:
    host_run = Path(args.host_run or "/run")
    # Explicit --host-run: trust it. Default /run: only meaningful in the host's netns.
    check = bool(args.host_run) or netmgr.in_host_netns()
    return E.Options(
        host_run=host_run, check_managers=check, failpoints=E.Options.failpoints_from_env(os.environ)
    )


def _err(msg: str) -> None:
    sys.stderr.write(f"{PROG}: {msg}\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not is_ovsdb_remote(args.ovsdb):
        p.error(f"--ovsdb {args.ovsdb!r} is not an OVSDB remote (unix:PATH, tcp:IP:PORT or ssl:IP:PORT)")
    _setup_logging(args.log_level)
    try:
        if args.cmd == "serve":
            return _serve(args)
        cfg = C.load(args.config)
        node = _node(args)
        nets, excluded = cfg.for_node(node)
        store = StateDir(args.state_dir)
        if args.cmd == "apply":
            return _apply(args, nets, store, node)
        if args.cmd == "status":
            return _status(args, cfg, nets, excluded, store)
        return _remove(args, cfg, store, node)
    except C.ConfigError as exc:
        _err(str(exc))
        return 2
    except P.Refused as exc:
        _err(f"refused, nothing changed: {exc}")
        return 2
    except JournalError as exc:
        _err(str(exc))
        return 4
    except CoreError as exc:
        _err(exc.msg + (f" ({exc.hint})" if exc.hint else ""))
        return 4


def _apply(args: argparse.Namespace, nets: list[C.NodeNetwork], store: StateDir, node: str) -> int:
    if args.names:
        unknown = set(args.names) - {n.name for n in nets}
        if unknown:
            raise C.ConfigError(f"no provider network {sorted(unknown)} for node {node} in {args.config}")
        nets = [n for n in nets if n.name in args.names]
    opts = _opts(args)
    d = real_drivers(args.ovsdb)
    try:
        if args.dry_run:
            for nn in nets:
                plan = E.plan_only(nn, d, store, opts)
                print(P.render(plan))
                print(_persistent(nn, plan))
            return 0
        rc = 0
        with store.locked():
            for nn in nets:
                try:
                    out = E.apply_network(nn, d, store, opts)
                    print(
                        f"{nn.name}: {'applied' if out.changed else 'nothing to do'} "
                        f"({nn.nic} -> {nn.bridge}; was: {out.state}; {out.seconds:.2f} s)"
                    )
                except E.ApplyFailed as exc:
                    _err(str(exc))
                    rc = max(rc, 1 if exc.restored else 3)
        return rc
    finally:
        d.close()


def _persistent(nn: C.NodeNetwork, plan: P.Plan) -> str:
    """The configuration an admin persists so the host's manager builds the same layout at boot."""
    snap = plan.snapshot
    if snap is None:
        return ""
    mtu = nn.network.mtu or snap.link.mtu
    out = [f"  persistent configuration for {nn.nic} -> {nn.bridge} (so the host comes up bridged at boot):"]
    out.append("  # NetworkManager (with the NetworkManager-ovs plugin): keyfiles, mode 0600")
    for path, text in netmgr.nm_keyfiles(nn.bridge, nn.nic, snap, mtu, nn.network.datapath_type).items():
        out.append(f"  ## {path}")
        out += [f"  {line}" if line else "" for line in text.rstrip().splitlines()]
    out.append("  # systemd-networkd (OVS re-creates the bridge from its database at boot)")
    for path, text in netmgr.networkd_files(nn.bridge, nn.nic, snap, mtu).items():
        out.append(f"  ## {path}")
        out += [f"  {line}" if line else "" for line in text.rstrip().splitlines()]
    return "\n".join(out)


def _status(
    args: argparse.Namespace,
    cfg: C.AgentConfig,
    nets: list[C.NodeNetwork],
    excluded: list[str],
    store: StateDir,
) -> int:
    from agent import status as S

    opts = _opts(args)
    d = real_drivers(args.ovsdb)
    try:
        rows = [S.network_status(nn, d, store, opts) for nn in nets]
    finally:
        d.close()
    for name in excluded:
        net = cfg.get(name)
        assert net is not None
        rows.append(S.excluded(net))
    known = {r.network for r in rows}
    rows += [S.orphan_status(n, store) for n in store.names() if n not in known]
    rc = (
        1
        if args.check and not all(r.ready for r in rows if not r.state.startswith("this node is excluded"))
        else 0
    )
    if args.output == "json":
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return rc
    table: list[list[Any]] = [["NETWORK", "BRIDGE", "INTERFACE", "MTU", "READY", "STATE"]]
    for r in rows:
        state = r.state + (f" ({r.error})" if r.error else "")
        table.append(
            [r.network, r.bridge, r.interface or "-", r.mtu or "-", "yes" if r.ready else "no", state]
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + str(row[5]))
    return rc


def _remove(args: argparse.Namespace, cfg: C.AgentConfig, store: StateDir, node: str) -> int:
    j = store.read(args.name)
    net = cfg.get(args.name)
    if net is not None and net.interface_for(node) is not None:
        nn = C.NodeNetwork(net, net.interface_for(node) or "")
    elif j is not None:  # not in the file any more: the journal knows the NIC
        nn = C.NodeNetwork(C.ProviderNetwork(args.name, j.nic), j.nic)
    else:
        raise P.Refused(
            f"provider network {args.name} is neither in {args.config} for node {node} nor "
            f"journaled in {store.path}"
        )
    opts = _opts(args)
    d = real_drivers(args.ovsdb)
    try:
        if args.dry_run:
            print(P.render(E.plan_only(nn, d, store, opts, kind="remove")))
            return 0
        with store.locked():
            try:
                out = E.remove_network(nn, d, store, opts)
            except E.RemoveFailed as exc:
                _err(str(exc))
                return 1
        print(
            f"{nn.name}: {'removed' if out.changed else 'nothing to do'} "
            f"({nn.nic} restored; was: {out.state})"
        )
        return 0
    finally:
        d.close()


def _serve(args: argparse.Namespace) -> int:
    from agent.serve import Server

    node = _node(args)
    srv = Server(
        Path(args.config),
        node,
        lambda: real_drivers(args.ovsdb),
        StateDir(args.state_dir),
        _opts(args),
        interval_s=args.interval,
    )
    srv.install_signals()
    return srv.run()
