"""The daemon's lifecycle: socket, store, gRPC server, health, signals.

Why these steps, in this order:
- one daemon per socket: an flock on `<socket>.lock`, then a health call on an existing socket
  file (refuse if someone answers), then the stale file is removed;
- the socket is created under umask 0177 and chmod'ed 0600: only root may ask for addresses; so
  is the call socket next to it (`<socket>.calls`, ipamd/calls_server.py: the plugins' hot calls
  without gRPC); the optional TCP listener (`listen`) is mutual TLS only: a client must present a
  certificate signed by the configured client CA (the same whole API: nothing is served without
  it);
- every stored network's occupancy is built before the socket is bound (a /16 with 60,000 leases
  takes about a second): no request pays for it; then what survived start-up is frozen
  (gc.freeze) so that a full cyclic-GC collection during an RPC no longer scans it (measured:
  7 ms -> ~0 at 60,000 leases);
- health (`grpc.health.v1`) is SERVING only while the store answers reads and writes are
  durable (ipamd/readiness.py: a failed commit flips it at once; see there why health writes
  only while writes fail); with the etcd store, also only while this node can allocate at all
  (online, or offline with addresses of its own left: an etcd outage alone is not NOT_SERVING);
- with the etcd store: the node's heartbeat, the watch and the outage recovery run on the store's
  threads, and the outage reserve is topped up every RESERVE_INTERVAL_S;
- the reconciler (ipamd/reconcile.py) makes its first pass once the socket serves, then one every
  `reconcile_interval_seconds` on its own thread; `Reconcile` RPCs make one on demand;
- probe ports (issue 14, ipamd/segments.py) start after the store is warm; the segments in use
  before are restored in the background (their ports made or reused), so serving never waits
  for OVS;
- SIGTERM/SIGINT: NOT_SERVING, stop accepting, let in-flight RPCs finish (grace), remove the
  probe ports and their netns, close the store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import logging
import os
import signal
import ssl
import stat
import threading
from concurrent import futures
from http.server import ThreadingHTTPServer
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core import calls
from core._proto import ipam_pb2_grpc
from core.ipamd_client import IpamClient
from core.netlink import Netlink
from core.vswitch import Vswitch
from ipamd.allocator import Allocator
from ipamd.calls_server import CallServer
from ipamd.config import DaemonConfig, listen_address
from ipamd.errors import CommitFailed
from ipamd.metrics import Labels, Metrics, serve_metrics
from ipamd.probe import Prober
from ipamd.probe_port import ProbePorts, default_netns_name
from ipamd.readiness import Readiness
from ipamd.reconcile import Links, Periodic, Ports, Reconciler
from ipamd.segments import SegmentProbes
from ipamd.service import IpamService
from ipamd.store import Cluster, Store
from ipamd.store_sqlite import SqliteStore

log = logging.getLogger("ipamd.server")
SERVICE_NAME = "ovs_underlay.ipam.v1.Ipam"
RESERVE_INTERVAL_S = 2.0


def open_store(cfg: DaemonConfig) -> tuple[Store, Cluster | None]:
    """The store the config names: SQLite in the state dir, or etcd (with its journal there)."""
    if cfg.store != "etcd":
        return SqliteStore(os.path.join(cfg.state_dir, cfg.db_file), node=cfg.node_name), None
    from core.etcd import EtcdClient, EtcdConfig
    from ipamd.store_etcd import EtcdStore

    client = EtcdClient(EtcdConfig(cfg.endpoints(), cfg.etcd_cacert, cfg.etcd_cert, cfg.etcd_key))
    try:
        store = EtcdStore(client, prefix=cfg.etcd_prefix, node=cfg.node_name,
                          journal_path=os.path.join(cfg.state_dir, "etcd-journal.db"),
                          block_size=cfg.block_size, outage_reserve=cfg.outage_reserve)
    except BaseException:
        client.close()
        raise
    return store, store


class StartupError(RuntimeError):
    """The daemon cannot start; the message says why (printed without a traceback)."""


def _take_socket(path: str) -> int:
    """Make sure nobody else serves on `path`; returns the lock fd (held for our lifetime)."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(f"another ipamd holds {path}.lock: refusing to start") from exc
        raise
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return lock_fd
    if not stat.S_ISSOCK(st.st_mode):
        os.close(lock_fd)
        raise StartupError(f"{path} exists and is not a socket: refusing to replace it")
    with IpamClient(path, timeout_ms=1000) as c:
        answering = True
        try:
            c.health()
        except Exception:  # Unavailable is the expected case: a stale socket
            answering = False
    if answering:
        os.close(lock_fd)
        raise StartupError(f"another ipamd answers on {path}: refusing to start")
    log.info("socket=%s msg=%s", path, "removing stale socket file left by a previous daemon")
    os.unlink(path)
    return lock_fd


