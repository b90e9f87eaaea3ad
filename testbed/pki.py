"""Throwaway certificate authorities made with openssl, for the tests of our TLS endpoints
(ipamd's TCP listener and metrics, etcd, the OVN northbound): a CA for servers, a CA for clients,
and a rogue CA whose client certificate every endpoint must refuse."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=d)


def cert(d: Path, name: str, ca_name: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca_name}.crt", "-CAkey", f"{ca_name}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    (d / f"{name}.key").chmod(0o600)


def make(d: Path) -> Path:
    """server-ca, client-ca, rogue-ca; `ipamd` (server, 127.0.0.1/localhost) signed by server-ca,
    `admin` (client) by client-ca, `intruder` (client) by rogue-ca. Returns `d`."""
    for name in ("server-ca", "client-ca", "rogue-ca"):
        ca(d, name)
    cert(d, "ipamd", "server-ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    cert(d, "admin", "client-ca", "extendedKeyUsage=clientAuth")
    cert(d, "intruder", "rogue-ca", "extendedKeyUsage=clientAuth")
    return d


def ipamd_args(d: Path) -> list[str]:
    """ipamd's TLS flags for a PKI from `make(d)` (its TCP listener and its metrics endpoint)."""
    return ["--tls-cert", str(d / "ipamd.crt"), "--tls-key", str(d / "ipamd.key"),
            "--tls-client-ca", str(d / "client-ca.crt")]


def scrape(url: str, d: Path, who: str | None = "admin") -> str:
    """GET `url` over TLS trusting server-ca, presenting `who`'s client certificate (None: none)."""
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(d / "server-ca.crt"))
    if who:
        ctx.load_cert_chain(str(d / f"{who}.crt"), str(d / f"{who}.key"))
    return str(urllib.request.urlopen(url, timeout=5, context=ctx).read().decode())
