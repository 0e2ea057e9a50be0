"""The emailed run report (SPEC §6): a body a person reads on a phone, sent over SMTP.

Rendering is pure: the same report and host always give the same text, so a
golden file can pin what a person reads. Delivery retries what may pass
(connection refused or reset, timeouts, 4xx replies) and never what will not
(5xx, a refused login, a certificate that does not verify); every attempt is
bounded by ``smtp.timeout`` and all of them together by a total, so a dead
mail server cannot hang the nightly run. Delivery problems are returned, never
raised: the backup's own status must stay visible whatever the mail server does.

aiosmtplib, ssl and the email package are imported inside the functions that
send: a run without ``[report]`` (or with ``--no-report``) does not pay for
them (NOTES: import cost). aiosmtplib is asyncio-only (NOTES pitfall 4).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.lowlevel
import structlog

from .durations import format_duration, parse_duration
from .errors import PibackupError
from .processes import describe_exit
from .report import Delivery, Report, encode_report

if TYPE_CHECKING:
    import ssl
    from email.message import EmailMessage

    import aiosmtplib

    from .config import ReportSettings, Smtp
    from .report import Step

log = structlog.get_logger("pibackup.mail")

_E = TypeVar("_E", bound=BaseException)

DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
ATTEMPTS = 3
# Waits between attempts, as fractions of ``smtp.timeout``: the timeout is the
# user's word on how patient to be, and it keeps the total bound proportional
# (3 attempts of 30 s plus 6 s and 18 s of waiting: under two minutes).
_BACKOFF_FRACTIONS = (0.2, 0.6)
# A successful send is followed by QUIT; a server that never answers it must
# not turn a delivered message into a failure, nor hold the run.
_QUIT_BOUND_S = 2.0

# What the body shows of a failure: enough to act on, short enough for a phone.
TAIL_LINES = 10
LINE_CAP = 160
COMMAND_CAP = 300
SUBJECT_FAILURE_CAP = 70
_CUT_MARK = re.compile(r"^\[(\d+) earlier lines cut\]$")


class MailError(PibackupError):
    """The mail settings cannot be used as they stand (an unreadable password file, say)."""


# --- when -------------------------------------------------------------------------------


def should_send(settings: ReportSettings | None, status: str, no_report: bool) -> bool:
    """Whether this run's report is mailed: ``[report]`` present, ``when`` allows it.

    ``when = "failure"`` covers every run that is not ok, interrupted ones
    included; ``--no-report`` (``no_report``) suppresses the mail only.
    """
    if settings is None or no_report or settings.when == "never":
        return False
    return settings.when == "always" or status != "ok"


# --- rendering ----------------------------------------------------------------------------


def render_subject(report: Report) -> str:
    """``[pibackup] OK <name> — 4 sources, 3m12s``, ``FAILED <name> — <failure>``, …"""
    if report.status == "ok":
        count = len(report.sources)
        what = f"{count} source{'' if count == 1 else 's'}, {_duration(report.duration_s)}"
        return f"[pibackup] OK {report.name} — {what}"
    if report.status == "interrupted":
        saved = "backup saved" if report.saved else "no backup saved"
        return (f"[pibackup] INTERRUPTED {report.name} — after "
                f"{_duration(report.duration_s)}, {saved}")
    failure = _first_line(report.failure or "failed")
    if len(failure) > SUBJECT_FAILURE_CAP:
        cut = failure[:SUBJECT_FAILURE_CAP].rsplit(" ", 1)[0]
        failure = cut.rstrip(" ,;:") + "…"
    return f"[pibackup] FAILED {report.name} — {failure}"


def render_body(report: Report, *, host: str) -> str:
    """The plain-text body, laid out for a phone screen; deterministic for a given report."""
    sections = [
        _headline(report),
        _facts(report, host),
        _hook_table(report),
        _source_table(report),
        _failures(report),
        _timing(report),
        _retention(report),
        _space(report),
        ["The JSON report is attached."],
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def _headline(report: Report) -> list[str]:
    saved = "the backup was saved" if report.saved else "no backup was saved"
    lines = [f"{report.status.upper()} — {saved}"]
    if report.failure is not None:
        lines.append(report.failure)
    if _space_is_short(report):
        lines.append("Warning: the destination is running out of space (see below).")
    return lines


def _facts(report: Report, host: str) -> list[str]:
    return [
        f"Backup    {report.name}",
        f"Host      {host}",
        f"Started   {_clock(report.start)}",
        f"Ended     {_clock(report.end)}",
        f"Duration  {_duration(report.duration_s)}",
    ]


def _hook_table(report: Report) -> list[str]:
    if not report.hooks:
        return []
    lines = ["Hooks, in the order they ran"]
    for h in report.hooks:
        lines.append(f"  {h.status:<9} {_duration(h.duration_s):>6}  {h.phase:<4}  {h.hook}")
    return lines


def _source_table(report: Report) -> list[str]:
    lines = ["Sources"]
    for name, s in report.sources.items():
        steps = [s.snapshot] + ([s.save] if s.save is not None else [])
        spent = [st.duration_s for st in steps if st.duration_s is not None]
        took = _duration(sum(spent)) if spent else "-"
        lines.append(f"  {s.status:<9} {took:>6} {human_bytes(s.bytes):>10}  {name}")
    lines.append(f"  {'written':<16} {human_bytes(_written(report)):>10}")
    return lines


def _failures(report: Report) -> list[str]:
    failed: list[tuple[str, Step]] = [
        (f'hook "{h.hook}" {h.phase}', h) for h in report.hooks if h.status == "failed"]
    for name, s in report.sources.items():
        for kind, step in (("snapshot", s.snapshot), ("save", s.save)):
            if step is not None and step.status == "failed":
                failed.append((f'source "{name}" {kind}', step))
    if not failed:
        return []
    lines = ["Failures"]
    for what, step in failed:
        how = "failed" if step.exit_code is None else describe_exit(step.exit_code)
        lines.append(f"  {what}: {how}")
        if step.command:
            lines.append(f"    $ {_cap(shlex.join(step.command), COMMAND_CAP)}")
        tail = _tail(step.stderr_tail)
        lines += [f"    | {line}" for line in tail] if tail else ["    (no output)"]
    return lines


def _tail(text: str) -> list[str]:
    """The last TAIL_LINES lines, each capped, with a mark where earlier ones were cut."""
    lines = text.splitlines()
    dropped = 0
    if lines and (mark := _CUT_MARK.match(lines[0])):
        dropped, lines = int(mark.group(1)), lines[1:]
    while lines and not lines[-1].strip():
        lines.pop()
    kept = lines[-TAIL_LINES:]
    dropped += len(lines) - len(kept)
    head = [f"[{dropped} earlier lines cut]"] if dropped else []
    return head + [_cap(line, LINE_CAP) for line in kept]


def _timing(report: Report) -> list[str]:
    window = report.snapshot_window_s
    lines = ["Timing", f"  snapshot window  {_duration(window)}"]
    work = report.source_seconds_total
    wall = _source_wall_seconds(report)
    if wall is not None and wall > 0:
        lines.append(f"  source work      {format_duration(work)} in {format_duration(wall)}, "
                     f"concurrency {report.concurrency}")
    else:
        lines.append(f"  source work      {format_duration(work)}, "
                     f"concurrency {report.concurrency}")
    return lines


def _source_wall_seconds(report: Report) -> float | None:
    """How long the snapshot and save phases took on the clock (the sum of both spans)."""
    total, seen = 0.0, False
    for phase in ("snapshot", "save"):
        starts, ends = [], []
        for s in report.sources.values():
            step = s.snapshot if phase == "snapshot" else s.save
            if step is not None and step.start is not None and step.end is not None:
                starts.append(datetime.fromisoformat(step.start))
                ends.append(datetime.fromisoformat(step.end))
        if starts:
            seen = True
            total += (max(ends) - min(starts)).total_seconds()
    return total if seen else None


def _retention(report: Report) -> list[str]:
    r = report.retention
    if not r.kept and not r.deleted and not r.errors:
        why = "" if report.saved else " (no backup was saved)"
        return [f"Retention: not applied{why}"]
    lines = [f"Retention: kept {len(r.kept)}, deleted {len(r.deleted)}"]
    lines += [f"  deleted  {name}" for name in sorted(r.deleted, reverse=True)]
    lines += [f"  kept     {name}  {', '.join(r.kept[name])}"
              for name in sorted(r.kept, reverse=True)]
    lines += [f"  error    {error}" for error in r.errors]
    return lines


def _written(report: Report) -> int:
    return sum(s.bytes for s in report.sources.values())


def _space_is_short(report: Report) -> bool:
    d = report.destination
    return d is not None and d.free_bytes < _written(report)


def _space(report: Report) -> list[str]:
    d = report.destination
    if d is None:
        return ["Destination: not visible after the run; free space unknown"]
    share = f" ({d.free_bytes * 100 // d.total_bytes}%)" if d.total_bytes else ""
    lines = [f"Destination: {human_bytes(d.free_bytes)} free of "
             f"{human_bytes(d.total_bytes)}{share}"]
    if _space_is_short(report):
        lines += [
            f"WARNING: less free space than this backup wrote ({human_bytes(_written(report))}).",
            "The next run may not fit, and a full disk fails every run until someone acts.",
        ]
    return lines


def human_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``120 MiB``, ``3.4 GiB`` (binary units)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _clock(iso: str | None) -> str:
    if iso is None:
        return "-"
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S %z")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [cut]"


# --- the message ---------------------------------------------------------------------------


def build_message(settings: ReportSettings, report: Report, *, host: str) -> EmailMessage:
    """Subject, plain body (with a monospaced HTML twin) and the JSON report attached.

    The attachment is the report as it stands now, so its ``delivery`` is
    not final.
    """
    body = render_body(report, host=host)
    message = _envelope(settings, render_subject(report), body, host)
    message.add_attachment(encode_report(report), maintype="application", subtype="json",
                           filename=f"{report.name}.json")
    return message


def _envelope(settings: ReportSettings, subject: str, body: str, host: str) -> EmailMessage:
    import html
    from email.message import EmailMessage
    from email.utils import format_datetime, make_msgid

    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = settings.sender
    message["To"] = ", ".join(settings.to)
    message["Date"] = format_datetime(datetime.now().astimezone())
    # A domain given, so make_msgid does not ask DNS for our name (slow on a Pi).
    message["Message-ID"] = make_msgid(domain=_ehlo_name(host))
    message.set_content(body)
    # Phone mail apps show plain text in a proportional font, which breaks the
    # table's columns; the HTML twin is the same text, monospaced and wrapped.
    message.add_alternative(
        '<html><body><pre style="font-family: monospace; white-space: pre-wrap">'
        f"{html.escape(body)}</pre></body></html>\n", subtype="html")
    return message


# --- delivery --------------------------------------------------------------------------------


def read_password(smtp: Smtp) -> str | None:
    """The SMTP password from ``password_file`` (trailing newline stripped) or ``password_env``.

    None when neither is configured. Raises MailError when the file cannot
    be read or the variable is not set; the message never holds the password.
    """
    if smtp.password_file is not None:
        try:
            with open(smtp.password_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise MailError(f"cannot read report.smtp.password_file {smtp.password_file}: "
                            f"{e.strerror}") from None
        except UnicodeDecodeError:
            raise MailError(f"report.smtp.password_file {smtp.password_file} is not "
                            "UTF-8 text") from None
        return text.removesuffix("\n").removesuffix("\r")
    if smtp.password_env is not None:
        value = os.environ.get(smtp.password_env)
        if value is None:
            raise MailError(f"report.smtp.password_env: the environment variable "
                            f"{smtp.password_env} is not set")
        return value
    return None


class _Failure(Exception):
    """One attempt's failure, in one line, and whether another attempt may pass."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


