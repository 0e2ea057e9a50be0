"""Watching the runs from outside (SPEC §8): the dead man's switch ping and the metrics file.

The ping server is a real HTTP server on 127.0.0.1 (the standard library's),
recording what it was sent and answering as the test says.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
from conftest import needs_rsync
from hookkit import HookSpec, source_toml, start, started_marker, wait_marker, write_config
from pibackup_async.engine.monitor import redact

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Workspace

pytestmark = needs_rsync


@dataclass
class Hit:
    method: str
    path: str
    body: bytes


@dataclass
class PingServer:
    """What it answers: ``codes`` in order (then 200); a ``redirect`` path answers 302."""

    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/ping/abc") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        with self.lock:
            return [h.path for h in self.hits]


@pytest.fixture
def ping_server() -> Iterator[PingServer]:
    state = PingServer()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with state.lock:
                state.hits.append(Hit(self.command, self.path, body))
                code = state.codes.pop(0) if state.codes else 200
            if code == 302:
                self.send_response(302)
                self.send_header("Location", "/moved" + self.path)
            else:
                self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"OK")

        do_GET = do_POST = do_HEAD = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _config(ws: Workspace, url: str, *, fail: bool = False, metrics: str | None = None,
            hold: bool = False) -> None:
    monitor = f'[monitor]\nping_url = "{url}"\n'
    if metrics:
        monitor += f'metrics_file = "{metrics}"\n'
    hooks = [HookSpec("b1", fail={"pre": 3} if fail else {}, block=("pre",) if hold else ())]
    write_config(ws, hooks, source_toml("alpha", ws.make_source("alpha")) + monitor)


def test_an_ok_run_pings_start_then_success_with_the_mail_body(
    ws: Workspace, ping_server: PingServer
) -> None:
    _config(ws, ping_server.url("/ping/abc?rid=7"))
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    # /start and /fail go into the path, before the query string.
    assert ping_server.paths() == ["/ping/abc/start?rid=7", "/ping/abc?rid=7"]
    final = ping_server.hits[-1]
    assert final.method == "POST"
    assert b"OK \xe2\x80\x94 the backup was saved" in final.body
    assert len(final.body) <= 10_000
    report = ws.report()
    assert report["name"].encode() in final.body
    assert report["monitor"] == {"status": "sent", "error": None}


def test_an_interrupted_run_pings_start_then_fail(ws: Workspace, ping_server: PingServer
                                                  ) -> None:
    _config(ws, ping_server.url(), hold=True)
    with start(ws) as running:
        wait_marker(started_marker(ws, "b1", "pre"), running)
        running.send(signal.SIGTERM)
        rc = running.wait(60)
    assert rc == 128 + signal.SIGTERM, running.stderr
    assert ping_server.paths() == ["/ping/abc/start", "/ping/abc/fail"]
    report = ws.report()
    assert report["status"] == "interrupted"
    assert report["name"].encode() in ping_server.hits[-1].body
    assert report["monitor"]["status"] == "sent"


def test_a_failed_run_pings_fail(ws: Workspace, ping_server: PingServer) -> None:
    _config(ws, ping_server.url(), fail=True)
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert ping_server.paths() == ["/ping/abc/start", "/ping/abc/fail"]
    assert b"FAILED" in ping_server.hits[-1].body
    assert ws.report()["monitor"]["status"] == "sent"


def test_a_5xx_is_tried_three_times_then_fails_the_exit_code_not_the_status(
    ws: Workspace, ping_server: PingServer
) -> None:
    _config(ws, ping_server.url())
    ping_server.codes = [200, 503, 503, 503]  # /start, then the final ping three times
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert ping_server.paths() == ["/ping/abc/start"] + ["/ping/abc"] * 3
    report = ws.report()
    assert report["status"] == "ok"
    assert report["monitor"]["status"] == "failed"
    assert "HTTP 503" in report["monitor"]["error"]


def test_a_dead_server_fails_the_exit_code_not_the_status_and_is_bounded(ws: Workspace) -> None:
    # A port nobody listens on (a mistyped one, say): every try is refused at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _config(ws, f"http://127.0.0.1:{port}/ping/s3cret-uuid?rid=7")
    t0 = time.monotonic()
    result = ws.run("run", "--log-format", "json", timeout=90)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - t0 < 60  # tries and their back-off are bounded
    report = ws.report()
    assert report["status"] == "ok" and report["saved"] is True
    assert report["monitor"]["status"] == "failed"
    # Where it went is kept (scheme, host, port); the secret path and query are not.
    error = report["monitor"]["error"]
    assert error.startswith(f"ping http://127.0.0.1:{port}/…?… failed: "), error
    logged = [e for e in _events(result.stderr) if e["event"] == "monitor not pinged"]
    assert [e["error"] for e in logged] == [f"ping http://127.0.0.1:{port}/…/start?… failed: "
                                            + error.partition(" failed: ")[2], error]
    assert "s3cret" not in result.stderr and "rid=7" not in result.stderr
    assert "s3cret" not in error


def test_a_ping_url_is_shown_without_its_secrets() -> None:
    assert redact("https://hc-ping.com/0b2f-uuid") == "https://hc-ping.com/…"
    assert redact("http://127.0.0.1:8000/ping/abc?rid=7", "/fail") == (
        "http://127.0.0.1:8000/…/fail?…")
    assert redact("https://user:pass@hc.example:8443/p/x") == "https://hc.example:8443/…"
    assert redact("http://[::1]:9/ping") == "http://[::1]:9/…"
    assert redact("https://HC.example") == "https://hc.example/…"


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_the_report_written_is_logged_once(ws: Workspace, ping_server: PingServer) -> None:
    # The ping's outcome makes the report be written twice; the log says it once.
    _config(ws, ping_server.url())
    result = ws.run("run", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    written = [e for e in _events(result.stderr) if e["event"] == "report written"]
    assert [e["report"] for e in written] == [str(ws.reports()[-1])], result.stderr
    assert ws.report()["monitor"]["status"] == "sent"


def test_a_4xx_fails_at_once_and_a_failed_start_is_only_logged(
    ws: Workspace, ping_server: PingServer
) -> None:
    _config(ws, ping_server.url())
    ping_server.codes = [500, 500, 500, 404]
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    assert ping_server.paths() == ["/ping/abc/start"] * 3 + ["/ping/abc"]
    report = ws.report()
    assert report["status"] == "ok"
    assert report["monitor"]["status"] == "failed" and "HTTP 404" in report["monitor"]["error"]


def test_redirects_are_followed(ws: Workspace, ping_server: PingServer) -> None:
    _config(ws, ping_server.url())
    ping_server.codes = [200, 302]
    result = ws.run("run")
    assert result.returncode == 0, result.stderr
    assert ping_server.paths()[-1] == "/moved/ping/abc"
    assert ws.report()["monitor"]["status"] == "sent"


def test_without_a_ping_url_the_monitor_is_skipped(ws: Workspace) -> None:
    write_config(ws, [HookSpec("b1")])
    assert ws.run("run").returncode == 0
    assert ws.report()["monitor"] == {"status": "skipped", "error": None}


def _samples(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[re.sub(r"\{.*\}", "", name) if "source=" not in name else name] = value
    return found


def test_the_metrics_file_is_replaced_after_every_run_and_keeps_the_last_success(
    ws: Workspace, ping_server: PingServer
) -> None:
    metrics = ws.root / "textfile" / "pibackup.prom"
    metrics.parent.mkdir()
    _config(ws, ping_server.url(), metrics=str(metrics))
    assert ws.run("run").returncode == 0
    first_text = metrics.read_text()
    first = _samples(first_text)
    assert stat.S_IMODE(metrics.stat().st_mode) == 0o644
    assert first["pibackup_last_run_ok"] == "1"
    assert first["pibackup_last_run_saved"] == "1"
    assert first["pibackup_last_success_timestamp_seconds"] == (
        first["pibackup_last_run_timestamp_seconds"])
    assert first["pibackup_backups"] == "1"
    assert int(first["pibackup_destination_total_bytes"]) > 0
    assert f'destination="{ws.dest}"' in metrics.read_text()
    assert any(k.startswith("pibackup_source_bytes") and 'source="alpha"' in k for k in first)
    # The collector's own parser reads it, every sample labelled with the destination.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(first_text)}
    assert {"pibackup_last_run_timestamp_seconds", "pibackup_last_success_timestamp_seconds",
            "pibackup_last_run_ok", "pibackup_last_run_saved",
            "pibackup_last_run_duration_seconds", "pibackup_snapshot_window_seconds",
            "pibackup_source_bytes", "pibackup_destination_free_bytes",
            "pibackup_destination_total_bytes", "pibackup_backups"} <= set(families)
    report = ws.report()
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert samples["pibackup_last_run_ok"].value == 1
    assert samples["pibackup_last_run_duration_seconds"].value == report["duration_s"]
    assert all(s.labels["destination"] == str(ws.dest)
               for f in families.values() for s in f.samples)
    # A failed run: ok 0, the last success kept from the previous file.
    _config(ws, ping_server.url(), fail=True, metrics=str(metrics))
    assert ws.run("run").returncode == 1
    second = _samples(metrics.read_text())
    assert second["pibackup_last_run_ok"] == "0"
    assert second["pibackup_last_run_saved"] == "0"
    assert second["pibackup_last_success_timestamp_seconds"] == (
        first["pibackup_last_success_timestamp_seconds"])
    assert float(second["pibackup_last_run_timestamp_seconds"]) > float(
        first["pibackup_last_run_timestamp_seconds"])
    assert [p.name for p in metrics.parent.iterdir()] == ["pibackup.prom"]


def test_a_ping_url_that_is_not_http_is_refused(ws: Workspace) -> None:
    _config(ws, "ftp://example.com/x")
    result = ws.run("check")
    assert result.returncode == 2
    assert "monitor.ping_url" in result.stderr


def test_check_connect_asks_the_ping_server_without_pinging(
    ws: Workspace, ping_server: PingServer
) -> None:
    _config(ws, ping_server.url())
    result = ws.run("check", "--connect")
    assert result.returncode == 0, result.stderr
    assert [(h.method, h.path) for h in ping_server.hits] == [("HEAD", "/")]
    ping_server.hits.clear()
    _config(ws, "http://127.0.0.1:9/ping")  # discard port: nothing listens
    result = ws.run("check", "--connect")
    assert result.returncode == 1
    assert "monitor ping server" in result.stderr
    assert os.path.exists(ws.config_path)
