"""Prometheus text exposition, stdlib only, on an optional loopback HTTP port.

Why not prometheus_client: one more dependency for a handful of counters. The registry is tiny:
counters and histograms with labels, plus gauges computed at scrape time (pool utilisation comes
from the allocator, so it can never drift from the truth).
"""

from __future__ import annotations

import bisect
import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("ipamd.metrics")

Labels = tuple[tuple[str, str], ...]
PROBE_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


def _fmt(labels: Labels) -> str:
    if not labels:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in labels]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._help: dict[str, tuple[str, str]] = {}
        self._hist: dict[str, dict[Labels, list[float]]] = {}  # bucket counts..., sum, count
        self._gauges: list[Callable[[], Iterable[tuple[str, Labels, float]]]] = []
        self.describe("ipamd_allocations_total", "counter", "Addresses granted (new leases)")
        self.describe("ipamd_releases_total", "counter", "Addresses released")
        self.describe("ipamd_failures_total", "counter", "Failed RPCs by reason (gRPC status)")
        self.describe("ipamd_probe_duration_ms", "histogram", "ARP/NDP probe latency")

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hist.setdefault(name, {}).setdefault(key, [0.0] * (len(PROBE_BUCKETS_MS) + 2))
            i = bisect.bisect_left(PROBE_BUCKETS_MS, value)
            for j in range(i, len(PROBE_BUCKETS_MS)):
                h[j] += 1
            h[-2] += value
            h[-1] += 1

    def add_gauges(self, fn: Callable[[], Iterable[tuple[str, Labels, float]]]) -> None:
        self._gauges.append(fn)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                self._head(lines, name)
                lines += [f"{name}{_fmt(k)} {v:g}" for k, v in sorted(series.items())]
            for name, hs in sorted(self._hist.items()):
                self._head(lines, name)
                for k, h in sorted(hs.items()):
                    for b, n in zip(PROBE_BUCKETS_MS, h, strict=False):
                        lines.append(f"{name}_bucket{_fmt((*k, ('le', str(b))))} {n:g}")
                    lines.append(f"{name}_bucket{_fmt((*k, ('le', '+Inf')))} {h[-1]:g}")
                    lines.append(f"{name}_sum{_fmt(k)} {h[-2]:g}")
                    lines.append(f"{name}_count{_fmt(k)} {h[-1]:g}")
        for fn in self._gauges:
            try:
                samples = list(fn())
            except Exception:  # a scrape must not kill the daemon; say so in the log
                log.exception("msg=%s", "gauge collection failed")
                continue
            seen: set[str] = set()
            for name, labels, value in samples:
                if name not in seen:
                    seen.add(name)
                    self._head(lines, name)
                lines.append(f"{name}{_fmt(labels)} {value:g}")
        return "\n".join(lines) + "\n"

    def _head(self, lines: list[str], name: str) -> None:
        kind, text = self._help.get(name, ("untyped", name))
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")


def serve_metrics(metrics: Metrics, port: int, host: str, tls: ssl.SSLContext) -> ThreadingHTTPServer:
    """Serve /metrics over HTTPS with mutual TLS on host:port in a daemon thread; returns the
    server (shutdown() to stop). Nothing of ours listens on TCP without mutual TLS: a scraper
    needs a client certificate the client CA signed (Prometheus: `tls_config` cert_file/key_file).
    The handshake runs in the handler's thread, so a silent client cannot stall the accept loop."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("msg=%s", format % args)

    class TlsServer(ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self) -> tuple[Any, Any]:
            sock, addr = self.socket.accept()
            return tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

        def finish_request(self, request: Any, client_address: Any) -> None:
            try:
                request.settimeout(10)
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                log.info("peer=%s msg=%s error=%s", client_address[0], "metrics client refused", exc)
                return
            super().finish_request(request, client_address)

    srv = TlsServer((host, port), Handler)
    threading.Thread(target=srv.serve_forever, name="metrics", daemon=True).start()
    return srv
