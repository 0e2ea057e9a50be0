"""A real SMTP server for the mail tests: aiosmtpd on 127.0.0.1, port 0, in a thread of its own.

The server runs on its own asyncio loop in a background thread, so the same
server serves in-process async tests (whose loop is the test's) and the CLI
run as a subprocess. It listens with ``loop.create_server`` on port 0, not
aiosmtpd's ``Controller`` (whose readiness probe connects to port 0: NOTES
pitfall 8).

- ``Pki``: a test CA (trustme) and a server certificate for 127.0.0.1 and
  localhost (an IP SAN, NOTES pitfall 9), plus a second, unrelated CA.
- ``MailServer``: STARTTLS, implicit TLS or plain; AUTH for one user (any
  MAIL before a successful AUTH gets 530); ``refuse_data=n`` answers the
  first n DATA commands with 421, then accepts.
- ``silent_server()``: a TCP socket that listens and never says a word (the
  kernel completes the handshake from the backlog; nothing ever reads).
- ``free_port()``: a port where nothing listens (connection refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

if TYPE_CHECKING:
    from collections.abc import Iterator
    from email.message import EmailMessage
    from pathlib import Path

# aiosmtpd logs every connection, a deprecation notice for its own use of
# Session.login_data on every AUTH, and a traceback for every refused TLS
# handshake (which some tests cause on purpose); none of it concerns the tests.
logging.getLogger("mail.log").setLevel(logging.CRITICAL)

USER = "pibackup"
PASSWORD = "Tr0ub4dor&3-s3cret"  # distinctive, so a leak is found by a plain search
READY_TIMEOUT_S = 10.0

Security = Literal["starttls", "tls", "none"]


class Pki:
    """A CA that the tests trust through ``ca_file``, and one that nobody trusts."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.ca_file = folder / "test-ca.pem"
        self.other_ca_file = folder / "other-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.other_ca.cert_pem.write_to_path(str(self.other_ca_file))
        self._cert = self.ca.issue_cert("127.0.0.1", "localhost")

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        return context


@dataclass
class Received:
    """One message the server accepted, with how it came."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str | None
    tls: bool

    def message(self) -> EmailMessage:
        # SMTP carries CRLF line ends; a mail client shows them as plain line breaks.
        data = self.data.replace(b"\r\n", b"\n")
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        return parsed  # type: ignore[return-value]


@dataclass
class _Handler:
    server: MailServer

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.server.require_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.server.lock:
            self.server.data_commands += 1
            if self.server.refuse_data > 0:
                self.server.refuse_data -= 1
                return "421 4.3.2 Service busy, try again later"
            auth = session.auth_data
            self.server.messages.append(Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
                tls=session.ssl is not None or self.server.security == "tls",
            ))
        return "250 Message accepted"


class MailServer:
    """An aiosmtpd server on 127.0.0.1:<free port>, on its own loop in its own thread."""

    def __init__(self, pki: Pki | None, *, security: Security = "starttls",
                 user: str = USER, password: str = PASSWORD, require_auth: bool = True,
                 refuse_data: int = 0) -> None:
        if security != "none" and pki is None:
            raise ValueError("a TLS server needs a Pki")
        self.pki = pki
        self.security = security
        self.user, self.password = user, password
        self.require_auth = require_auth
        self.refuse_data = refuse_data
        self.lock = threading.Lock()
        self.messages: list[Received] = []
        self.logins: list[tuple[str, bool]] = []
        self.data_commands = 0
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._protocols: list[SMTP] = []

    # --- what a test reads -------------------------------------------------------------

    def smtp_table(self, **extra: str) -> str:
        """A ``[report.smtp]`` TOML table for this server (password_file/env via ``extra``)."""
        lines = ["[report.smtp]", 'host = "127.0.0.1"', f"port = {self.port}",
                 f'security = "{self.security}"']
        lines += [f"{key} = {value}" for key, value in extra.items()]
        return "\n".join(lines) + "\n"

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login == self.user.encode()
              and auth_data.password == self.password.encode())
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?"
        with self.lock:
            self.logins.append((login, ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # --- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> MailServer:
        self._thread = threading.Thread(target=self._serve, name="test-smtp", daemon=True)
        self._thread.start()
        if not self._ready.wait(READY_TIMEOUT_S):
            raise RuntimeError("the test SMTP server did not start")
        if self._error is not None:
            raise RuntimeError("the test SMTP server failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(READY_TIMEOUT_S)
            assert not thread.is_alive(), "the test SMTP server did not stop"

    def _factory(self) -> SMTP:
        assert self._loop is not None
        starttls = self.security == "starttls"
        assert self.pki is not None or not starttls
        protocol = SMTP(
            _Handler(self),
            hostname="localhost",
            tls_context=self.pki.server_context() if starttls and self.pki else None,
            require_starttls=starttls,
            # Implicit TLS is encrypted from the first byte, but aiosmtpd only
            # knows about STARTTLS; the plain server lets the insecure case be tested.
            auth_require_tls=starttls,
            authenticator=self.authenticate,
            loop=self._loop,
        )
        with self.lock:
            self.connections += 1
            self._protocols.append(protocol)
        return protocol

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            implicit = self.pki.server_context() if self.security == "tls" and self.pki else None
            server = loop.run_until_complete(
                loop.create_server(self._factory, host="127.0.0.1", port=0, ssl=implicit))
            self.port = server.sockets[0].getsockname()[1]
        except BaseException as e:  # reported to the starting thread
            self._error = e
            self._ready.set()
            loop.close()
            asyncio.set_event_loop(None)
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for protocol in self._protocols:
                transport = protocol.transport
                if transport is not None and not transport.is_closing():
                    transport.abort()
            loop.run_until_complete(server.wait_closed())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections (from the backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]
    finally:
        sock.close()


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Parts:
    """A received report message taken apart as a mail client would."""

    subject: str
    sender: str
    to: str
    text: str
    html: str | None
    attachments: dict[str, bytes] = field(default_factory=dict)


def parts(received: Received) -> Parts:
    message = received.message()
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert plain is not None, "the message has no text/plain body"
    attachments: dict[str, bytes] = {}
    for part in message.iter_attachments():
        content = part.get_content()
        attachments[part.get_filename() or ""] = (
            content if isinstance(content, bytes) else str(content).encode())
    return Parts(
        subject=str(message["Subject"]), sender=str(message["From"]), to=str(message["To"]),
        text=plain.get_content(), html=html.get_content() if html is not None else None,
        attachments=attachments,
    )
