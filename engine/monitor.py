"""Watching the runs from outside (SPEC §8): a dead man's switch ping and Prometheus metrics.

The ping follows the healthchecks.io convention (also served by self-hosted
healthchecks): ``<ping_url>/start`` once the lock is taken, then
``<ping_url>`` when the run is ``ok`` or ``<ping_url>/fail`` otherwise, with
the mail's plain-text body (cut to 10 kB). Each try is bounded; a 5xx, no
answer or a connection error is tried again (3 tries in all), a 4xx fails at
once; redirects are followed (5 at most); https certificates are verified.
The standard library's HTTP client runs in a worker thread: one small
request a run does not justify another dependency.

The metrics file is for the node exporter's textfile collector, replaced
atomically after every run.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import anyio
import structlog

from .errors import DeliveryError, describe, map_errors
from .report import Delivery, MirrorReport

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from .report import Report

log = structlog.get_logger("pibackup.monitor")

PING_BOUND_S = 10.0
PING_TRIES = 3
BODY_CAP = 10_000
MAX_REDIRECTS = 5
_RETRY_WAIT_S = 1.0


def ping_target(url: str, suffix: str) -> str:
    """``url`` with ``/start`` or ``/fail`` appended to its path, before any query string."""
    if not suffix:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix))


def _request(url: str, body: bytes | None, method: str) -> int:
    # Imported here: urllib.request (http.client, email) costs a run without
    # [monitor] ~10 ms of start-up.
    import urllib.error
    import urllib.request

    class _Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = MAX_REDIRECTS

    opener = urllib.request.build_opener(_Redirects)
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"User-Agent": "pibackup-async"})
    with _ping_errors():
        try:
            with opener.open(request, timeout=PING_BOUND_S) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)


def _ping_errors() -> AbstractContextManager[None]:
    """The HTTP client's errors as DeliveryErrors saying what went wrong, in one line.

    urllib wraps only the connection's errors (URLError, an OSError); a
    server that answers something other than HTTP raises http.client's own
    (BadStatusLine), a bad URL or host name a ValueError (UnicodeError for a
    host name too long for IDNA).
    """
    import http.client

    return map_errors({
        TimeoutError: lambda e: DeliveryError(f"no answer within {PING_BOUND_S:g} s"),
        # Before HTTPException: a server that hangs up unanswered (RemoteDisconnected) is both.
        OSError: lambda e: DeliveryError(f"cannot reach it: {_reason(e)}"),
        http.client.HTTPException: lambda e: DeliveryError(f"not an HTTP answer: {describe(e)}"),
        ValueError: lambda e: DeliveryError(f"cannot reach it: {describe(e)}"),
    })


def _reason(error: Exception) -> str:
    # URLError carries the connection's own error (or a text) as its reason.
    reason = getattr(error, "reason", None) or error
    return describe(reason) if isinstance(reason, BaseException) else " ".join(str(reason).split())


async def ping(url: str, suffix: str, body: bytes | None = None) -> Delivery:
    """Ping ``url`` + ``suffix``; ``sent`` only on a 2xx reply. Never raises for the network."""
    target = ping_target(url, suffix)
    problem = "not tried"
    for attempt in range(1, PING_TRIES + 1):
        try:
            with anyio.fail_after(PING_BOUND_S + 1):
                code = await anyio.to_thread.run_sync(
                    _request, target, body, "POST" if body is not None else "GET",
                    abandon_on_cancel=True)
        except TimeoutError:
            problem = f"no answer within {PING_BOUND_S:g} s"
        except DeliveryError as e:
            problem = str(e)
        except Exception as e:
            # A bug, or an error no one foresaw: the ping fails, the run does not.
            log.debug("unexpected error in the ping", exc_info=True)
            problem = f"unexpected error: {describe(e)}"
            break
        else:
            if 200 <= code < 300:
                log.info("monitor pinged", url=redact(url, suffix), attempt=attempt)
                return Delivery(status="sent")
            problem = f"HTTP {code}"
            if 400 <= code < 500:
                break
        if attempt < PING_TRIES:
            await anyio.sleep(_RETRY_WAIT_S * attempt)
    error = f"ping {redact(url, suffix)} failed: {problem}"
    log.error("monitor not pinged", error=error)
    return Delivery(status="failed", error=error)


def redact(url: str, suffix: str = "") -> str:
    """``url`` (with ``suffix``) as logs and plans show it: ``http://127.0.0.1:8000/…/fail``.

    A ping URL is a secret of sorts (anyone holding it can ping): its path,
    query and userinfo are hidden. Scheme, host and port stay, since a wrong
    one is what a user most needs to see.
    """
    parts = urlsplit(url)
    where = parts.netloc.rpartition("@")[2].lower()
    return f"{parts.scheme}://{where}/…{suffix}{'?…' if parts.query else ''}"


async def check_ping_server(url: str) -> str | None:
    """``check --connect``: a HEAD of ``scheme://host/`` (DNS, TCP, TLS); None if it answers."""
    parts = urlsplit(url)
    root = urlunsplit((parts.scheme, parts.netloc, "/", "", ""))
    try:
        with anyio.fail_after(PING_BOUND_S + 1):
            await anyio.to_thread.run_sync(_request, root, None, "HEAD", abandon_on_cancel=True)
    except TimeoutError:
        return f"{root}: no answer within {PING_BOUND_S:g} s"
    except DeliveryError as e:
        return f"{root}: {e}"
    except Exception as e:
        log.debug("unexpected error in the ping server's check", exc_info=True)
        return f"{root}: unexpected error: {describe(e)}"
    return None


