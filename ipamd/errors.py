"""ipamd's domain errors: each one knows its gRPC status and the CNI code the plugin reports.

Why: the allocator and the probes raise what went wrong in domain terms; exactly one translator
(`server._rpc`) turns these into a status, a message and the trailing metadata
`ovs-underlay-cni-code`. Messages name the network, subnet and address involved.
No gRPC import here: the codes are names of `grpc.StatusCode` members.
"""

from __future__ import annotations

from cni.errors import Code

# Trailing metadata key carrying the CNI code the plugin must report (see proto/ipam.proto).
CNI_CODE_KEY = "ovs-underlay-cni-code"


class IpamError(Exception):
    status = "INTERNAL"
    cni_code: int = Code.INTERNAL

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


class InvalidPool(IpamError):
    """The pool definition or the request is malformed."""

    status = "INVALID_ARGUMENT"
    cni_code = Code.INVALID_NETWORK_CONFIG


class InvalidRequest(IpamError):
    status = "INVALID_ARGUMENT"
    cni_code = Code.INVALID_NETWORK_CONFIG


class PoolDefinitionConflict(IpamError):
    """A network's definition changed in a way that could re-number or strand live leases."""

    status = "FAILED_PRECONDITION"
    cni_code = Code.INVALID_NETWORK_CONFIG


class PoolExhausted(IpamError):
    status = "RESOURCE_EXHAUSTED"
    cni_code = Code.POOL_EXHAUSTED


class AddressTaken(IpamError):
    """A requested address is held by another attachment or quarantined."""

    status = "ALREADY_EXISTS"
    cni_code = Code.ADDRESS_UNAVAILABLE


class AddressOutOfPool(IpamError):
    """A requested address is outside every subnet, outside the range, excluded or reserved."""

    status = "OUT_OF_RANGE"
    cni_code = Code.ADDRESS_UNAVAILABLE


class GatewayUnreachable(IpamError):
    status = "FAILED_PRECONDITION"
    cni_code = Code.GATEWAY_UNREACHABLE


class AddressConflict(IpamError):
    """An address about to be granted was answered for on the wire."""

    status = "ABORTED"
    cni_code = Code.ADDRESS_CONFLICT


class LeaseNotFound(IpamError):
    status = "NOT_FOUND"
    cni_code = Code.UNKNOWN_CONTAINER


class StoreConflict(Exception):
    """Raised by a store when a reservation would duplicate a live address. Internal: the
    allocator catches it (another writer won) and retries; it never reaches a client."""

    def __init__(self, network: str, ip: str) -> None:
        super().__init__(f"network {network}: address {ip} is already reserved")
        self.network = network
        self.ip = ip


class CommitFailed(IpamError):
    """The store could not make a batch durable: nothing of it was granted or released."""

    status = "UNAVAILABLE"
    cni_code = Code.TRY_AGAIN_LATER
