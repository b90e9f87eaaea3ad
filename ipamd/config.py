"""The daemon's own configuration: defaults, an optional JSON file, then command-line flags.

Why one frozen dataclass: `serve` with no config at all must work on the defaults, flags must
override the file, and an unknown or mistyped key in the file must stop the daemon with a message
naming it (never silently ignored).
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, fields, replace
from typing import Any

from core.names import DEFAULT_OVSDB, is_ovsdb_remote
from core.spec import DEFAULT_DAEMON_SOCKET

DEFAULT_STATE_DIR = "/var/lib/ovs-underlay"
DEFAULT_ETCD_PREFIX = "/ovs-underlay"
NODE_NAME_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,251}[a-zA-Z0-9])?\Z")  # a Kubernetes node name
_PREFIX_RE = re.compile(r"^(/[a-zA-Z0-9_.-]+)+\Z")
NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


class DaemonConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = DEFAULT_DAEMON_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    db_file: str = "ipam.db"
    listen: str = ""  # "" = no TCP; "PORT" or "HOST:PORT" (loopback when HOST is omitted)
    # TCP is mutual TLS only: the server's certificate and key, and the CA that signs clients.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    metrics_port: int = 0  # 0 = no metrics endpoint
    metrics_host: str = "127.0.0.1"
    cooldown_seconds: int = 30  # default cool-down of released addresses (pool cooldownSeconds wins)
    quarantine_seconds: int = 600  # how long an address that answered on the wire is held back
    gateway_cache_seconds: float = 10.0  # positive gateway answers are reused this long
    # Probe ports (issue 14): one OVS internal port per L2 segment, in a netns of ipamd's, that
    # keeps candidates pre-probed, watches for conflicts and keeps the gateways' answers.
    probe_ports: bool = True
    probe_candidates: int = 8  # addresses kept pre-probed per network and subnet entry
    probe_fresh_seconds: float = 10.0  # a pre-probed address is trusted this long after its probe
    probe_netns: str = ""  # "" = ovu-probe-<8 hex of sha256(socket path)>
    # This node's Open vSwitch: the bridges the probe ports join, where the reconciler looks for our ports.
    ovsdb_socket: str = DEFAULT_OVSDB
    workers: int = 32
    shutdown_grace_seconds: float = 10.0
    health_interval_seconds: float = 5.0  # store check; a probe write only while writes fail
    log_level: str = "info"
    # Where leases live: "sqlite" (one node, embedded) or "etcd" (cluster-wide; issue 10).
    store: str = "sqlite"
    etcd_endpoints: str = ""  # comma-separated http(s)://HOST:PORT
    etcd_cacert: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_prefix: str = DEFAULT_ETCD_PREFIX
    node_name: str = ""  # "" = the hostname; recorded on every lease
    block_size: int = 16  # addresses per block, for networks this node defines first in etcd
    outage_reserve: int = 4  # addresses per subnet entry held in etcd for serving during an outage

    def endpoints(self) -> tuple[str, ...]:
        return tuple(e.strip() for e in self.etcd_endpoints.split(",") if e.strip())
    reconcile_interval_seconds: int = 60  # 0 = no periodic pass (`reconcile` on demand still works)
    reconcile_grace_seconds: int = 300  # a lease/veth must look gone this long before it is freed


# JSON key (camelCase, like the CNI config) -> field
_KEYS = {
    "socket": "socket", "stateDir": "state_dir", "dbFile": "db_file", "listen": "listen",
    "metricsPort": "metrics_port", "metricsHost": "metrics_host", "cooldownSeconds": "cooldown_seconds",
    "quarantineSeconds": "quarantine_seconds", "gatewayCacheSeconds": "gateway_cache_seconds",
    "workers": "workers", "shutdownGraceSeconds": "shutdown_grace_seconds", "logLevel": "log_level",
    "store": "store", "etcdEndpoints": "etcd_endpoints", "etcdCACert": "etcd_cacert",
    "etcdCert": "etcd_cert", "etcdKey": "etcd_key", "etcdPrefix": "etcd_prefix", "nodeName": "node_name",
    "blockSize": "block_size", "outageReserve": "outage_reserve",
    "healthIntervalSeconds": "health_interval_seconds",
    "tlsCert": "tls_cert", "tlsKey": "tls_key", "tlsClientCa": "tls_client_ca",
    "reconcileIntervalSeconds": "reconcile_interval_seconds",
    "reconcileGraceSeconds": "reconcile_grace_seconds",
    "probePorts": "probe_ports", "probeCandidates": "probe_candidates",
    "probeFreshSeconds": "probe_fresh_seconds", "probeNetns": "probe_netns", "ovsdbSocket": "ovsdb_socket",
}
_TYPES = {f.name: f.type for f in fields(DaemonConfig)}


def load(path: str | None, overrides: dict[str, Any]) -> DaemonConfig:
    """Defaults <- file (if given) <- overrides (flags that were set; None values ignored)."""
    cfg = DaemonConfig()
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                raw = json.load(fh)
        except OSError as exc:
            raise DaemonConfigError(f"config {path}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise DaemonConfigError(f"config {path}: invalid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise DaemonConfigError(f"config {path}: expected a JSON object")
        vals: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in _KEYS:
                raise DaemonConfigError(f"config {path}: unknown key {key!r} (known: {', '.join(_KEYS)})")
            vals[_KEYS[key]] = _check(path, key, _KEYS[key], value)
        cfg = replace(cfg, **vals)
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    # Every number must be >= 0 whichever way it came (the file is checked above, flags here).
    keys = {name: key for key, name in _KEYS.items()}
    for name, want in _TYPES.items():
        v = getattr(cfg, name)
        if want in ("int", "float") and v < 0:
            raise DaemonConfigError(f"{keys.get(name, name)} must be >= 0, got {v}")
    if not cfg.socket.startswith("/"):
        raise DaemonConfigError(f"socket {cfg.socket!r} must be an absolute path")
    tls = {"tlsCert": cfg.tls_cert, "tlsKey": cfg.tls_key, "tlsClientCa": cfg.tls_client_ca}
    if cfg.listen and not all(tls.values()):
        missing = ", ".join(k for k, v in tls.items() if not v)
        raise DaemonConfigError(
            f"listen {cfg.listen!r} needs mutual TLS: set {missing} (--tls-cert, --tls-key, "
            "--tls-client-ca); the TCP listener serves only clients whose certificate the client CA "
            "signed, the unix socket stays root-only")
    if cfg.metrics_port and not all(tls.values()):
        missing = ", ".join(k for k, v in tls.items() if not v)
        raise DaemonConfigError(
            f"metricsPort {cfg.metrics_port} needs mutual TLS: set {missing} (--tls-cert, --tls-key, "
            "--tls-client-ca); nothing listens on TCP without it (scrape with a client certificate "
            "the client CA signed)")
    for key, value in tls.items():
        if value and not value.startswith("/"):
            raise DaemonConfigError(f"{key} {value!r} must be an absolute path")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise DaemonConfigError(f"logLevel {cfg.log_level!r}: expected debug, info, warning or error")
    return _check_probes(_check_cluster(cfg))


def _check_cluster(cfg: DaemonConfig) -> DaemonConfig:
    if not cfg.node_name:
        cfg = replace(cfg, node_name=socket.gethostname().split(".")[0])
    if not NODE_NAME_RE.match(cfg.node_name):
        raise DaemonConfigError(f"nodeName {cfg.node_name!r}: expected a node name (letters, digits, "
                                "'-', '_', '.'; at most 253 characters)")
    if cfg.store not in ("sqlite", "etcd"):
        raise DaemonConfigError(f"store {cfg.store!r}: expected sqlite or etcd")
    prefix = cfg.etcd_prefix.rstrip("/")
    if not _PREFIX_RE.match(prefix):
        raise DaemonConfigError(f"etcdPrefix {cfg.etcd_prefix!r}: expected an absolute key path like "
                                f"{DEFAULT_ETCD_PREFIX}")
    cfg = replace(cfg, etcd_prefix=prefix)
    if not 1 <= cfg.block_size <= 65536:
        raise DaemonConfigError(f"blockSize {cfg.block_size}: expected 1..65536")
    if cfg.outage_reserve > 256:
        raise DaemonConfigError(f"outageReserve {cfg.outage_reserve}: expected 0..256")
    if cfg.store == "etcd":
        from core.etcd import EtcdConfig  # grpc stubs only when they are used

        try:
            EtcdConfig(cfg.endpoints(), cfg.etcd_cacert, cfg.etcd_cert, cfg.etcd_key).validate()
        except ValueError as exc:
            raise DaemonConfigError(f"store etcd: {exc}") from exc
    elif cfg.etcd_endpoints:
        raise DaemonConfigError("etcdEndpoints given but store is sqlite: add --store etcd")
    return cfg


def _check_probes(cfg: DaemonConfig) -> DaemonConfig:
    if not is_ovsdb_remote(cfg.ovsdb_socket):
        raise DaemonConfigError(f"ovsdbSocket {cfg.ovsdb_socket!r}: expected unix:PATH, tcp:IP:PORT or "
                                "ssl:IP:PORT")
    if cfg.probe_netns and not NETNS_NAME_RE.match(cfg.probe_netns):
        raise DaemonConfigError(f"probeNetns {cfg.probe_netns!r}: expected a name of letters, digits, "
                                "- and _ (at most 64)")
    if cfg.probe_fresh_seconds <= 0 or cfg.probe_candidates > 256:
        raise DaemonConfigError("probeFreshSeconds must be > 0 and probeCandidates at most 256")
    return cfg


def _check(path: str, key: str, name: str, value: Any) -> Any:
    want = _TYPES[name]
    ok = (isinstance(value, str) if want == "str"
          else isinstance(value, bool) if want == "bool"
          else isinstance(value, int) and not isinstance(value, bool) if want == "int"
          else isinstance(value, int | float) and not isinstance(value, bool))
    if not ok or (want not in ("str", "bool") and value < 0):
        raise DaemonConfigError(f"config {path}: {key} must be a non-negative {want}, got {value!r}")
    return value


def listen_address(listen: str) -> str:
    """'9090' -> '127.0.0.1:9090' (loopback unless a host is given)."""
    return listen if ":" in listen else f"127.0.0.1:{listen}"
