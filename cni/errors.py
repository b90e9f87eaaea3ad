"""The CNI error taxonomy of both plugins, and the one table that maps the core's errors to it.

Why one module: every edge (skel, the delegate runner) reports exactly one exception type,
`CniError`, and skel is the only place that turns it into the error JSON and exit code. The
shared core raises neutral errors (core.errors); `as_cni` maps them here, in one table
(`CODES` by kind, `REASON_CODES` by ipamd's machine-readable reason). stdlib + core.errors only:
it is imported on every exec.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from core import errors as core


class Code(IntEnum):
    # CNI spec codes (SPEC.md "Error codes") plus the Go library's 8 (invalid netns).
    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    INVALID_NETNS = 8
    TRY_AGAIN_LATER = 11
    NOT_AVAILABLE = 50
    LIMITED_CONNECTIVITY = 51
    # ovs-underlay's own (100+ is free for plugins).
    POOL_EXHAUSTED = 101
    ADDRESS_UNAVAILABLE = 102
    GATEWAY_UNREACHABLE = 103
    ADDRESS_CONFLICT = 104
    INTERNAL = 999


class CniError(Exception):
    """A failure the runtime must see as a CNI error result."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __repr__(self) -> str:
        return f"CniError({self.code}, {self.msg!r})"


# The core's error kinds -> CNI codes (looked up along the MRO; CoreError itself is internal).
CODES: dict[type[core.CoreError], Code] = {
    core.Unavailable: Code.TRY_AGAIN_LATER,
    core.ChangedConcurrently: Code.TRY_AGAIN_LATER,
    core.AlreadyExists: Code.INVALID_ENV,  # CNI_IFNAME exists in the container already
    core.NotOwned: Code.INVALID_NETWORK_CONFIG,
    core.Missing: Code.INVALID_NETWORK_CONFIG,  # e.g. the configured bridge does not exist
    core.Conflict: Code.INVALID_NETWORK_CONFIG,  # e.g. a logical switch that disagrees with the network
    core.NetnsUnusable: Code.INVALID_NETNS,
    core.CoreError: Code.INTERNAL,
}

# ipamd's reasons (core.wire.Reason) -> CNI codes. An unknown reason (a newer daemon) is 999.
REASON_CODES: dict[str, Code] = {
    "INVALID_POOL": Code.INVALID_NETWORK_CONFIG,
    "INVALID_REQUEST": Code.INVALID_NETWORK_CONFIG,
    "POOL_CHANGED": Code.INVALID_NETWORK_CONFIG,
    "POOL_EXHAUSTED": Code.POOL_EXHAUSTED,
    "ADDRESS_TAKEN": Code.ADDRESS_UNAVAILABLE,
    "ADDRESS_OUT_OF_POOL": Code.ADDRESS_UNAVAILABLE,
    "GATEWAY_UNREACHABLE": Code.GATEWAY_UNREACHABLE,
    "ADDRESS_CONFLICT": Code.ADDRESS_CONFLICT,
    "LEASE_NOT_FOUND": Code.UNKNOWN_CONTAINER,
    "INVALID_NETNS": Code.INVALID_NETNS,
    "STORE_UNAVAILABLE": Code.TRY_AGAIN_LATER,
    "NODE_ALIVE": Code.INVALID_NETWORK_CONFIG,
    "NOT_CLUSTERED": Code.INVALID_NETWORK_CONFIG,
    "COMMIT_FAILED": Code.TRY_AGAIN_LATER,
    # ipamd's stored definition of the network does not parse: an admin repairs it (README
    # Troubleshooting), and the runtime's retry then succeeds.
    "NETWORK_QUARANTINED": Code.TRY_AGAIN_LATER,
    "INTERNAL": Code.INTERNAL,
}


def code_of(exc: core.CoreError) -> Code:
    if isinstance(exc, core.IpamdRefused):
        return REASON_CODES.get(exc.reason, Code.INTERNAL)
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return Code.INTERNAL


def as_cni(exc: BaseException) -> CniError:
    """The CniError a runtime sees for `exc`: itself, or a core error mapped through the table."""
    if isinstance(exc, CniError):
        return exc
    if isinstance(exc, core.CoreError):
        return CniError(code_of(exc), exc.msg, exc.hint)
    raise TypeError(f"not a CNI or core error: {exc!r}")