# --- the Prometheus textfile ---------------------------------------------------------------

_SUCCESS = re.compile(r"^pibackup_last_success_timestamp_seconds\{[^}]*\} (\S+)$", re.M)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(report: Report, destination: str, *, end_s: float,
                   previous_success_s: float | None, backups: int | None) -> str:
    """The file's text: one sample a line, each labelled with the destination.

    A mirror's (SPEC §10) has the run's ``pibackup_last_run_*`` but ``_saved``,
    no window or sources' bytes, and ``pibackup_mirror_lag_seconds`` (absent
    while the mirror holds no backup).
    """
    mirror = report if isinstance(report, MirrorReport) else None
    run = report if mirror is None else None
    dest = f'destination="{_label(destination)}"'
    ok = report.status == "ok"
    success = end_s if ok else previous_success_s
    lines: list[str] = []

    def metric(name: str, help_text: str, value: float | None, kind: str = "gauge") -> None:
        if value is None:
            return
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                      f"{name}{{{dest}}} {_number(value)}"])

    metric("pibackup_last_run_timestamp_seconds", "When the last run ended.", end_s)
    metric("pibackup_last_success_timestamp_seconds", "When the last successful run ended.",
           success)
    metric("pibackup_last_run_ok", "1 if the last run's status was ok.", int(ok))
    if run is not None:
        metric("pibackup_last_run_saved", "1 if the last run saved its backup.", int(run.saved))
    metric("pibackup_last_run_duration_seconds", "How long the last run took.",
           report.duration_s)
    if run is not None:
        metric("pibackup_snapshot_window_seconds", "How long the snapshot hooks' window lasted.",
               run.snapshot_window_s)
        lines += ["# HELP pibackup_source_bytes Bytes the last run wrote for each source.",
                  "# TYPE pibackup_source_bytes gauge"]
        for name, source in run.sources.items():
            lines.append(f'pibackup_source_bytes{{{dest},source="{_label(name)}"}} {source.bytes}')
    space = report.destination
    metric("pibackup_destination_free_bytes", "Free bytes on the destination.",
           None if space is None else space.free_bytes)
    metric("pibackup_destination_total_bytes", "Size of the destination's filesystem.",
           None if space is None else space.total_bytes)
    metric("pibackup_backups", "Complete backups after retention.", backups)
    if mirror is not None:
        metric("pibackup_mirror_lag_seconds",
               "The newest origin backup's time minus the newest mirrored one's.", mirror._lag_s)
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def previous_success(path: str) -> float | None:
    """``pibackup_last_success_timestamp_seconds`` of the file as it is, if any."""
    try:
        with open(path, encoding="utf-8") as f:
            match = _SUCCESS.search(f.read())
    except (OSError, UnicodeDecodeError):
        return None
    if match is None:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


def replace_file(path: str, text: str) -> None:
    """Write ``path`` atomically, mode 0644, through a temporary name that does not end in
    ``.prom`` (the collector must never read a half-written file). Raises OSError."""
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, text.encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    os.close(fd)
    os.replace(partial, path)
