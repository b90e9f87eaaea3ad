"""Logging for one plugin invocation: stderr plus a log file, every record carrying
container_id, netns and ifname.

Why its own module: stdout is protocol only (skel writes it), so everything human-readable goes
through here. skel calls `setup()` once per invocation (the warm path calls it again per
request, so handlers are replaced, not stacked). stdlib and core.logsafe only.

Where the plugin logs is the host's decision, never the network config's: the config's author
(a NetworkAttachmentDefinition) is not trusted with a path that root then creates and appends
to. The host sets it in the plugin's environment (the runtime's, or the DaemonSet's):
- `OVS_UNDERLAY_LOG_FILE`: a file name inside LOG_DIR (/var/log/ovs-underlay), or an absolute
  path inside it; `-` logs to stderr only. Default: LOG_DIR/ovs-underlay.log. Anything outside
  LOG_DIR is refused (one line on stderr; the call logs to stderr only).
- `OVS_UNDERLAY_LOG_LEVEL`: debug|info|warning|error (default info; stderr gets warnings and
  above unless the level is debug).
A config that still carries `logFile`/`logLevel` (Multus users copy them from other plugins) is
accepted; skel logs a warning that they are ignored.

Opening the file (`open_log_file`): every directory from / down is opened with O_NOFOLLOW, so a
symlink anywhere on the path is refused; missing directories below LOG_DIR are created 0750;
the file is opened O_APPEND|O_CREAT|O_NOFOLLOW|O_NONBLOCK (a symlink, a FIFO or a device is
never written to) and must be a regular file with one link (a hard link to another file is
refused). An unusable log file is reported on stderr and otherwise ignored: logging must never
fail a CNI call.

Every line is escaped (core.logsafe.SafeFormatter): a value from the config, the environment or
CNI_ARGS cannot start a line of its own in the log.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Mapping
from typing import IO

from core.logsafe import SafeFormatter, escape

LOGGER_NAME = "ovs-underlay"
LOG_DIR = "/var/log/ovs-underlay"
DEFAULT_LOG_NAME = "ovs-underlay.log"
ENV_FILE = "OVS_UNDERLAY_LOG_FILE"
ENV_LEVEL = "OVS_UNDERLAY_LOG_LEVEL"
_CONTEXT = ("cni_command", "container_id", "netns", "ifname")
_FMT = ("%(asctime)s %(levelname)s pid=%(process)d cmd=%(cni_command)s container_id=%(container_id)s "
        "netns=%(netns)s ifname=%(ifname)s %(name)s: %(message)s")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR}


class LogPathError(OSError):
    """The log file named by the host is unusable (outside LOG_DIR, a symlink, not a file)."""


class _Context(logging.Filter):
    def __init__(self, ctx: Mapping[str, str]) -> None:
        super().__init__()
        self.ctx = dict(ctx)

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.ctx.items():
            setattr(record, k, v)
        return True


class _FileStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on a stream we opened (open_log_file): closing the handler closes the file (the
    warm server sets up logging per request, so a left-open file would leak an fd per call)."""

    def close(self) -> None:
        try:
            self.flush()
            self.stream.close()
        finally:
            super().close()


def log_path(value: str | None, log_dir: str | None = None) -> str | None:
    """The log file for `value` (OVS_UNDERLAY_LOG_FILE), inside `log_dir`; None for "-".
    Raises LogPathError for anything outside it."""
    base = log_dir or LOG_DIR
    if value == "-":
        return None
    value = value or DEFAULT_LOG_NAME
    if "\0" in value:
        raise LogPathError(f"log file {escape(value)!r} contains NUL")
    path = os.path.normpath(value if value.startswith("/") else os.path.join(base, value))
    if not path.startswith(base.rstrip("/") + "/"):
        raise LogPathError(f"log file {escape(value)!r} is outside {base}: refused "
                           f"(give a file name, or a path inside {base})")
    return path


def open_log_file(path: str, log_dir: str | None = None) -> int:
    """Open `path` (inside `log_dir`, see log_path) for appending without following a symlink
    anywhere on the way (see the module docstring). Returns the fd."""
    base = os.path.normpath(log_dir or LOG_DIR)
    parts = [p for p in os.path.dirname(path).split("/") if p]
    depth_of_base = len([p for p in base.split("/") if p])
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if i + 1 < depth_of_base:
                    raise  # only LOG_DIR itself and what is below it are ours to create
                os.mkdir(part, 0o750, dir_fd=fd)
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                raise LogPathError(exc.errno, f"log directory {'/'.join(['', *parts[:i + 1]])}: "
                                              f"{exc.strerror} (a symlink is refused)") from exc
            os.close(fd)
            fd = nfd
            if i + 1 >= depth_of_base and os.fstat(fd).st_mode & stat.S_IWOTH:
                where = "/".join(["", *parts[:i + 1]])
                raise LogPathError(f"log directory {where} is world-writable: refused")
        try:
            out = os.open(os.path.basename(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                          | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o640, dir_fd=fd)
        except OSError as exc:
            raise LogPathError(exc.errno, f"log file {path}: {exc.strerror} (a symlink is refused)") from exc
    finally:
        os.close(fd)
    st = os.fstat(out)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(out)
        raise LogPathError(f"log file {path} is not a regular file with one link: refused")
    return out


def setup(*, command: str, container_id: str, netns: str, ifname: str, env: Mapping[str, str],
          stderr: IO[str] | None = None, log_dir: str | None = None) -> logging.Logger:
    root = logging.getLogger(LOGGER_NAME)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.propagate = False
    level_name = env.get(ENV_LEVEL) or "info"
    lvl = _LEVELS.get(level_name.lower(), logging.INFO)
    root.setLevel(lvl)
    ctx = _Context({"cni_command": command or "-", "container_id": container_id or "-",
                    "netns": netns or "-", "ifname": ifname or "-"})
    fmt = SafeFormatter(_FMT, fields=_CONTEXT)
    err = logging.StreamHandler(stderr or sys.stderr)
    err.setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.WARNING)
    err.addFilter(ctx)
    err.setFormatter(fmt)
    root.addHandler(err)
    try:
        path = log_path(env.get(ENV_FILE), log_dir)
        stream = None if path is None else os.fdopen(open_log_file(path, log_dir), "a", encoding="utf-8",
                                                     errors="backslashreplace")
    except OSError as exc:
        err.stream.write(f"ovs-underlay: not logging to a file: {escape(str(exc.strerror or exc))}\n")
        stream = None
    if stream is not None:
        fh = _FileStreamHandler(stream)
        fh.setLevel(lvl)
        fh.addFilter(ctx)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if level_name.lower() not in _LEVELS:
        root.warning("%s=%r is not one of debug, info, warning, error: using info", ENV_LEVEL, level_name)
    return root


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")
