"""`ovs-underlay-ipamd`: `serve` and the admin subcommands (a contract other tools rely on).

    serve   [--config FILE] [--socket PATH] [--state-dir DIR] [--metrics-port N] [--log-level L]
            [--listen ADDR --tls-cert F --tls-key F --tls-client-ca F]
            [--store sqlite|etcd] [--etcd-endpoints URL,...] [--etcd-cacert F]
            [--etcd-cert F] [--etcd-key F] [--etcd-prefix P] [--node-name N] [--block-size N]
            [--outage-reserve N] [--ovsdb unix:PATH] [--reconcile-interval S] [--reconcile-grace S]
            [--probe-netns NAME] [--probe-candidates N] [--no-probe-ports]
                                                  flags override the file; no config = defaults;
                                                  TCP is mutual TLS only
    pools   [--network N] [-o table|json]         used/total per subnet entry
    leases  [--network N] [--all] [-o table|json] one row per address; live only unless --all
    release --container ID --ifname IF [--network N]
    gc      --network N (--keep CID/IFNAME ... | --release-all)
            releases every live lease of N except the kept attachments; with no --keep the
            explicit --release-all is required, so a typo can never empty a network
    health                                        exit 0 iff the daemon reports SERVING
    nodes   [-o table|json]                       cluster nodes (etcd store): alive, leases, blocks
    nodes release NODE                            free a dead node's blocks, leases and reserve;
                                                  refused while its heartbeat is alive
    reconcile [--dry-run] [--grace-seconds N] [-o table|json]
            one reconcile pass now: free the leases, OVS ports and veths of this node's gone
            pods (see ipamd/reconcile.py); exit 1 when an action failed

Every admin subcommand takes --socket PATH (or --server HOST:PORT with --tls-ca, --tls-cert,
--tls-key: ipamd's mutual-TLS listener) and --timeout-ms. Exit codes: 0 ok, 1 the daemon
said no or could not be reached (one line on stderr, no traceback), 2 bad usage (argparse).
JSON output: `leases` -> [{network, ip, address, gateway, containerID, ifname, state, mac, netns,
podNamespace, podName, podUID, createdUnixMs, conflictMAC, node}]; `nodes` -> [{node, alive,
self, leases, reserved, blocks: [{network, subnet, index, first, last}]}], `pools` -> [{network, subnet,
gateway, used, total, free, quarantined}], and [{network, definitionError}] for a network ipamd
quarantined because its stored definition does not parse; `reconcile` -> {dryRun, graceSeconds,
startedUnixMs, durationMs, actions: [{step, outcome, target, containerID, ifname, network, netns,
reason, detail}]}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from core.errors import CoreError
from core.logsafe import SafeFormatter, escape
from core.spec import DEFAULT_DAEMON_SOCKET

PROG = "ovs-underlay-ipamd"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="ovs-underlay node-local IPAM daemon")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="daemon config file (JSON); flags override it")
    s.add_argument("--socket", help=f"unix socket (default {DEFAULT_DAEMON_SOCKET})")
    s.add_argument("--state-dir", help="directory of the SQLite store (default /var/lib/ovs-underlay)")
    s.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on 127.0.0.1:PORT, mutual TLS (needs the --tls-* files)")
    s.add_argument("--listen", help="also listen on TCP PORT or HOST:PORT (loopback by default); "
                                    "mutual TLS only: needs --tls-cert, --tls-key and --tls-client-ca")
    s.add_argument("--tls-cert", help="TCP listener: the server's certificate (PEM)")
    s.add_argument("--tls-key", help="TCP listener: the server's private key (PEM)")
    s.add_argument("--tls-client-ca",
                   help="TCP listener: the CA (PEM) whose certificates clients must present")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    s.add_argument("--store", choices=("sqlite", "etcd"),
                   help="where leases live: sqlite (one node, default) or etcd (cluster-wide)")
    s.add_argument("--etcd-endpoints", metavar="URL[,URL...]", help="etcd client URLs (http:// or https://)")
    s.add_argument("--etcd-cacert", metavar="FILE", help="CA certificate of the etcd servers")
    s.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd")
    s.add_argument("--etcd-key", metavar="FILE", help="client key for etcd")
    s.add_argument("--etcd-prefix", metavar="PATH", help="key prefix in etcd (default /ovs-underlay)")
    s.add_argument("--node-name", help="this node's name, recorded on every lease (default: the hostname)")
    s.add_argument("--block-size", type=int, help="addresses per block for networks defined first here "
                   "(default 16)")
    s.add_argument("--outage-reserve", type=int, help="addresses per subnet held for serving through an "
                   "etcd outage (default 4; 0 = none)")
    s.add_argument("--ovsdb", help="this node's OVSDB: the probe ports' bridges, where the reconciler looks "
                                   "for our ports (default unix:/run/openvswitch/db.sock)")
    s.add_argument("--reconcile-interval", type=int, metavar="SECONDS",
                   help="seconds between reconcile passes (default 60; 0 = only on demand)")
    s.add_argument("--reconcile-grace", type=int, metavar="SECONDS",
                   help="how long a lease or veth must look gone before it is freed (default 300; 0 allowed)")
    s.add_argument("--probe-netns", help="netns of the probe ports (default ovu-probe-<hash of the socket>)")
    s.add_argument("--probe-candidates", type=int, help="addresses kept pre-probed per subnet (default 8; "
                                                        "0: probe each address when it is handed out)")
    s.add_argument("--no-probe-ports", dest="probe_ports", action="store_false", default=None,
                   help="no probe ports: conflict probes go from the pods' interfaces")

    def admin(name: str, help: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help)
        a.add_argument("--socket", default=DEFAULT_DAEMON_SOCKET, help="ipamd socket")
        a.add_argument("--server", metavar="HOST:PORT",
                       help="ipamd's TCP listener instead of the socket "
                            "(mutual TLS: --tls-ca, --tls-cert, --tls-key)")
        a.add_argument("--tls-ca", help="with --server: the CA (PEM) that signed ipamd's certificate")
        a.add_argument("--tls-cert", help="with --server: this client's certificate (PEM)")
        a.add_argument("--tls-key", help="with --server: this client's private key (PEM)")
        a.add_argument("--tls-server-name", help="with --server: the name to expect in ipamd's certificate "
                                                 "(default: the host of --server)")
        a.add_argument("--timeout-ms", type=int, default=5000, help="deadline of the call")
        return a

    a = admin("pools", "pools and their utilisation")
    a.add_argument("--network", default="")
    a.add_argument("-o", "--output", choices=("table", "json"), default="table")
    a = admin("leases", "leases (live only unless --all)")
    a.add_argument("--network", default="")
    a.add_argument("--all", action="store_true", help="include released (cooling) and quarantined")
    a.add_argument("-o", "--output", choices=("table", "json"), default="table")
    a = admin("release", "release an attachment's addresses")
    a.add_argument("--container", required=True, help="container id")
    a.add_argument("--ifname", required=True)
    a.add_argument("--network", default="", help="only in this network (default: every network)")
    a.add_argument("-o", "--output", choices=("table", "json"), default="table")
    a = admin("gc", "release every lease of a network except the kept attachments")
    a.add_argument("--network", required=True)
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", nargs="+", metavar="CID/IFNAME", help="attachments to keep")
    g.add_argument("--release-all", action="store_true", help="keep nothing")
    a.add_argument("-o", "--output", choices=("table", "json"), default="table")
    admin("health", "exit 0 iff the daemon is SERVING")
    a = admin("nodes", "cluster nodes: alive, leases, outage reserve, blocks (etcd store)")
    a.add_argument("action", nargs="?", choices=("release",), help="release NODE: free a dead node")
    a.add_argument("node", nargs="?", help="the node to release")
    a.add_argument("-o", "--output", choices=("table", "json"), default="table")
    a = admin("reconcile", "free what gone pods left on this node (leases, OVS ports, veths), now")
    a.add_argument("--dry-run", action="store_true", help="report what would be done; change nothing")
    a.add_argument("--grace-seconds", type=int, metavar="N",
                   help="only free what looks gone for N seconds (default: the daemon's --reconcile-grace)")
    a.add_argument("-o", "--output", choices=("table", "json"), default="table")
    a.set_defaults(timeout_ms=60_000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "serve":
        return _serve(args)
    from core.ipamd_client import ClientTls, IpamClient  # grpc only for the admin commands

    tls = None
    if args.server:
        missing = [f"--{k.replace('_', '-')}" for k in ("tls_ca", "tls_cert", "tls_key")
                   if not getattr(args, k)]
        if missing:
            sys.stderr.write(f"{PROG} {args.cmd}: --server needs mutual TLS: give {', '.join(missing)}\n")
            return 2
        tls = ClientTls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                        server_name=args.tls_server_name)
    try:
        with IpamClient(args.server or args.socket, timeout_ms=args.timeout_ms, tls=tls) as client:
            return int(_ADMIN[args.cmd](client, args))
    except CoreError as exc:
        sys.stderr.write(f"{PROG} {args.cmd}: {exc.msg}\n")
        return 1


# ---- serve -----------------------------------------------------------------------------------


class _KeyValueFormatter(SafeFormatter):
    """key=value lines; request fields (network, container id, netns...) are escaped by
    SafeFormatter, so a request cannot forge a line of the daemon's log."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} " \
               f"logger={record.name} {escape(record.getMessage())}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _serve(args: argparse.Namespace) -> int:
    from ipamd.config import DaemonConfigError, load
    from ipamd.server import Daemon, StartupError

    try:
        cfg = load(args.config, {"socket": args.socket, "state_dir": args.state_dir,
                                 "metrics_port": args.metrics_port, "listen": args.listen,
                                 "tls_cert": args.tls_cert, "tls_key": args.tls_key,
                                 "tls_client_ca": args.tls_client_ca,
                                 "log_level": args.log_level, "store": args.store,
                                 "etcd_endpoints": args.etcd_endpoints, "etcd_cacert": args.etcd_cacert,
                                 "etcd_cert": args.etcd_cert, "etcd_key": args.etcd_key,
                                 "etcd_prefix": args.etcd_prefix, "node_name": args.node_name,
                                 "block_size": args.block_size, "outage_reserve": args.outage_reserve,
                                 "ovsdb_socket": args.ovsdb,
                                 "reconcile_interval_seconds": args.reconcile_interval,
                                 "reconcile_grace_seconds": args.reconcile_grace,
                                 "probe_netns": args.probe_netns, "probe_candidates": args.probe_candidates,
                                 "probe_ports": args.probe_ports})
    except DaemonConfigError as exc:
        sys.stderr.write(f"{PROG} serve: {exc}\n")
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    logging.basicConfig(level=cfg.log_level.upper(), handlers=[handler], force=True)
    try:
        daemon = Daemon(cfg)
    except (StartupError, OSError) as exc:
        sys.stderr.write(f"{PROG} serve: {exc}\n")
        return 1
    return daemon.run()


