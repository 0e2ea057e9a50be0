"""The emailed run report (SPEC §6): a body a person reads on a phone, sent over SMTP.

The text comes from ``mail_body`` (pure). Delivery retries what may pass
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

import socket
import sys
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.lowlevel
import structlog

from .durations import parse_duration
from .errors import PibackupError, describe
from .mail_body import (
    render_body,
    render_subject,
)
from .report import Delivery, Report, encode_report
from .secret_env import secret

if TYPE_CHECKING:
    import ssl
    from email.message import EmailMessage
    from email.policy import Policy

    import aiosmtplib

    from .config import ReportSettings, Smtp

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

class MailError(PibackupError):
    """The mail settings cannot be used as they stand (an unreadable password file, say)."""


# --- when -------------------------------------------------------------------------------


def build_message(settings: ReportSettings, report: Report, *, host: str) -> EmailMessage:
    """Subject, plain body (with a monospaced HTML twin) and the JSON report attached.

    The attachment is the report as it stands now, so its ``delivery`` is
    not final.
    """
    body = render_body(report, host=host)
    message = _envelope(settings, render_subject(report, host=host), body, host)
    message.add_attachment(encode_report(report), maintype="application", subtype="json",
                           filename=f"{report.name}.json")
    return message


def _envelope(settings: ReportSettings, subject: str, body: str, host: str) -> EmailMessage:
    import html
    from email.message import EmailMessage
    from email.utils import format_datetime, make_msgid

    message = EmailMessage()
    message["Subject"] = _Subject(subject)
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


# RFC 2047: an encoded word holds at most 75 characters.
_WORD_CAP = 75


class _Subject(str):
    """The Subject header, encoded and folded here rather than by the email package.

    The email package's folding (CPython 3.11) writes an empty encoded word
    (``=?utf-8?q??=``) when a non-ASCII character falls just before a line's
    end: an invalid header that some mail clients show raw. An email policy
    folds a header object (a value with ``name`` and ``fold``) by calling its
    ``fold``; this one keeps plain ASCII words as they are, writes each run of
    other words as encoded words, and folds only between them.
    """

    name = "Subject"

    def fold(self, *, policy: Policy) -> str:
        limit = policy.max_line_length or sys.maxsize
        head = f"{self.name}:"
        lines = [head]
        for atom in _atoms(str(self)):
            if lines[-1] != head and len(lines[-1]) + 1 + len(atom) > limit:
                lines.append("")
            lines[-1] += " " + atom
        return policy.linesep.join(lines) + policy.linesep


def _atoms(text: str) -> list[str]:
    """The words of ``text``, each run of words that are not plain ASCII as encoded words.

    A run is encoded as one text: the space between two encoded words is
    dropped by the reader, the one inside an encoded word is not.
    """
    atoms: list[str] = []
    run: list[str] = []
    for word in text.split():
        if word.isascii() and word.isprintable() and "=?" not in word:
            atoms += _encoded(" ".join(run)) if run else []
            run = []
            atoms.append(word)
        else:
            run.append(word)
    return atoms + (_encoded(" ".join(run)) if run else [])


def _encoded(text: str) -> list[str]:
    """``text`` as UTF-8 encoded words of at most _WORD_CAP characters, cut between characters."""
    from email.charset import Charset

    utf8 = Charset("utf-8")
    words: list[str] = []
    chunk = ""
    for char in text:
        if chunk and len(utf8.header_encode(chunk + char)) > _WORD_CAP:
            words.append(utf8.header_encode(chunk))
            chunk = ""
        chunk += char
    return [*words, utf8.header_encode(chunk)]


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
        value = secret(smtp.password_env)
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
        except (aiosmtplib.SMTPException, OSError, ValueError) as e:
            # ValueError: a host name the resolver refuses before asking anyone
            # (UnicodeError: a label longer than IDNA's 63 characters).
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


def _traceback(error: BaseException, secrets: _Secrets) -> str:
    """The traceback for ``-v``, as plain text without the password: a logged exception
    would be drawn with each frame's variables, the login's password among them."""
    import traceback

    return secrets.scrub("".join(traceback.format_exception(error)))


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


def _server(smtp: Smtp, host: str) -> tuple[_Secrets, _Server]:
    """The server to talk to, and what to scrub from whatever it says; MailError if the
    password cannot be read."""
    password = read_password(smtp)
    return _Secrets(smtp.username, password), _Server(smtp, password, host)


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
    secrets = _Secrets(settings.smtp.username, None)
    try:
        secrets, server = _server(settings.smtp, host)
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
                last = secrets.scrub(f"{server.where}: unexpected error: {describe(e)}")
                log.debug("unexpected error in the mail delivery",
                          traceback=_traceback(e, secrets))
                log.error("report delivery failed unexpectedly", error=last)
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
    secrets = _Secrets(settings.smtp.username, None)
    try:
        secrets, server = _server(settings.smtp, host)
        message = None
        if send_test:
            body = (f"This is a test message from pibackup-async on {host}.\n"
                    "If you can read it, the run reports will reach you.\n")
            message = _envelope(settings, f"[pibackup] test message from {host}", body, host)
        await server.session(message, settings.sender, settings.to)
    except (MailError, _Failure) as e:
        return secrets.scrub(str(e))
    except Exception as e:  # the boundary: `check` says what failed, in one line
        log.debug("unexpected error in the mail check", traceback=_traceback(e, secrets))
        return secrets.scrub(f"unexpected error: {describe(e)}")
    log.info("smtp check passed", server=server.where, sent_test=send_test)
    return None
