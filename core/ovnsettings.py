"""Where the OVN northbound DB is, and with which TLS files: parsed from a network config's
`ovnNorthbound` keys or from the node's settings file. Pure parsing plus one file read.

Why the node file: the northbound endpoint and the client's certificate are facts of the node
and the cluster, not of one network. ovn-kubernetes' NADs do not carry them, so an unchanged
ovn-kubernetes NAD can only get managed logical switch ports (and `topology: layer2`) when the
node says where OVN is. It also keeps credentials away from NAD authors: a network config may
still name `ovnNorthbound`, but only root decides what this file says (it must be root's and
not writable by group or others). The plugin reads it when a network needs OVN; a reconciler
(ipamd, the node agent) reads the same file to reach the same DB.

File: `/etc/ovs-underlay/ovn.json` (the environment variable OVS_UNDERLAY_OVN_CONFIG names
another), e.g. conf-examples/ovn.json:
    {"ovnNorthbound": "ssl:10.0.0.10:6641,ssl:10.0.0.11:6641",
     "ovnNbPrivateKey": "/etc/ovn/ovn-privkey.pem", "ovnNbCertificate": "/etc/ovn/ovn-cert.pem",
     "ovnNbCaCert": "/etc/ovn/ovnnb-ca.cert"}
A missing file means "this node knows no northbound DB". Errors: core.spec.ConfigError (the
value is invalid: 7 at the CNI edge), naming the file and the key.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.spec import ConfigError

DEFAULT_PATH = "/etc/ovs-underlay/ovn.json"
ENV = "OVS_UNDERLAY_OVN_CONFIG"
TLS_KEYS = ("ovnNbPrivateKey", "ovnNbCertificate", "ovnNbCaCert")
KEYS = ("ovnNorthbound", *TLS_KEYS)


@dataclass(frozen=True)
class Northbound:
    """An OVN_Northbound endpoint: one or more remotes (a clustered DB lists every member)
    and, for ssl: remotes, the client's TLS files (the flags of ovn-nbctl -p/-c/-C)."""

    remote: str
    private_key: str | None = None
    certificate: str | None = None
    ca_cert: str | None = None

    def remotes(self) -> tuple[str, ...]:
        return tuple(r.strip() for r in self.remote.split(",") if r.strip())


def _abs_path(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v.startswith("/") or "\0" in v or "\n" in v:
        raise ConfigError(f"{key}: expected an absolute file path, got {v!r}")
    return v


def _remote(r: str, key: str) -> None:
    kind, _, rest = r.partition(":")
    if kind == "unix":
        _abs_path(rest, key)
        return
    if kind in ("tcp", "ssl"):
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and port.isdigit() and 0 < int(port) < 65536 and re.match(r"^[A-Za-z0-9.:\-]+$", host):
            return
    raise ConfigError(f"{key}: {r!r} is not an OVSDB remote (unix:PATH, tcp:HOST:PORT or ssl:HOST:PORT)")


def parse_northbound(src: Mapping[str, Any], where: str) -> Northbound | None:
    """`ovnNorthbound` (+ the TLS files) from a network config or the node file; None when
    `ovnNorthbound` is absent. `where` prefixes key names in messages (the node file's path)."""
    remote = src.get("ovnNorthbound")
    if remote is None:
        stray = [k for k in TLS_KEYS if k in src]
        if stray:
            raise ConfigError(f"{where}{stray[0]}: given without ovnNorthbound")
        return None
    key = f"{where}ovnNorthbound"
    if not isinstance(remote, str) or not remote.strip():
        raise ConfigError(f"{key}: expected unix:PATH, tcp:HOST:PORT or ssl:HOST:PORT, got {remote!r}")
    nb = Northbound(remote.strip())
    for r in nb.remotes():
        _remote(r, key)
    tls = {k: _abs_path(src[k], f"{where}{k}") for k in TLS_KEYS if src.get(k) is not None}
    if any(r.startswith("ssl:") for r in nb.remotes()):
        missing = [k for k in TLS_KEYS if k not in tls]
        if missing:
            raise ConfigError(f"{key}: ssl: needs {', '.join(where + k for k in missing)} (the client's "
                              "private key, certificate and the CA certificate: ovn-nbctl -p -c -C)")
    elif tls:
        raise ConfigError(f"{where}{next(iter(tls))}: TLS files given but {key} has no ssl: remote")
    return Northbound(nb.remote, tls.get("ovnNbPrivateKey"), tls.get("ovnNbCertificate"),
                      tls.get("ovnNbCaCert"))


def load_northbound(env: Mapping[str, str], owner_uid: int = 0) -> Northbound | None:
    """The node's northbound endpoint, or None without a settings file. `owner_uid`: who must
    own the file (root; tests pass their own uid)."""
    path = env.get(ENV) or DEFAULT_PATH
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"node OVN settings {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"node OVN settings {path}: not a regular file")
        if st.st_uid != owner_uid or st.st_mode & 0o022:
            raise ConfigError(f"node OVN settings {path}: must be owned by uid {owner_uid} and not writable "
                              f"by group or others (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"node OVN settings {path}: not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"node OVN settings {path}: expected a JSON object")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"node OVN settings {path}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    return parse_northbound(raw, f"node OVN settings {path}: ")
