"""Real etcd members for the tests, the bench and the cluster demo: Debian's etcd-server, started
on loopback ports in a temporary directory, stopped and removed by `destroy()`.

Why in testbed/: the integration tests, `make bench` and `make demo-cluster` all need the same
thing (a 1- or 3-member cluster, optionally with TLS and client-certificate authentication), and
an independent oracle to look at what ipamd wrote (`etcdctl`, never our own client).

Faults the tests inject: `kill(member)` (SIGKILL), `stop_all()` / `start_all()` (every member
down, then back with its data), `leader()` to find the member to kill.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import netbed

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"


_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never the same twice in this process."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@dataclass(frozen=True)
class Tls:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls(d: Path) -> Tls:
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ovs-underlay-test-ca",
         "-keyout", "ca.key", "-out", "ca.crt")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n")
    for name, cn in (("server", "etcd-server"), ("client", "ovs-underlay-ipamd")):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.crt")
    for f in d.iterdir():
        f.chmod(0o600)
    return Tls(str(d / "ca.crt"), str(d / "server.crt"), str(d / "server.key"), str(d / "client.crt"),
               str(d / "client.key"))


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    def __init__(self, size: int = 1, tls: bool = False, workdir: str | None = None) -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"ou-etcd-{netbed.TOKEN}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls = make_tls(self.dir / "tls") if tls else None
        scheme = "https" if tls else "http"
        self.members = [Member(f"m{i}", free_port(), free_port(), str(self.dir / f"m{i}"),
                               str(self.dir / f"m{i}.log")) for i in range(size)]
        cluster = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        token = f"ou-{netbed.TOKEN}-{secrets.token_hex(4)}"
        for m in self.members:
            m.args = [
                ETCD, "--name", m.name, "--data-dir", m.data_dir,
                "--listen-client-urls", f"{scheme}://127.0.0.1:{m.client_port}",
                "--advertise-client-urls", f"{scheme}://127.0.0.1:{m.client_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-cluster", cluster, "--initial-cluster-token", token,
                "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", m.log_path,
            ]
            if self.tls is not None:
                m.args += ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                           "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
        self.scheme = scheme

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, member: Member | None = None, wait_s: float = 30) -> EtcdCluster:
        for m in [member] if member else self.members:
            if not m.alive():
                m.proc = subprocess.Popen(m.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                netbed.PROCS.append(m.proc)
        self.wait_healthy(wait_s, [member] if member else self.members)
        return self

    def wait_healthy(self, wait_s: float = 30, members: Sequence[Member] | None = None) -> None:
        deadline = time.monotonic() + wait_s
        for m in members or self.members:
            while True:
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited ({m.proc.returncode}):\n{self.log(m)}")
                r = self.ctl("endpoint", "health", endpoints=[self.url(m)], check=False, timeout=5)
                if r.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {m.name} not healthy in {wait_s}s: {r.stderr}\n{self.log(m)}")
                time.sleep(0.1)

    def kill(self, m: Member, sig: int = signal.SIGKILL) -> None:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(sig)
            m.proc.wait(30)
        m.proc = None

    def stop_all(self) -> None:
        for m in self.members:
            self.kill(m, signal.SIGTERM)

    def start_all(self, wait_s: float = 60) -> None:
        for m in self.members:
            if not m.alive():
                m.proc = subprocess.Popen(m.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                netbed.PROCS.append(m.proc)
        self.wait_healthy(wait_s)

    def destroy(self) -> None:
        for m in self.members:
            self.kill(m)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self, m: Member) -> str:
        try:
            return Path(m.log_path).read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    # ---- addresses ---------------------------------------------------------------------------

    def url(self, m: Member) -> str:
        return f"{self.scheme}://127.0.0.1:{m.client_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.url(m) for m in self.members]

    def ipamd_args(self, prefix: str) -> list[str]:
        """The ipamd flags that point a node at this cluster."""
        args = ["--store", "etcd", "--etcd-endpoints", ",".join(self.endpoints), "--etcd-prefix", prefix]
        if self.tls is not None:
            args += ["--etcd-cacert", self.tls.ca, "--etcd-cert", self.tls.client_cert,
                     "--etcd-key", self.tls.client_key]
        return args

    # ---- the independent oracle: etcdctl -----------------------------------------------------

    def ctl(self, *args: str, endpoints: Sequence[str] | None = None, check: bool = True,
            timeout: float = 20) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ETCDCTL_API": "3"}
        eps = endpoints or [self.url(m) for m in self.members if m.alive()]
        cmd = [ETCDCTL, "--endpoints", ",".join(eps), "--command-timeout=5s"]
        if self.tls is not None:
            cmd += ["--cacert", self.tls.ca, "--cert", self.tls.client_cert, "--key", self.tls.client_key]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, check=check,
                              timeout=timeout)

    def get_prefix(self, prefix: str) -> dict[str, Any]:
        """Every key under `prefix` with its JSON value decoded (non-JSON values as text)."""
        out = json.loads(self.ctl("get", "--prefix", prefix, "-w", "json").stdout)
        kvs: dict[str, Any] = {}
        for kv in out.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode()
            raw = base64.b64decode(kv.get("value", "")).decode()
            try:
                kvs[key] = json.loads(raw)
            except ValueError:
                kvs[key] = raw
        return kvs

    def leader(self) -> Member:
        out = json.loads(self.ctl("endpoint", "status", "-w", "json").stdout)
        for st in out:
            if st["Status"]["leader"] == st["Status"]["header"]["member_id"]:
                ep = st["Endpoint"]
                return next(m for m in self.members if self.url(m) == ep)
        raise RuntimeError(f"no leader in {out}")


def start_cluster(size: int = 1, tls: bool = False, workdir: str | None = None) -> EtcdCluster:
    c = EtcdCluster(size, tls, workdir)
    try:
        c.start()
    except BaseException:
        c.destroy()
        raise
    return c
