"""The daemon's own configuration: defaults, an optional JSON file, then command-line flags.

Why one frozen dataclass: `serve` with no config at all must work on the defaults, flags must
override the file, and an unknown or mistyped key in the file must stop the daemon with a message
naming it (never silently ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any

from core.spec import DEFAULT_DAEMON_SOCKET

DEFAULT_STATE_DIR = "/var/lib/ovs-underlay"


class DaemonConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = DEFAULT_DAEMON_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    db_file: str = "ipam.db"
    listen: str = ""  # "" = no TCP; "PORT" or "HOST:PORT" (loopback when HOST is omitted)
    metrics_port: int = 0  # 0 = no metrics endpoint
    metrics_host: str = "127.0.0.1"
    cooldown_seconds: int = 30  # default cool-down of released addresses (pool cooldownSeconds wins)
    quarantine_seconds: int = 600  # how long an address that answered on the wire is held back
    gateway_cache_seconds: float = 10.0  # positive gateway answers are reused this long
    workers: int = 32
    shutdown_grace_seconds: float = 10.0
    log_level: str = "info"


# JSON key (camelCase, like the CNI config) -> field
_KEYS = {
    "socket": "socket", "stateDir": "state_dir", "dbFile": "db_file", "listen": "listen",
    "metricsPort": "metrics_port", "metricsHost": "metrics_host", "cooldownSeconds": "cooldown_seconds",
    "quarantineSeconds": "quarantine_seconds", "gatewayCacheSeconds": "gateway_cache_seconds",
    "workers": "workers", "shutdownGraceSeconds": "shutdown_grace_seconds", "logLevel": "log_level",
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
    if not cfg.socket.startswith("/"):
        raise DaemonConfigError(f"socket {cfg.socket!r} must be an absolute path")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise DaemonConfigError(f"logLevel {cfg.log_level!r}: expected debug, info, warning or error")
    return cfg


def _check(path: str, key: str, name: str, value: Any) -> Any:
    want = _TYPES[name]
    ok = (isinstance(value, str) if want == "str"
          else isinstance(value, int) and not isinstance(value, bool) if want == "int"
          else isinstance(value, int | float) and not isinstance(value, bool))
    if not ok or (want != "str" and value < 0):
        raise DaemonConfigError(f"config {path}: {key} must be a non-negative {want}, got {value!r}")
    return value


def listen_address(listen: str) -> str:
    """'9090' -> '127.0.0.1:9090' (loopback unless a host is given)."""
    return listen if ":" in listen else f"127.0.0.1:{listen}"
