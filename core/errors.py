"""Neutral errors of the shared core: what failed, on which object, and why.

Why neutral: the same OVSDB client, netlink primitives and ipamd client serve the CNI plugins,
ipamd and the node agent, and each of those reports failures in its own terms (CNI codes, gRPC
status, an exit status). The core only says what kind of failure it was; each program maps the
kinds at its edge in one table (`cni/errors.py`, `ipamd/errors.py`). stdlib only.

Kinds (subclasses), each named for what a caller does about it:
- `Unavailable`: a daemon or endpoint did not answer in time (OVSDB, ipamd): try again later.
- `ChangedConcurrently`: rows changed under us between look-up and commit: try again.
- `AlreadyExists`: the object to create exists already (an interface name in a pod netns).
- `NotOwned`: an object of that name exists and is not ours; we never touch it.
- `Missing`: an object the request needs does not exist (an OVS bridge).
- `NetnsUnusable`: a network namespace path cannot be opened or is not a netns.
- `IpamdRefused`: ipamd refused a request; `reason` is the machine-readable wire reason.
- `Conflict`: the request contradicts what exists (two configs disagree about one object,
  a name that is ambiguous): fix the configuration.
- `CoreError` itself: anything else (an OVSDB transaction that failed, a malformed reply,
  a netlink errno we do not tolerate).
"""

from __future__ import annotations


class CoreError(Exception):
    """A failed side effect. `msg` is a full sentence naming the object; `hint` says what to do."""

    def __init__(self, msg: str, hint: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.hint = hint

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.msg!r})"


class Unavailable(CoreError):
    """A daemon or endpoint did not answer (refused, closed, timed out)."""


class ChangedConcurrently(CoreError):
    """What we looked at changed before our write committed; nothing was written."""


class AlreadyExists(CoreError):
    """The object to create exists already."""


class NotOwned(CoreError):
    """An object of that name exists and does not carry our ownership marks."""


class Missing(CoreError):
    """An object the request depends on does not exist."""


class NetnsUnusable(CoreError):
    """A network namespace path cannot be opened, or is not a network namespace (any more)."""


class Conflict(CoreError):
    """The request contradicts an existing object (e.g. a logical switch whose localnet port has
    another VLAN than this network asks for); nothing was written."""


class IpamdRefused(CoreError):
    """ipamd answered with an error; `reason` is one of core.wire.Reason."""

    def __init__(self, reason: str, msg: str, hint: str = "") -> None:
        super().__init__(msg, hint)
        self.reason = reason