class Daemon:
    def __init__(self, cfg: DaemonConfig, store: Store | None = None) -> None:
        self.cfg = cfg
        self._stop = threading.Event()
        self._lock_fd = _take_socket(cfg.socket)
        self.cluster: Cluster | None = None
        try:
            if store is None:
                store, self.cluster = open_store(cfg)
            self.store: Store = store
            if self.cluster is not None:
                start = getattr(self.cluster, "start", None)
                if start is not None:
                    start()
        except Exception as exc:
            os.close(self._lock_fd)
            where = f"etcd at {cfg.etcd_endpoints}" if cfg.store == "etcd" else cfg.state_dir
            raise StartupError(f"cannot open the store ({where}): {exc}") from exc
        self.metrics = Metrics()
        self.prober = Prober(self.metrics, cache_ttl_s=cfg.gateway_cache_seconds)
        self.allocator = Allocator(self.store, default_cooldown_s=cfg.cooldown_seconds,
                                   quarantine_s=cfg.quarantine_seconds, prober=self.prober,
                                   node=cfg.node_name, cluster=self.cluster)
        self.readiness = Readiness(self._set_health, read=self._read_check, probe=self._probe_write)
        self.allocator.observe_commits(self.readiness.commit_result)
        self.segments: SegmentProbes | None = None
        if cfg.probe_ports:
            ports = ProbePorts(cfg.ovsdb_socket, cfg.probe_netns or default_netns_name(cfg.socket))
            self.segments = SegmentProbes(
                ports, self.allocator, self.metrics, candidates=cfg.probe_candidates,
                fresh_s=cfg.probe_fresh_seconds, gateway_s=cfg.gateway_cache_seconds, state_dir=cfg.state_dir)
            self.allocator.segments = self.segments
            self.metrics.add_gauges(self.segments.gauges)
            self.metrics.describe("ipamd_conflicts_total", "counter",
                                  "Addresses found in use by another host: source=probe (a candidate's "
                                  "probe was answered), watch (the probe port heard it claimed)")
            self.metrics.describe("ipamd_preprobed_total", "counter",
                                  "Dynamic addresses handed out with a fresh pre-probed candidate "
                                  "(result=fresh) or without one (cold: probed inline)")
        self.metrics.add_gauges(self._pool_gauges)
        self.metrics.describe("ipamd_networks_quarantined", "gauge",
                              "Networks whose stored definition does not parse (allocations refused)")
        self.reconciler = Reconciler(self.allocator, self.metrics, grace_s=cfg.reconcile_grace_seconds,
                                     ipamd_socket=cfg.socket, tools=self._node_tools)
        self._periodic = Periodic(self.reconciler, cfg.reconcile_interval_seconds, self._stop)
        self.metrics.describe("ipamd_commit_batches_total", "counter",
                              "Store transactions committed or failed (group commits: one fsync each)")
        self.metrics.describe("ipamd_commit_writes_total", "counter",
                              "Requests' store writes made durable or failed in those transactions")
        self.metrics.describe("ipamd_etcd_requests_total", "counter",
                              "etcd requests by kind (txn: one per group commit), attempts included")
        self.metrics.describe("ipamd_etcd_online", "gauge", "1 while etcd answers, 0 during an outage")
        self.metrics.describe("ipamd_etcd_replayed_total", "counter",
                              "Writes made during etcd outages and replayed when it came back")
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers,
                                                             thread_name_prefix="rpc"))
        self.service = IpamService(self.allocator, self.prober, self.metrics, self.reconciler)
        ipam_pb2_grpc.add_IpamServicer_to_server(self.service, self.server)  # type: ignore[no-untyped-call]
        self.calls: CallServer | None = None
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._metrics_srv: ThreadingHTTPServer | None = None

    def _read_check(self) -> None:
        """The store answers; with etcd, this node can allocate (online, or offline with an
        address of its own left): an etcd outage alone is not NOT_SERVING."""
        self.store.networks()
        if self.cluster is not None and not self.cluster.serving():
            raise RuntimeError("etcd is unreachable and this node has no address of its own left")

    def _probe_write(self) -> None:
        with contextlib.suppress(CommitFailed):  # the failure reached readiness already
            self.allocator.probe_write()

    def _node_tools(self) -> tuple[Ports, Links]:
        """A fresh OVSDB connection and netlink socket per reconcile pass, made on the pass's
        thread and closed with it (nothing the pass holds outlives it)."""
        return Vswitch(self.cfg.ovsdb_socket), Netlink()

    def _pool_gauges(self) -> list[tuple[str, Labels, float]]:
        out: list[tuple[str, Labels, float]] = []
        for u in self.allocator.usage():
            labels = (("network", u.network), ("subnet", str(u.subnet)))
            out += [("ipamd_pool_used", labels, u.used), ("ipamd_pool_total", labels, u.total),
                    ("ipamd_pool_quarantined", labels, u.quarantined),
                    ("ipamd_pool_utilisation", labels, u.used / u.total if u.total else 1.0)]
        quarantined = self.allocator.quarantined()
        out += [("ipamd_network_quarantined", (("network", net),), 1.0) for net in sorted(quarantined)]
        out.append(("ipamd_networks_quarantined", (), float(len(quarantined))))
        out += [("ipamd_commit_batches_total", (), self.allocator.commits.batches),
                ("ipamd_commit_writes_total", (), self.allocator.commits.writes)]
        if self.cluster is not None:
            counts: dict[str, int] = getattr(self.store, "counts", dict)()
            out += [("ipamd_etcd_requests_total", (("kind", kind),), n) for kind, n in sorted(counts.items())]
            out += [("ipamd_etcd_online", (), 1.0 if self.cluster.online else 0.0),
                    ("ipamd_etcd_replayed_total", (), self.cluster.replayed)]
        return out

    def _bind(self) -> None:
        old = os.umask(0o177)
        try:
            self.server.add_insecure_port(f"unix://{self.cfg.socket}")
        finally:
            os.umask(old)
        if self.cfg.listen:
            addr = listen_address(self.cfg.listen)
            port = self.server.add_secure_port(addr, self._tls_credentials())
            if port == 0:
                raise StartupError(f"cannot listen on {addr}")
            log.info("listen=%s port=%d msg=%s", addr, port,
                     "TCP listener with mutual TLS: clients need a certificate signed by the client CA")

    def _tls_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS for the TCP listener (config.load refuses --listen without it): the
        server proves itself with its certificate, and a client is served only with a
        certificate the client CA signed (require_client_auth). The whole API stays behind it,
        as behind the root-only unix socket."""
        files = {"tlsCert": self.cfg.tls_cert, "tlsKey": self.cfg.tls_key,
                 "tlsClientCa": self.cfg.tls_client_ca}
        data: dict[str, bytes] = {}
        for key, path in files.items():
            try:
                with open(path, "rb") as fh:
                    data[key] = fh.read()
                    mode = os.fstat(fh.fileno()).st_mode
            except OSError as exc:
                raise StartupError(f"{key} {path}: {exc.strerror}") from exc
            if key == "tlsKey" and mode & 0o077:
                log.warning("file=%s mode=%o msg=%s", path, stat.S_IMODE(mode),
                            "the TLS key is readable by other users than its owner")
        try:
            return grpc.ssl_server_credentials([(data["tlsKey"], data["tlsCert"])],
                                               root_certificates=data["tlsClientCa"],
                                               require_client_auth=True)
        except Exception as exc:  # grpc raises plain RuntimeError/ValueError on malformed PEM
            raise StartupError(f"TLS files do not load: {exc}") from exc

    def _metrics_tls(self) -> ssl.SSLContext:
        """Mutual TLS for the metrics endpoint, from the same files as the TCP listener."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
            ctx.load_verify_locations(self.cfg.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"metrics TLS files do not load: {exc}") from exc
        return ctx

    def _set_health(self, serving: bool, why: str = "") -> None:
        if self._stop.is_set():
            return  # shutting down: graceful shutdown owns the status now
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)
        log.info("health=%s reason=%s", "SERVING" if serving else "NOT_SERVING", why or "-")

    def _watch_store(self) -> None:
        """Readiness (ipamd/readiness.py): the store answers, writes are durable, and with the
        etcd store this node can allocate at all."""
        while not self._stop.wait(self.cfg.health_interval_seconds):
            self.readiness.check()

    def _keep_reserve(self) -> None:
        """The outage reserve follows the pools (store.Cluster.reserve_target)."""
        while not self._stop.wait(RESERVE_INTERVAL_S):
            try:
                self.allocator.maintain_reserve()
            except Exception as exc:  # etcd down, a conflict: next round
                log.info("error=%s msg=%s", exc, "outage reserve not updated this round")

    def run(self) -> int:
        nets = self.allocator.warm()
        gc.collect()
        gc.freeze()
        log.info("networks=%d msg=%s", nets, "occupancy built from the store")
        for net, why in sorted(self.allocator.quarantined().items()):
            log.error("network=%s error=%s msg=%s", net, why,
                      "network QUARANTINED: its stored definition does not parse; its allocations are "
                      "refused until it is repaired, every other network is served")
        if self.segments is not None:
            self.segments.start()
        self._bind()
        self.calls = CallServer(self.service, calls.socket_path(self.cfg.socket), self.cfg.workers)
        self.server.start()
        os.chmod(self.cfg.socket, 0o600)
        self.calls.start()
        if self.cfg.metrics_port:
            self._metrics_srv = serve_metrics(self.metrics, self.cfg.metrics_port, self.cfg.metrics_host,
                                              self._metrics_tls())
        self.readiness.start()
        threading.Thread(target=self._watch_store, name="health", daemon=True).start()
        if self.cluster is not None:
            threading.Thread(target=self._keep_reserve, name="outage-reserve", daemon=True).start()
        if self.cfg.reconcile_interval_seconds > 0:
            threading.Thread(target=self._periodic.loop, name="reconcile", daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("socket=%s state_dir=%s store=%s node=%s metrics_port=%s reconcile_interval_s=%d "
                 "reconcile_grace_s=%d ovsdb=%s msg=%s", self.cfg.socket, self.cfg.state_dir, self.cfg.store,
                 self.cfg.node_name, self.cfg.metrics_port or "-", self.cfg.reconcile_interval_seconds,
                 self.cfg.reconcile_grace_seconds, self.cfg.ovsdb_socket,
                 "ipamd serving")
        self._stop.wait()
        self.shutdown()
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal=%s msg=%s", signal.Signals(signum).name, "shutting down")
        self._stop.set()

    def shutdown(self) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        if self.calls is not None:
            self.calls.stop()
        self.server.stop(self.cfg.shutdown_grace_seconds).wait()
        if self._metrics_srv is not None:
            self._metrics_srv.shutdown()
        if self.segments is not None:
            self.segments.stop(remove_ports=True)
        self.store.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.socket)
        os.close(self._lock_fd)
        log.info("msg=%s", "ipamd stopped; store closed")