class _Secrets:
    """Replaces the password (and its AUTH encodings) wherever text leaves this module."""

    def __init__(self, username: str | None, password: str | None) -> None:
        import base64

        self._words: list[str] = []
        if password:
            raw = password.encode()
            self._words = sorted({
                password,
                base64.b64encode(raw).decode(),
                base64.b64encode(f"\0{username or ''}\0{password}".encode()).decode(),
            }, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for word in self._words:
            text = text.replace(word, "[password]")
        return text


class _Server:
    """One SMTP server as the settings describe it, and how to talk to it once."""

    def __init__(self, smtp: Smtp, password: str | None, host: str) -> None:
        if smtp.username is not None and password is None:
            raise MailError("report.smtp.username is set but neither password_file nor "
                            "password_env is")
        self.smtp = smtp
        self.password = password
        self.port = smtp.port or DEFAULT_PORTS[smtp.security]
        self.where = f"{smtp.host}:{self.port}"
        self.timeout = parse_duration(smtp.timeout)
        self.local_hostname = _ehlo_name(host)
        self.tls = None if smtp.security == "none" else _tls_context(smtp.ca_file)

    async def session(self, message: EmailMessage | None, sender: str,
                      recipients: list[str]) -> None:
        """Connect, secure, log in and (with a message) send it; raise _Failure.

        The whole attempt is bounded by ``smtp.timeout``.
        """
        import aiosmtplib

        client = _client_class()(
            hostname=self.smtp.host, port=self.port, use_tls=self.smtp.security == "tls",
            start_tls=False, tls_context=self.tls, timeout=self.timeout,
            local_hostname=self.local_hostname)
        stage = f"connecting to {self.where}"
        try:
            with anyio.fail_after(self.timeout):
                await client.connect()
                if self.smtp.security == "starttls":
                    stage = f"starting TLS with {self.where}"
                    await client.starttls()
                if self.smtp.username is not None:
                    stage = f"logging in to {self.where} as {self.smtp.username}"
                    await client.login(self.smtp.username, self.password or "")
                if message is not None:
                    stage = f"sending through {self.where}"
                    refused, _ = await client.send_message(
                        message, sender=sender, recipients=recipients)
                    if refused:
                        raise _Failure(f"{stage}: recipients refused: "
                                       f"{_refusals(refused)}", transient=False)
        except TimeoutError:
            raise _Failure(f"{stage}: no answer within {self.smtp.timeout}",
                           transient=True) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            raise _classify(stage, e) from None
        finally:
            await _close(client)


async def _close(client: aiosmtplib.SMTP) -> None:
    # Shielded and bounded: a delivered message stays delivered even if the
    # goodbye is cut short.
    with anyio.move_on_after(_QUIT_BOUND_S, shield=True):
        if client.is_connected:
            try:
                await client.quit()
            except Exception:
                pass
        client.close()
        # One turn of the loop, so the aborted socket is really closed before
        # the caller (and perhaps the event loop) moves on.
        await anyio.lowlevel.checkpoint()


_CLIENT: type[aiosmtplib.SMTP] | None = None


def _client_class() -> type[aiosmtplib.SMTP]:
    """aiosmtplib's client, but closing aborts the connection instead of a TLS goodbye.

    aiosmtplib's ``close()`` is synchronous: on a TLS connection it starts a
    graceful shutdown that waits (up to 30 s) for the server's close_notify
    in the background. A silent or vanished server never sends it, and the
    socket outlives the delivery (a ResourceWarning when the loop is gone).
    Once we close, there is nothing left to say: QUIT was answered, or the
    attempt has failed. So the transport is aborted, which closes the socket
    on the next turn of the loop.
    """
    global _CLIENT
    if _CLIENT is None:
        import asyncio

        import aiosmtplib

        class _AbortingSMTP(aiosmtplib.SMTP):
            def close(self) -> None:
                transport = self.transport
                super().close()
                if isinstance(transport, asyncio.Transport):
                    transport.abort()

        _CLIENT = _AbortingSMTP
    return _CLIENT


def _ehlo_name(host: str) -> str:
    return host if host and not any(c.isspace() or ord(c) < 33 for c in host) else "localhost"


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The system's trust plus ``ca_file``; certificates and host names always checked."""
    import ssl

    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
            raise MailError(f"cannot use report.smtp.ca_file {ca_file}: {reason}") from None
    return context


def _refusals(refused: dict[str, aiosmtplib.SMTPResponse]) -> str:
    return "; ".join(f"{rcpt} ({r.code} {_one_line(r.message)})" for rcpt, r in refused.items())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _classify(stage: str, exc: BaseException) -> _Failure:
    """Map an aiosmtplib or socket error to one line and whether to try again."""
    import ssl

    import aiosmtplib

    unverified = _cause(exc, ssl.SSLCertVerificationError)
    if unverified is not None:
        return _Failure(f"{stage}: TLS failed: the server's certificate is not trusted "
                        f"({unverified.verify_message}); a private CA goes in "
                        "report.smtp.ca_file", transient=False)
    tls_error = _cause(exc, ssl.SSLError)
    if tls_error is not None:
        reason = getattr(tls_error, "reason", None) or str(tls_error)
        return _Failure(f"{stage}: TLS failed: {_one_line(str(reason))}", transient=False)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return _Failure(f"{stage}: login refused: {exc.code} {_one_line(exc.message)}",
                        transient=False)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        text = "; ".join(f"{r.recipient} ({r.code} {_one_line(r.message)})"
                         for r in exc.recipients)
        return _Failure(f"{stage}: recipients refused: {text}",
                        transient=all(400 <= c < 500 for c in codes))
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _Failure(f"{stage}: the server answered {exc.code} {_one_line(exc.message)}",
                        transient=400 <= exc.code < 500)
    if isinstance(exc, TimeoutError):
        return _Failure(f"{stage}: no answer in time", transient=True)
    refused = _cause(exc, ConnectionRefusedError)
    if refused is not None:
        return _Failure(f"{stage}: connection refused", transient=True)
    reset = _cause(exc, ConnectionResetError)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected) or reset is not None:
        return _Failure(f"{stage}: the server closed the connection", transient=True)
    if isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
        cause = _cause(exc, OSError)
        detail = (cause.strerror if isinstance(cause, OSError) and cause.strerror
                  else _one_line(str(exc)))
        return _Failure(f"{stage}: {detail}", transient=True)
    # STARTTLS or AUTH not offered, and the like: asking again will not help.
    return _Failure(f"{stage}: {_one_line(str(exc))}", transient=False)


