"""Logging for one plugin invocation: stderr plus a log file, every record carrying
container_id, netns and ifname.

Why its own module: stdout is protocol only (skel writes it), so everything human-readable goes
through here. skel calls `setup()` once per invocation (the warm path calls it again per
request, so handlers are replaced, not stacked). stdlib only.

Log file: `OVS_UNDERLAY_LOG_FILE` (env) > `logFile` (config) > /var/log/ovs-underlay/ovs-underlay.log.
An unwritable log file is reported on stderr and otherwise ignored: logging must never fail a
CNI call. `logLevel`: debug|info|warning|error (default info; stderr gets warnings and above
unless the level is debug).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import IO

LOGGER_NAME = "ovs-underlay"
DEFAULT_LOG_FILE = "/var/log/ovs-underlay/ovs-underlay.log"
_FMT = ("%(asctime)s %(levelname)s pid=%(process)d cmd=%(cni_command)s container_id=%(container_id)s "
        "netns=%(netns)s ifname=%(ifname)s %(name)s: %(message)s")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR}


class _Context(logging.Filter):
    def __init__(self, ctx: Mapping[str, str]) -> None:
        super().__init__()
        self.ctx = dict(ctx)

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.ctx.items():
            setattr(record, k, v)
        return True


def setup(*, command: str, container_id: str, netns: str, ifname: str, log_file: str | None,
          level: str | None, env: Mapping[str, str], stderr: IO[str] | None = None) -> logging.Logger:
    root = logging.getLogger(LOGGER_NAME)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.propagate = False
    lvl = _LEVELS.get((level or "info").lower(), logging.INFO)
    root.setLevel(lvl)
    ctx = _Context({"cni_command": command or "-", "container_id": container_id or "-",
                    "netns": netns or "-", "ifname": ifname or "-"})
    fmt = logging.Formatter(_FMT)
    err = logging.StreamHandler(stderr or sys.stderr)
    err.setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.WARNING)
    err.addFilter(ctx)
    err.setFormatter(fmt)
    root.addHandler(err)
    path = env.get("OVS_UNDERLAY_LOG_FILE") or log_file or DEFAULT_LOG_FILE
    if path and path != "-":
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fh = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:
            err.stream.write(f"ovs-underlay: cannot open log file {path}: {exc}\n")
        else:
            fh.setLevel(lvl)
            fh.addFilter(ctx)
            fh.setFormatter(fmt)
            root.addHandler(fh)
    return root


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")
