"""The CNI protocol edge: environment + stdin in, result or error JSON + exit code out.

Why: this is the ONLY code that writes to stdout and picks the exit code (cni `skel.go`
dispatcher; kuryr `CNIRunner.run(env, fin, fout)`). Verbs are plain callables
`verb(args: CmdArgs) -> Result | None`; they never print. Both the main plugin and the IPAM
plugin call `main(verbs, env, stdin, stdout)` with their own `Verbs`, and the warm path can call
it in-process any number of times.

Order of checks (nothing has a side effect before all of them passed):
1. CNI_COMMAND (code 4 when missing/unknown); VERSION answers at once.
2. stdin: JSON object (code 6), cniVersion supported (code 1; missing = "0.1.0" = unsupported),
   verb allowed by that version: CHECK >= 0.4.0, STATUS/GC >= 1.1.0 (code 1).
3. env: CNI_CONTAINERID pattern and CNI_IFNAME rules (ADD/DEL/CHECK, code 4), CNI_NETNS
   (ADD/CHECK: required and absolute (4), a network namespace and not our own (8); DEL:
   optional and never needed, so a bad one is logged and dropped; `CNI_NETNS_OVERRIDE` skips
   the own-netns check as in Go skel).
4. the verb. A CniError becomes its error JSON, and so does a neutral core error (core.errors)
   once cni.errors.as_cni has mapped it to its code; any other exception becomes code 999 with a
   one-line message on stdout and the traceback in the log (never on stdout).

Start-up cost: at module level only the stdlib, core.errors/core.names and cni.errors/
cni.version/cni.log are imported;
verbs given as "module:function" strings are imported on first use, so VERSION imports none of
ovs/grpc (nor netaddr).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from cni import log
from cni.errors import CniError, Code, as_cni
from cni.version import LATEST, SUPPORTED_VERSIONS, at_least
from core.errors import CoreError
from core.names import container_id_problem, ifname_problem

if TYPE_CHECKING:
    from cni.types import CmdArgs, Result

VerbFn = Callable[["CmdArgs"], "Result | None"]
VerbRef = VerbFn | str  # a callable, or "package.module:function" imported lazily

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
_MIN_VERSION = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}


@dataclass(frozen=True)
class Verbs:
    """The callables of one plugin. `None` for a verb means "succeeds doing nothing"."""

    add: VerbRef
    delete: VerbRef
    check: VerbRef | None = None
    status: VerbRef | None = None
    gc: VerbRef | None = None
    supported_versions: tuple[str, ...] = SUPPORTED_VERSIONS
    about: str = ""

    def resolve(self, command: str) -> VerbFn | None:
        ref = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check, "STATUS": self.status,
               "GC": self.gc}[command]
        if ref is None or callable(ref):
            return ref
        module, _, name = ref.partition(":")
        fn = getattr(importlib.import_module(module), name)
        if not callable(fn):
            raise TypeError(f"verb {ref} is not callable")
        return fn  # type: ignore[no-any-return]


def main(verbs: Verbs, env: Mapping[str, str], stdin: IO[bytes], stdout: IO[str],
         stderr: IO[str] | None = None) -> int:
    """Run one CNI invocation. Returns the exit code; writes at most one JSON document."""
    version = LATEST
    command = env.get("CNI_COMMAND", "")
    logger = logging.getLogger(log.LOGGER_NAME)
    try:
        if command not in COMMANDS:
            _setup_log(command, env, {}, stderr)
            raise CniError(Code.INVALID_ENV, f"CNI_COMMAND {command!r} is missing or unknown",
                           f"expected one of {', '.join(COMMANDS)}")
        if command == "VERSION":
            _write(stdout, {"cniVersion": LATEST, "supportedVersions": list(verbs.supported_versions)})
            return 0
        data = stdin.read()
        config = _decode(data)
        _setup_log(command, env, config, stderr)
        version = _check_version(config, command, verbs.supported_versions)
        args = _cmd_args(command, env, data, config, version)
        fn = verbs.resolve(command)
        result = fn(args) if fn is not None else None
        if command == "ADD":
            if result is None:
                raise CniError(Code.INTERNAL, "ADD produced no result")
            _write(stdout, result.to_json(version))
        logger.info("%s succeeded", command)
        return 0
    except (CniError, CoreError) as exc:
        exc = as_cni(exc)  # the core's neutral errors map to CNI codes here, at the edge
        if not logger.handlers:
            _setup_log(command, env, {}, stderr)
        logger.error("%s failed: code %d: %s%s", command or "-", exc.code, exc.msg,
                     f" ({exc.details})" if exc.details else "")
        _write(stdout, exc.to_json(version if version in SUPPORTED_VERSIONS else LATEST))
        return 1
    except Exception as exc:  # the last resort: never a traceback on stdout
        if not logger.handlers:
            _setup_log(command, env, {}, stderr)
        logger.exception("%s failed with an internal error", command or "-")
        err = CniError(Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        _write(stdout, err.to_json(version if version in SUPPORTED_VERSIONS else LATEST))
        return 1


def _write(stdout: IO[str], doc: Mapping[str, Any]) -> None:
    stdout.write(json.dumps(doc, indent=None, separators=(",", ":")) + "\n")
    stdout.flush()


def _setup_log(command: str, env: Mapping[str, str], config: Mapping[str, Any],
               stderr: IO[str] | None) -> None:
    log.setup(command=command, container_id=env.get("CNI_CONTAINERID", ""), netns=env.get("CNI_NETNS", ""),
              ifname=env.get("CNI_IFNAME", ""), env=env, stderr=stderr or sys.stderr)
    # The host decides where the plugin logs (cni.log); a config key is never a path root
    # writes to. Multus users copy these keys from other plugins: accept, say they are ignored.
    for key in ("logFile", "logLevel", "log_file", "log_level"):
        if key in config:
            logging.getLogger(log.LOGGER_NAME).warning(
                "ignoring %s=%r in the network config: the host sets the plugin's log file and level "
                "(%s, %s)", key, config[key], log.ENV_FILE, log.ENV_LEVEL)


def _decode(data: bytes) -> dict[str, Any]:
    try:
        config = json.loads(data.decode("utf-8"))
    except RecursionError as exc:  # the decoder recurses per nesting level: 100k "[" is enough
        raise CniError(Code.DECODE_FAILURE,
                       "cannot decode network config on stdin: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer over 4300 digits
        raise CniError(Code.DECODE_FAILURE, f"cannot decode network config on stdin: {_short(exc)}") from exc
    if not isinstance(config, dict):
        raise CniError(Code.DECODE_FAILURE, "network config on stdin is not a JSON object")
    return config


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_version(config: Mapping[str, Any], command: str, supported: tuple[str, ...]) -> str:
    version = config.get("cniVersion", "0.1.0")
    if not isinstance(version, str) or version not in supported:
        raise CniError(Code.INCOMPATIBLE_VERSION, f"incompatible CNI versions: config is {version!r}",
                       f"plugin supports {', '.join(supported)}")
    minimum = _MIN_VERSION.get(command)
    if minimum and not at_least(version, minimum):
        raise CniError(Code.INCOMPATIBLE_VERSION,
                       f"config version {version} does not allow {command} (needs {minimum} or later)")
    return version


def _cmd_args(command: str, env: Mapping[str, str], data: bytes, config: Mapping[str, Any],
              version: str) -> CmdArgs:
    from cni.types import CmdArgs

    container_id = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    netns = env.get("CNI_NETNS", "")
    if command in ("ADD", "DEL", "CHECK"):
        if not container_id:
            raise CniError(Code.INVALID_ENV, "CNI_CONTAINERID is required")
        why = container_id_problem(container_id)
        if why:
            raise CniError(Code.INVALID_ENV, f"CNI_CONTAINERID {container_id!r} is invalid: {why}")
        if not ifname:
            raise CniError(Code.INVALID_ENV, "CNI_IFNAME is required")
        why = ifname_problem(ifname)
        if why:
            raise CniError(Code.INVALID_ENV, f"CNI_IFNAME {ifname!r} {why}")
    if command in ("ADD", "CHECK") and not netns:
        raise CniError(Code.INVALID_ENV, "CNI_NETNS is required")
    if netns and command in ("ADD", "CHECK"):
        if not netns.startswith("/"):
            raise CniError(Code.INVALID_ENV, f"CNI_NETNS {netns!r} is not an absolute path")
        _check_netns(netns, env)
    if netns and command == "DEL" and not netns.startswith("/"):
        # DEL cleans up by identity (container id, ifname) and never needs the netns: a bad one
        # must not strand the attachment (kubelet would retry the DEL forever).
        logging.getLogger(log.LOGGER_NAME).warning("DEL: ignoring CNI_NETNS %r: not an absolute path", netns)
        netns = ""
    path = tuple(p for p in env.get("CNI_PATH", "").split(":") if p)
    return CmdArgs(command=command, container_id=container_id, netns=netns, ifname=ifname,
                   args=env.get("CNI_ARGS", ""), path=path, stdin_data=data, config=config,
                   cni_version=version, env=dict(env))


def _check_netns(netns: str, env: Mapping[str, str]) -> None:
    from core.netns import NetnsError, check_netns, own_netns_inode

    try:
        inode = check_netns(netns)
    except NetnsError as exc:
        raise CniError(Code.INVALID_NETNS, f"CNI_NETNS {netns} is not a network namespace: {exc}") from exc
    if inode == own_netns_inode() and not env.get("CNI_NETNS_OVERRIDE"):
        raise CniError(Code.INVALID_NETNS, f"CNI_NETNS {netns} is the plugin's own network namespace",
                       "refusing to configure the host namespace")