def _cause(exc: BaseException, kind: type[_E]) -> _E | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def total_bound_s(smtp: Smtp) -> float:
    """The longest delivery can take: every attempt's timeout, the waits, the goodbyes."""
    timeout = parse_duration(smtp.timeout)
    return (ATTEMPTS * timeout + sum(f * timeout for f in _BACKOFF_FRACTIONS)
            + ATTEMPTS * _QUIT_BOUND_S)


async def deliver_report(settings: ReportSettings, report: Report, *,
                         host: str | None = None) -> Delivery:
    """Mail the report to every recipient; return how it went, never raise for mail problems.

    The message is built from the report as it stands (its attachment's
    ``delivery`` is not final). Transient failures are retried with backoff
    up to ATTEMPTS times; 5xx replies, refused logins and TLS failures are
    not. The whole delivery is bounded by ``total_bound_s``. The password
    appears in neither the returned error nor the log.
    """
    host = host or socket.gethostname()
    smtp = settings.smtp
    secrets = _Secrets(smtp.username, None)
    try:
        password = read_password(smtp)
        secrets = _Secrets(smtp.username, password)
        server = _Server(smtp, password, host)
        message = build_message(settings, report, host=host)
    except Exception as e:  # MailError, or a header the email package refuses
        detail = str(e) if isinstance(e, MailError) else f"cannot build the message: {e}"
        problem = secrets.scrub(_one_line(detail))
        log.error("report not delivered", error=problem)
        return Delivery(status="failed", error=problem)
    error = await _send_with_retries(server, message, settings, secrets)
    if error is None:
        return Delivery(status="sent")
    log.error("report not delivered", error=error, to=settings.to)
    return Delivery(status="failed", error=error)


