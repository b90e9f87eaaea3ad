"""The CNI error taxonomy shared by the main plugin, the IPAM plugin and the ipamd client.

Why one module: every edge (skel, the gRPC client, the delegate runner) translates its own
failures into exactly one exception type, and skel is the only place that turns it into the
error JSON and exit code. stdlib only: it is imported on every exec.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


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
