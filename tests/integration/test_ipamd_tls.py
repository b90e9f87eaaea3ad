"""ipamd's TCP listener is mutual TLS only (issue 11 item 3).

`--listen` exposed the whole API on TCP without authentication: a non-root user listed every
lease and released them all. Now `--listen` needs a server certificate and key and a client CA,
and a client must present a certificate that CA signed. Certificates are made here with openssl:
a CA for the server, a CA for clients, and a rogue CA whose client certificate must be refused.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from core._proto import ipam_pb2 as pb
from core._proto import ipam_pb2_grpc
from core.errors import CoreError, Unavailable
from core.ipamd_client import ClientTls, IpamClient
from core.spec import parse_ipam
from testbed import netbed
from testbed import pki as testbed_pki

POOL = parse_ipam({"subnets": [{"subnet": "10.50.0.0/24", "gateway": "10.50.0.1"}]}).pool


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testbed_pki.make(tmp_path_factory.mktemp("pki"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls_ipamd(pki: Path, tmp_path: Path) -> Iterator[tuple[netbed.Ipamd, str]]:
    addr = f"127.0.0.1:{_free_port()}"
    d = netbed.start_ipamd(str(tmp_path), ["--listen", addr, "--tls-cert", str(pki / "ipamd.crt"),
                                          "--tls-key", str(pki / "ipamd.key"),
                                          "--tls-client-ca", str(pki / "client-ca.crt")])
    yield d, addr
    d.stop()


def _tls(pki: Path, who: str = "admin") -> ClientTls:
    return ClientTls(ca=str(pki / "server-ca.crt"), cert=str(pki / f"{who}.crt"), key=str(pki / f"{who}.key"))


def test_listen_without_mutual_tls_is_refused(tmp_path: Path, pki: Path) -> None:
    base = [sys.executable, "-m", "ipamd", "serve", "--socket", str(tmp_path / "s.sock"),
            "--state-dir", str(tmp_path / "st"), "--listen", f"127.0.0.1:{_free_port()}"]
    for extra in ([], ["--tls-cert", str(pki / "ipamd.crt"), "--tls-key", str(pki / "ipamd.key")]):
        res = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=30, cwd=netbed.ROOT)
        assert res.returncode == 2 and "needs mutual TLS" in res.stderr and "tlsClientCa" in res.stderr, res
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "s.sock").exists()


def test_unauthenticated_clients_are_refused(tls_ipamd: tuple[netbed.Ipamd, str], pki: Path) -> None:
    d, addr = tls_ipamd
    with IpamClient(d.socket) as c:  # the unix socket (root) as before
        c.allocate(network="tls", pool=POOL, container_id=netbed.container_id("t"), ifname="eth0")
    # plaintext TCP: what the original finding used
    with grpc.insecure_channel(addr) as ch, pytest.raises(grpc.RpcError) as e:
        ipam_pb2_grpc.IpamStub(ch).GarbageCollect(pb.GcRequest(network="tls"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    # TLS that checks the server but presents no client certificate
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "server-ca.crt").read_bytes())
    with grpc.secure_channel(addr, creds) as ch, pytest.raises(grpc.RpcError) as e:
        ipam_pb2_grpc.IpamStub(ch).ListLeases(pb.ListLeasesRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    # a certificate from another CA
    with IpamClient(addr, timeout_ms=5000, tls=_tls(pki, "intruder")) as c, pytest.raises(Unavailable):
        c.list_leases()
    # and the client refuses a plaintext TCP channel outright
    with pytest.raises(CoreError):
        IpamClient(addr)
    assert len(d.leases("tls")) == 1  # nothing was released


def test_an_authenticated_client_is_served_over_tcp(tls_ipamd: tuple[netbed.Ipamd, str], pki: Path) -> None:
    _d, addr = tls_ipamd
    cid = netbed.container_id("t")
    with IpamClient(addr, timeout_ms=5000, tls=_tls(pki)) as c:
        assert c.health() is True
        c.allocate(network="tls", pool=POOL, container_id=cid, ifname="eth0")
        assert [lease.container_id for lease in c.list_leases(network="tls")] == [cid]
    # the CLI the same way (by name: the certificate carries DNS:localhost)
    host_port = addr.replace("127.0.0.1", "localhost")
    res = subprocess.run([sys.executable, "-m", "ipamd", "leases", "-o", "json", "--server", host_port,
                          "--tls-ca", str(pki / "server-ca.crt"), "--tls-cert", str(pki / "admin.crt"),
                          "--tls-key", str(pki / "admin.key")], capture_output=True, text=True, timeout=30,
                         cwd=netbed.ROOT)
    assert res.returncode == 0 and cid in res.stdout, res
    res = subprocess.run([sys.executable, "-m", "ipamd", "leases", "--server", addr], capture_output=True,
                         text=True, timeout=30, cwd=netbed.ROOT)
    assert res.returncode == 2 and "--server needs mutual TLS" in res.stderr