async def _send_with_retries(server: _Server, message: EmailMessage,
                             settings: ReportSettings, secrets: _Secrets) -> str | None:
    bound = total_bound_s(server.smtp)
    last: str | None = None
    attempt = 0
    with anyio.move_on_after(bound) as scope:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await server.session(message, settings.sender, settings.to)
            except _Failure as f:
                last = secrets.scrub(f.message)
                if not f.transient or attempt == ATTEMPTS:
                    break
                wait = _BACKOFF_FRACTIONS[attempt - 1] * server.timeout
                log.warning("report delivery failed; trying again", error=last,
                            attempt=attempt, retry_in_s=round(wait, 3))
                await anyio.sleep(wait)
            except Exception as e:  # the boundary: nothing from the mailer may end the run
                last = secrets.scrub(f"{server.where}: unexpected error: {_one_line(str(e))}")
                log.exception("report delivery failed unexpectedly", error=last)
                break
            else:
                log.info("report sent", to=settings.to, server=server.where, attempts=attempt)
                return None
    if scope.cancelled_caught:
        last = f"gave up after {bound:g}s" + (f"; last error: {last}" if last else "")
    plural = "s" if attempt != 1 else ""
    return f"after {attempt} attempt{plural}: {last}"


async def check_smtp(settings: ReportSettings, *, send_test: bool) -> str | None:
    """Connect, negotiate TLS and log in (and with ``send_test`` mail a short test message).

    One attempt, bounded by ``smtp.timeout``. Returns None when everything
    worked, else one line saying what did not (never holding the password).
    """
    host = socket.gethostname()
    smtp = settings.smtp
    secrets = _Secrets(smtp.username, None)
    try:
        password = read_password(smtp)
        secrets = _Secrets(smtp.username, password)
        server = _Server(smtp, password, host)
        message = None
        if send_test:
            body = (f"This is a test message from pibackup-async on {host}.\n"
                    "If you can read it, the run reports will reach you.\n")
            message = _envelope(settings, f"[pibackup] test message from {host}", body, host)
        await server.session(message, settings.sender, settings.to)
    except (MailError, _Failure) as e:
        return secrets.scrub(str(e))
    log.info("smtp check passed", server=server.where, sent_test=send_test)
    return None
