"""ipamd's domain errors, and the one table that turns them into a gRPC status and a reason.

Why: the allocator, the stores and the probes raise what went wrong in domain terms; exactly one
translator (`service._rpc`) turns these into a gRPC status, a message and the trailing metadata
`core.wire.REASON_KEY` through `WIRE` below. The daemon knows nothing of CNI codes: each client
maps the reason to its own (the plugins: cni/errors.py). Messages name the network, subnet and
address involved. No gRPC import here: the statuses are names of `grpc.StatusCode` members.
"""

from __future__ import annotations

from core.wire import Reason


class IpamError(Exception):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


class InvalidPool(IpamError):
    """The pool definition is malformed."""


class InvalidRequest(IpamError):
    """A field of the request is malformed or missing."""


class PoolDefinitionConflict(IpamError):
    """A network's definition changed in a way that could re-number or strand live leases."""


class PoolExhausted(IpamError):
    pass


class AddressTaken(IpamError):
    """A requested address is held by another attachment or quarantined."""


class AddressOutOfPool(IpamError):
    """A requested address is outside every subnet, outside the range, excluded or reserved."""


class GatewayUnreachable(IpamError):
    pass


class AddressConflict(IpamError):
    """An address about to be granted was answered for on the wire."""


class LeaseNotFound(IpamError):
    pass


class InvalidNetns(IpamError):
    """The netns to probe from cannot be used (missing, not a netns, or ipamd's own)."""


class NetworkQuarantined(IpamError):
    """The network's stored definition no longer parses: ipamd refuses its allocations (and
    serves every other network) until it is repaired. Releases still work."""


class CommitFailed(IpamError):
    """The store could not make a batch durable: nothing of it was granted or released."""


class StoreUnavailable(IpamError):
    """The cluster store (etcd) cannot be reached, and the request needs it (a static address,
    a new block, an address from another node's block, a new network)."""


class NodeAlive(IpamError):
    """`nodes release` of a node whose heartbeat is alive."""


class NotClustered(IpamError):
    """A cluster command sent to an ipamd with a node-local store."""


class ReconcileFailed(IpamError):
    """A reconcile pass could not list what it judges (OVSDB or netlink unreachable): it acted
    on nothing after the failure; the next pass tries again."""


class StoreConflict(Exception):
    """Raised by a store when a reservation would duplicate a live address. Internal: the
    allocator catches it (another writer won) and retries; it never reaches a client."""

    def __init__(self, network: str, ip: str) -> None:
        super().__init__(f"network {network}: address {ip} is already reserved")
        self.network = network
        self.ip = ip


# The one table: domain error -> (gRPC status name, reason). Looked up along the MRO, so a
# subclass maps like its parent unless listed; IpamError itself is an internal error.
WIRE: dict[type[IpamError], tuple[str, str]] = {
    InvalidPool: ("INVALID_ARGUMENT", Reason.INVALID_POOL),
    InvalidRequest: ("INVALID_ARGUMENT", Reason.INVALID_REQUEST),
    PoolDefinitionConflict: ("FAILED_PRECONDITION", Reason.POOL_CHANGED),
    PoolExhausted: ("RESOURCE_EXHAUSTED", Reason.POOL_EXHAUSTED),
    AddressTaken: ("ALREADY_EXISTS", Reason.ADDRESS_TAKEN),
    AddressOutOfPool: ("OUT_OF_RANGE", Reason.ADDRESS_OUT_OF_POOL),
    GatewayUnreachable: ("FAILED_PRECONDITION", Reason.GATEWAY_UNREACHABLE),
    AddressConflict: ("ABORTED", Reason.ADDRESS_CONFLICT),
    LeaseNotFound: ("NOT_FOUND", Reason.LEASE_NOT_FOUND),
    InvalidNetns: ("FAILED_PRECONDITION", Reason.INVALID_NETNS),
    CommitFailed: ("UNAVAILABLE", Reason.COMMIT_FAILED),
    StoreUnavailable: ("UNAVAILABLE", Reason.STORE_UNAVAILABLE),
    NodeAlive: ("FAILED_PRECONDITION", Reason.NODE_ALIVE),
    NotClustered: ("FAILED_PRECONDITION", Reason.NOT_CLUSTERED),
    NetworkQuarantined: ("FAILED_PRECONDITION", Reason.NETWORK_QUARANTINED),
    ReconcileFailed: ("UNAVAILABLE", Reason.RECONCILE_FAILED),
    IpamError: ("INTERNAL", Reason.INTERNAL),
}


def wire_status(err: IpamError) -> tuple[str, str]:
    """(gRPC status name, reason) of a domain error."""
    for cls in type(err).__mro__:
        if cls in WIRE:
            return WIRE[cls]
    return WIRE[IpamError]