# ---- admin -----------------------------------------------------------------------------------


def _lease_rows(leases: Sequence[Any]) -> list[dict[str, Any]]:
    rows = []
    for lease in leases:
        for ipc in lease.ips:
            rows.append({
                "network": lease.network, "ip": ipc.address.split("/")[0], "address": ipc.address,
                "gateway": ipc.gateway, "containerID": lease.container_id, "ifname": lease.ifname,
                "state": lease.state, "mac": lease.mac, "netns": lease.netns,
                "podNamespace": lease.pod.namespace, "podName": lease.pod.name, "podUID": lease.pod.uid,
                "createdUnixMs": lease.created_unix_ms, "conflictMAC": lease.conflict_mac,
                "node": lease.node,
            })
    return rows


def _print(rows: list[dict[str, Any]], cols: Sequence[str], output: str) -> None:
    if output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        sys.stdout.write("(none)\n")
        return
    table = [[c.upper() for c in cols]] + [[str(r.get(c, "")) or "-" for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        sys.stdout.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


_LEASE_COLS = ("network", "address", "containerID", "ifname", "state", "mac", "podNamespace", "podName",
               "node")


def _pools(client: Any, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for p in client.list_pools(network=args.network):
        if p.definition_error:  # a quarantined network: its stored definition does not parse
            rows.append({"network": p.network, "definitionError": p.definition_error})
            continue
        rows.append({"network": p.network, "subnet": p.subnet, "gateway": p.gateway, "used": int(p.used),
                     "total": int(p.total), "free": int(p.total) - int(p.used) - int(p.quarantined),
                     "quarantined": int(p.quarantined)})
    cols: tuple[str, ...] = ("network", "subnet", "gateway", "used", "total", "free", "quarantined")
    if any("definitionError" in r for r in rows):
        cols = (*cols, "definitionError")
    _print(rows, cols, args.output)
    return 0


def _leases(client: Any, args: argparse.Namespace) -> int:
    rows = _lease_rows(client.list_leases(network=args.network, all=args.all))
    cols = (*_LEASE_COLS, "conflictMAC") if args.all else _LEASE_COLS
    _print(rows, cols, args.output)
    return 0


def _release(client: Any, args: argparse.Namespace) -> int:
    rows = _lease_rows(client.release(network=args.network, container_id=args.container,
                                             ifname=args.ifname))
    _print(rows, _LEASE_COLS, args.output)
    return 0


def _gc(client: Any, args: argparse.Namespace) -> int:
    if not args.network.strip():
        # "" meant "every network" in the daemon once: 980 leases released by one typo.
        sys.stderr.write(f"{PROG} gc: --network must name a network (GC is per network)\n")
        return 2
    keep = []
    for item in args.keep or []:
        cid, sep, ifname = item.rpartition("/")
        if not sep or not cid or not ifname:
            sys.stderr.write(f"{PROG} gc: --keep {item!r}: expected CONTAINERID/IFNAME\n")
            return 2
        keep.append((cid, ifname))
    rows = _lease_rows(client.gc(network=args.network, valid=keep))
    _print(rows, _LEASE_COLS, args.output)
    return 0


def _health(client: Any, args: argparse.Namespace) -> int:
    ok = bool(client.health())
    sys.stdout.write("SERVING\n" if ok else "NOT_SERVING\n")
    return 0 if ok else 1


def _nodes(client: Any, args: argparse.Namespace) -> int:
    if args.action == "release":
        if not args.node:
            sys.stderr.write(f"{PROG} nodes release: name the node to release\n")
            return 2
        r = client.release_node(args.node)
        row = {"node": args.node, "leases": int(r.leases), "reserved": int(r.reserved),
               "blocks": int(r.blocks)}
        _print([row], ("node", "leases", "reserved", "blocks"), args.output)
        return 0
    if args.node:
        sys.stderr.write(f"{PROG} nodes: unexpected {args.node!r} (did you mean `nodes release NODE`?)\n")
        return 2
    resp = client.list_nodes()
    rows = [{"node": n.name, "alive": n.alive, "self": n.name == resp.node, "leases": int(n.leases),
             "reserved": int(n.reserved),
             "blocks": [{"network": b.network, "subnet": b.subnet, "index": int(b.index), "first": b.first,
                         "last": b.last} for b in n.blocks]} for n in resp.nodes]
    if args.output == "json":
        _print(rows, (), "json")
        return 0
    _print([{**r, "alive": "yes" if r["alive"] else "NO", "self": "*" if r["self"] else "",
             "blocks": len(r["blocks"])} for r in rows],
           ("node", "self", "alive", "leases", "reserved", "blocks"), "table")
    blocks = [{"node": r["node"], **b, "range": f"{b['first']}-{b['last']}"}
              for r in rows for b in r["blocks"]]
    if blocks:
        sys.stdout.write("\n")
        _print(blocks, ("node", "network", "subnet", "index", "range"), "table")
    return 0


def _reconcile(client: Any, args: argparse.Namespace) -> int:
    if args.grace_seconds is not None and args.grace_seconds < 0:
        sys.stderr.write(f"{PROG} reconcile: --grace-seconds must be >= 0\n")
        return 2
    resp = client.reconcile(dry_run=args.dry_run, grace_seconds=args.grace_seconds)
    rows = [{"step": a.step, "outcome": a.outcome, "target": a.target, "containerID": a.container_id,
             "ifname": a.ifname, "network": a.network, "netns": a.netns, "reason": a.reason,
             "detail": a.detail} for a in resp.actions]
    if args.output == "json":
        doc = {"dryRun": resp.dry_run, "graceSeconds": resp.grace_seconds,
               "startedUnixMs": resp.started_unix_ms, "durationMs": resp.duration_ms, "actions": rows}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        _print(rows, ("step", "outcome", "target", "containerID", "ifname", "reason"), "table")
    return 1 if any(r["outcome"] == "failed" for r in rows) else 0


_ADMIN = {"pools": _pools, "leases": _leases, "release": _release, "gc": _gc, "health": _health,
          "nodes": _nodes, "reconcile": _reconcile}
