"""Delegated IPAM: exec another CNI plugin (host-local, static, ...) from CNI_PATH.

Why: the CNI delegation rules (SPEC "Delegated plugins"; Go `pkg/invoke`): find the plugin in
CNI_PATH, run it with the same environment except CNI_COMMAND and the full network config on
stdin, copy its stderr to ours, parse its stdout as a result (ADD) or an error.

Version bridging: the reference plugins stop at CNI 1.0.0. For a 1.1.0 config the delegate's
VERSION is asked first (one extra exec); if it lacks 1.1.0, ADD/DEL/CHECK run with the highest
version it does support that we also speak (a 1.0 result is a subset of 1.1), and STATUS/GC,
which only exist in 1.1.0, raise CniError code 1 so the caller can skip them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from cni.errors import CniError, Code
from cni.types import SUPPORTED_VERSIONS, CmdArgs, Result

_log = logging.getLogger("ovs-underlay.delegate")
TIMEOUT_S = 60.0


class DelegateNotFound(CniError):
    pass


def find_plugin(plugin: str, path: tuple[str, ...]) -> str:
    for d in path:
        candidate = os.path.join(d, plugin)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise DelegateNotFound(Code.INVALID_NETWORK_CONFIG,
                           f"IPAM plugin {plugin!r} not found in CNI_PATH",
                           f"CNI_PATH={':'.join(path) or '(empty)'}")


class ExecDelegate:
    def __init__(self) -> None:
        self._versions: dict[str, tuple[str, ...]] = {}

    def run(self, plugin: str, command: str, args: CmdArgs) -> Result | None:
        exe = find_plugin(plugin, args.path)
        config: Mapping[str, Any] = args.config
        if args.cni_version == "1.1.0":
            theirs = self._supported(exe, plugin, args)
            if "1.1.0" not in theirs:
                if command in ("STATUS", "GC"):
                    raise CniError(Code.INCOMPATIBLE_VERSION,
                                   f"IPAM plugin {plugin} does not support CNI 1.1.0 {command}")
                common = [v for v in SUPPORTED_VERSIONS if v in theirs]
                if not common:
                    raise CniError(Code.INCOMPATIBLE_VERSION, f"IPAM plugin {plugin} supports none of "
                                                              f"{', '.join(SUPPORTED_VERSIONS)}")
                _log.debug("%s speaks up to %s; delegating %s with it", plugin, common[-1], command)
                config = {**config, "cniVersion": common[-1]}
        return self._exec(exe, plugin, command, args, config)

    def _supported(self, exe: str, plugin: str, args: CmdArgs) -> tuple[str, ...]:
        if exe not in self._versions:
            env = {**args.env, "CNI_COMMAND": "VERSION"}
            try:
                proc = subprocess.run([exe], input=b"{}", env=env, capture_output=True, timeout=TIMEOUT_S,
                                      check=False)
                data = json.loads(proc.stdout)
                self._versions[exe] = tuple(str(v) for v in data.get("supportedVersions", []))
            except (OSError, ValueError, AttributeError, subprocess.TimeoutExpired) as exc:
                raise CniError(Code.INTERNAL, f"IPAM plugin {plugin} VERSION failed: {exc}") from exc
        return self._versions[exe]

    def _exec(self, exe: str, plugin: str, command: str, args: CmdArgs,
              config: Mapping[str, Any]) -> Result | None:
        env = {**args.env, "CNI_COMMAND": command}
        stdin = json.dumps(config).encode()
        try:
            proc = subprocess.run([exe], input=stdin, env=env, capture_output=True, timeout=TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise CniError(Code.TRY_AGAIN_LATER, f"IPAM plugin {plugin} {command} timed out "
                                                 f"after {TIMEOUT_S:.0f}s") from exc
        except OSError as exc:
            raise CniError(Code.IO_FAILURE, f"cannot run IPAM plugin {exe}: {exc}") from exc
        for line in proc.stderr.decode(errors="replace").splitlines():
            _log.info("%s: %s", plugin, line)
        out = proc.stdout.strip()
        if proc.returncode != 0:
            raise _error_of(plugin, command, proc.returncode, out)
        if command != "ADD":
            return None
        try:
            data = json.loads(out)
        except ValueError as exc:
            raise CniError(Code.DECODE_FAILURE, f"IPAM plugin {plugin} returned an undecodable result",
                           out.decode(errors="replace")[:500]) from exc
        return Result.from_json(data, str(config.get("cniVersion", args.cni_version)))


def _error_of(plugin: str, command: str, rc: int, out: bytes) -> CniError:
    try:
        data = json.loads(out)
        code = int(data["code"])
        msg = str(data.get("msg", ""))
        details = str(data.get("details", "") or "")
    except (ValueError, KeyError, TypeError):
        return CniError(Code.INTERNAL, f"IPAM plugin {plugin} {command} failed (exit {rc})",
                        out.decode(errors="replace")[:500])
    return CniError(code, f"IPAM plugin {plugin} {command}: {msg}", details)
