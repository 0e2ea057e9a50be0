"""Emailed run reports (SPEC §6) over a real SMTP server: what a person reads, how it travels.

The server is aiosmtpd on 127.0.0.1 (tests/smtpkit.py) with its own CA
(trustme), STARTTLS or implicit TLS, and AUTH for one user. Rendering is
pinned by golden files built from hand-made reports (fixed times, fixed host);
set PIBACKUP_UPDATE_GOLDEN=1 to rewrite them after a deliberate change, then
read the diff as the person who gets the mail would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
import structlog
from conftest import needs_rsync, processes_mentioning, wait_for
from pibackup_async.engine.config import ReportSettings
from pibackup_async.engine.mail import (
    ATTEMPTS,
    check_smtp,
    deliver_report,
    read_password,
    total_bound_s,
)
from pibackup_async.engine.mail_body import (
    render_body,
    render_subject,
    short_host,
    should_send,
)
from pibackup_async.engine.report import (
    DestinationSpace,
    HookStep,
    Report,
    RetentionResult,
    SourceReport,
    Step,
    encode_report,
)
from pibackup_async.engine.units import human_bytes
from smtpkit import PASSWORD, USER, MailServer, Pki, Received, free_port, parts, silent_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Workspace

GOLDEN = Path(__file__).parent / "golden"
HOST = "piserver"
SENDER = "pibackup@piserver.local"
RECIPIENTS = ["admin@example.com", "oncall@example.com"]


# --- fixtures and builders ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "smtp-password"
    path.write_text(PASSWORD + "\n")  # as `echo secret > file` writes it
    path.chmod(0o600)
    return path


@pytest.fixture
def server(pki: Pki) -> Iterator[MailServer]:
    with MailServer(pki) as s:
        yield s


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def settings_for(port: int, *, security: str = "starttls", ca_file: Path | None = None,
                 password_file: Path | None = None, timeout: str = "5s",
                 when: str = "always", **smtp: Any) -> ReportSettings:
    table: dict[str, Any] = {"host": "127.0.0.1", "port": port, "security": security,
                             "username": USER, "timeout": timeout}
    if ca_file is not None:
        table["ca_file"] = str(ca_file)
    if password_file is not None:
        table["password_file"] = str(password_file)
    table.update(smtp)
    table = {k: v for k, v in table.items() if v is not None}
    return msgspec.convert({"from": SENDER, "to": RECIPIENTS, "when": when, "smtp": table},
                           ReportSettings)


def _step(start: str, end: str, duration: float, status: Any = "ok", *,
          command: list[str] | None = None, exit_code: int | None = 0,
          stderr: str = "") -> dict[str, Any]:
    return {"status": status, "start": start, "end": end, "duration_s": duration,
            "exit_code": exit_code, "stderr_tail": stderr, "command": command}


def _hook(name: str, kind: Any, phase: Any, start: str, end: str, duration: float,
          status: Any = "ok", **more: Any) -> HookStep:
    return HookStep(hook=name, kind=kind, phase=phase, **_step(start, end, duration, status,
                                                                 **more))


def _rsync(name: str, status: Any, size: int, snapshot: Step) -> SourceReport:
    return SourceReport(type="rsync", status=status, bytes=size, snapshot=snapshot, save=None)


def _at(day: str, clock: str) -> str:
    return f"2021-04-{day}T{clock}+02:00"


def ok_report() -> Report:
    """Four sources, three at once, retention applied, plenty of space."""
    d = "02"
    mount = ["/bin/sh", "-c", "mount /mnt/backup"]
    return Report(
        name="2021-04-02t07-00-12+0200", status="ok", saved=True,
        start=_at(d, "07:00:12.104233"), end=_at(d, "07:03:24.404233"), duration_s=192.3,
        concurrency=3, failure=None,
        hooks=[
            _hook("mount backup disk", "backup", "pre", _at(d, "07:00:12.110"),
                  _at(d, "07:00:12.522"), 0.412, command=mount),
            _hook("stop mariadb", "snapshot", "pre", _at(d, "07:00:12.600"),
                  _at(d, "07:00:13.804"), 1.204),
            _hook("start mariadb", "snapshot", "post", _at(d, "07:03:15.200"),
                  _at(d, "07:03:17.510"), 2.31),
            _hook("unmount backup disk", "backup", "post", _at(d, "07:03:24.100"),
                  _at(d, "07:03:24.388"), 0.288),
        ],
        sources={
            "data": _rsync("data", "ok", 1_288_490_189, Step(**_step(
                _at(d, "07:00:14.000"), _at(d, "07:03:15.200"), 181.2))),
            "boot": _rsync("boot", "ok", 41_943_040, Step(**_step(
                _at(d, "07:00:14.000"), _at(d, "07:00:20.500"), 6.5))),
            "root": _rsync("root", "ok", 734_003_200, Step(**_step(
                _at(d, "07:00:14.100"), _at(d, "07:02:10.100"), 116.0))),
            "www": _rsync("www", "ok", 5_120, Step(**_step(
                _at(d, "07:00:20.500"), _at(d, "07:00:21.300"), 0.8))),
        },
        snapshot_window_s=184.91, source_seconds_total=304.5,
        destination=DestinationSpace(free_bytes=120 * 2**30, total_bytes=916 * 2**30),
        retention=RetentionResult(
            kept={"2021-04-02t07-00-12+0200": ["newest", "keep_last", "keep_daily"],
                  "2021-04-01t07-00-09+0200": ["keep_last", "keep_daily"],
                  "2021-03-28t07-00-11+0200": ["keep_daily", "keep_weekly"]},
            deleted=["2021-03-21t07-00-10+0100"]),
    )


RSYNC_ARGV = ["rsync", "-aHAX", "--numeric-ids", "--sparse", "--stats",
              "--exclude=/mnt/backup", "/srv/data/", "/mnt/backup/2021-04-03t07-00-05+0200"
              ".in-progress/data/"]


def failed_report() -> Report:
    """A source fails (long stderr, cut), a post hook fails too, the disk is nearly full."""
    d = "03"
    stderr = "\n".join(
        ["[5 earlier lines cut]"]
        + [f'rsync: [sender] send_files failed to open "/srv/data/locked/file{i:02d}.db": '
           "Permission denied (13)" for i in range(14)]
        + ["rsync: [sender] read errors mapping \"/srv/data/" + "very-long-name-" * 20
           + '": Input/output error (5)',
           "rsync error: some files/attrs were not transferred (see previous errors) "
           "(code 23) at main.c(1338) [sender=3.2.7]"])
    return Report(
        name="2021-04-03t07-00-05+0200", status="failed", saved=False,
        start=_at(d, "07:00:05.500000"), end=_at(d, "07:00:48.200000"), duration_s=42.7,
        concurrency=2,
        failure='source "data" snapshot failed: rsync exited 23: rsync error: some '
                "files/attrs were not transferred (see previous errors) (code 23) at "
                "main.c(1338) [sender=3.2.7]",
        hooks=[
            _hook("mount backup disk", "backup", "pre", _at(d, "07:00:05.510"),
                  _at(d, "07:00:05.900"), 0.39),
            _hook("stop mariadb", "snapshot", "pre", _at(d, "07:00:06.000"),
                  _at(d, "07:00:07.100"), 1.1),
            _hook("start mariadb", "snapshot", "post", _at(d, "07:00:46.000"),
                  _at(d, "07:00:47.800"), 1.8, "failed", exit_code=1,
                  command=["systemctl", "start", "mariadb"],
                  stderr="Job for mariadb.service failed because the control process "
                         "exited with error code.\n"),
            _hook("unmount backup disk", "backup", "post", _at(d, "07:00:47.900"),
                  _at(d, "07:00:48.150"), 0.25),
        ],
        sources={
            "data": _rsync("data", "failed", 0, Step(**_step(
                _at(d, "07:00:07.200"), _at(d, "07:00:45.900"), 38.7, "failed",
                command=RSYNC_ARGV, exit_code=23, stderr=stderr))),
            "root": _rsync("root", "ok", 734_003_200, Step(**_step(
                _at(d, "07:00:07.200"), _at(d, "07:00:31.000"), 23.8))),
            "boot": _rsync("boot", "cancelled", 0, Step(**_step(
                _at(d, "07:00:31.000"), _at(d, "07:00:45.950"), 14.95, "cancelled",
                exit_code=None))),
            "www": SourceReport(type="rsync", status="skipped", bytes=0, snapshot=Step(),
                                save=None),
        },
        snapshot_window_s=41.8, source_seconds_total=77.45,
        destination=DestinationSpace(free_bytes=512 * 2**20, total_bytes=29 * 2**30),
    )


def interrupted_report() -> Report:
    report = failed_report()
    report.status = "interrupted"
    report.failure = None
    report.duration_s = 12.04
    return report


# --- when a report is mailed ------------------------------------------------------------------


@pytest.mark.parametrize(("when", "status", "no_report", "expected"), [
    ("always", "ok", False, True),
    ("always", "failed", False, True),
    ("always", "interrupted", False, True),
    ("failure", "ok", False, False),
    ("failure", "failed", False, True),
    ("failure", "interrupted", False, True),
    ("never", "ok", False, False),
    ("never", "failed", False, False),
    ("always", "failed", True, False),
    ("failure", "interrupted", True, False),
])
def test_should_send_follows_when_and_no_report(when: str, status: str, no_report: bool,
                                                expected: bool) -> None:
    settings = settings_for(25, when=when)
    assert should_send(settings, status, no_report) is expected


def test_nothing_is_sent_without_a_report_table() -> None:
    assert should_send(None, "failed", False) is False


# --- what a person reads -----------------------------------------------------------------------


def test_subjects_put_the_cause_first_and_the_name_last() -> None:
    # A phone shows one line: the host and what happened come first, the name last.
    assert render_subject(ok_report(), host=HOST) == (
        "[pibackup] OK piserver: 4 sources, 3m12s (2021-04-02t07-00-12+0200)")
    failed = render_subject(failed_report(), host=HOST)
    assert failed.startswith(
        '[pibackup] FAILED piserver: source "data" snapshot failed: rsync exited 23')
    assert failed.endswith("… (2021-04-03t07-00-05+0200)") and len(failed) < 130, failed
    assert render_subject(interrupted_report(), host=HOST) == (
        "[pibackup] INTERRUPTED piserver: after 12s, no backup saved "
        "(2021-04-03t07-00-05+0200)")
    one = ok_report()
    one.sources = {"data": one.sources["data"]}
    assert render_subject(one, host=HOST).endswith(": 1 source, 3m12s (2021-04-02t07-00-12+0200)")
    # The short host name: several machines share one mailbox.
    assert render_subject(ok_report(), host="pi.home.arpa").startswith("[pibackup] OK pi: ")


@pytest.mark.parametrize(("builder", "golden"), [
    (ok_report, "mail_ok.txt"),
    (failed_report, "mail_failed.txt"),
])
def test_body_matches_the_golden_text(builder: Any, golden: str) -> None:
    body = render_body(builder(), host=HOST)
    path = GOLDEN / golden
    if os.environ.get("PIBACKUP_UPDATE_GOLDEN"):
        path.write_text(body)
    assert body == path.read_text()


def test_ok_body_reads_as_a_person_would() -> None:
    lines = render_body(ok_report(), host=HOST).splitlines()
    assert lines[0] == "OK — the backup was saved"
    assert "Host      piserver" in lines
    assert "Started   2021-04-02 07:00:12 +0200" in lines
    assert "Ended     2021-04-02 07:03:24 +0200" in lines
    assert "Duration  3m12s" in lines
    assert "  ok          0.4s  pre   mount backup disk" in lines
    assert "  ok         3m01s    1.2 GiB  data" in lines
    assert "  ok          0.8s    5.0 KiB  www" in lines
    assert "  snapshot window  3m05s" in lines
    # 5m04s of work done in 3m01s of clock: what running three at once bought.
    assert "  source work      5m04s in 3m01s, concurrency 3" in lines
    assert "Retention: kept 3, deleted 1" in lines
    assert "  deleted  2021-03-21t07-00-10+0100" in lines
    assert "  kept     2021-04-02t07-00-12+0200  newest, keep_last, keep_daily" in lines
    assert "Destination: 120 GiB free of 916 GiB (13% free)" in lines
    assert not any("WARNING" in line or "Failures" in line for line in lines)
    # Narrow enough for a phone held upright (names and dates are what they are).
    assert max(len(line) for line in lines) <= 72


def test_failed_body_shows_each_failure_with_command_and_capped_stderr() -> None:
    body = render_body(failed_report(), host=HOST)
    lines = body.splitlines()
    assert lines[0] == "FAILED — no backup was saved"
    assert lines[1].startswith('source "data" snapshot failed: rsync exited 23')
    assert lines[2] == "Warning: the destination is running out of space (see below)."
    failures = lines[lines.index("Failures"):]
    assert failures[1] == '  hook "start mariadb" post: exit code 1'
    assert failures[2] == "    $ systemctl start mariadb"
    assert failures[3].startswith("    | Job for mariadb.service failed")
    assert failures[4] == '  source "data" snapshot: exit code 23'
    assert failures[5].startswith("    $ rsync -aHAX --numeric-ids")
    # 5 lines cut by the engine plus 6 more here: the last 10 of 21 remain.
    assert failures[6] == "    | [11 earlier lines cut]"
    stderr = failures[7:17]
    assert all(line.startswith("    | ") for line in stderr)
    assert stderr[-1].endswith("(code 23) at main.c(1338) [sender=3.2.7]")
    long_line = next(line for line in stderr if "very-long-name" in line)
    assert long_line.endswith(" [cut]") and len(long_line) == len("    | ") + 160 + 6
    assert "  cancelled    15s        0 B  boot" in lines
    assert "  skipped        -        0 B  www" in lines
    assert "Retention: not applied (no backup was saved)" in lines
    assert "Destination: 512 MiB free of 29.0 GiB (1% free)" in lines
    assert ("WARNING: less free space than this backup wrote (700 MiB)." in lines)
    assert ("The next run may not fit, and a full disk fails every run until someone acts."
            in lines)


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 150 * 2**20, 3 * 2**40)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "150 MiB", "3.0 TiB"]


# --- delivery ------------------------------------------------------------------------------------


# RFC 2047: an encoded word, and one with nothing in it (which some clients show raw).
_ENCODED_WORD = re.compile(rb"=\?([^?\s]*)\?([^?\s]*)\?([^?\s]*)\?=")


def assert_valid_headers(received: Received) -> None:
    """Every header line on the wire is ASCII, at most 78 characters, and every encoded
    word in it is well formed, at most 75 characters and not empty (RFC 5322, RFC 2047)."""
    data = received.data.replace(b"\r\n", b"\n")
    head = data.split(b"\n\n", 1)[0]
    assert head.isascii(), head
    for line in head.split(b"\n"):
        assert len(line) <= 78, line
        for word in _ENCODED_WORD.finditer(line):
            charset, encoding, text = word.groups()
            assert charset.lower() == b"utf-8" and encoding.lower() in (b"q", b"b"), line
            assert text and len(word.group(0)) <= 75, line


def _only_message(server: MailServer) -> Received:
    assert len(server.messages) == 1, f"expected one message, got {len(server.messages)}"
    return server.messages[0]


@pytest.mark.parametrize("builder", [ok_report, failed_report, interrupted_report])
@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_report_is_delivered_with_subject_body_and_attachment(
        pki: Pki, password_file: Path, builder: Any, security: str) -> None:
    report = builder()
    with MailServer(pki, security=security) as server:
        settings = settings_for(server.port, security=security, ca_file=pki.ca_file,
                                password_file=password_file)
        delivery = await deliver_report(settings, report, host=HOST)
        assert (delivery.status, delivery.error) == ("sent", None)
        received = _only_message(server)
    assert received.mail_from == SENDER
    assert received.rcpt_tos == RECIPIENTS
    assert received.login == USER and received.tls
    assert_valid_headers(received)
    got = parts(received)
    assert got.subject == render_subject(report, host=HOST)
    assert got.sender == SENDER and got.to == ", ".join(RECIPIENTS)
    assert got.text == render_body(report, host=HOST)
    assert got.html is not None and "monospace" in got.html and report.name in got.html
    assert list(got.attachments) == [f"{report.name}.json"]
    attached = json.loads(got.attachments[f"{report.name}.json"])
    assert attached == json.loads(encode_report(report))
    assert attached["delivery"] == {"status": "skipped", "error": None}  # not final yet


def _non_ascii_report() -> Report:
    """A failure naming a hook and a file whose names are not ASCII."""
    report = failed_report()
    report.failure = ('hook "Sicherung prüfen" pre failed: exit code 1: „Fotos/Ärger.jpg“ '
                      "fehlt — noch einmal versuchen")
    return report


async def test_every_header_on_the_wire_is_valid(pki: Pki, password_file: Path) -> None:
    # Host names of every length move each non-ASCII character (the cut's "…",
    # a name's "ä") across the place where a header line is folded.
    hosts = ["vm", "pi"] + [f"host-{'x' * n}" for n in range(12)]
    builders = [ok_report, failed_report, interrupted_report, _non_ascii_report]
    with MailServer(pki, security="none") as server:
        settings = settings_for(server.port, security="none", password_file=password_file)
        for host in hosts:
            for builder in builders:
                delivery = await deliver_report(settings, builder(), host=host)
                assert delivery.status == "sent", delivery.error
        received = list(server.messages)
    assert len(received) == len(hosts) * len(builders)
    expected = [render_subject(b(), host=h) for h in hosts for b in builders]
    for message, subject in zip(received, expected, strict=True):
        assert_valid_headers(message)
        assert parts(message).subject == subject


async def test_421_once_then_one_retry_delivers(pki: Pki, password_file: Path,
                                                logs: list[dict[str, Any]]) -> None:
    with MailServer(pki, refuse_data=1) as server:
        settings = settings_for(server.port, ca_file=pki.ca_file, password_file=password_file,
                                timeout="2s")
        delivery = await deliver_report(settings, ok_report(), host=HOST)
        assert delivery.status == "sent", delivery.error
        assert server.data_commands == 2 and server.connections == 2
        _only_message(server)
    retries = [e for e in logs if e["event"] == "report delivery failed; trying again"]
    assert len(retries) == 1 and "421" in retries[0]["error"]


async def test_wrong_password_fails_at_once_without_retry(pki: Pki, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    with MailServer(pki) as server:
        settings = settings_for(server.port, ca_file=pki.ca_file, password_file=wrong)
        delivery = await deliver_report(settings, ok_report(), host=HOST)
        assert delivery.status == "failed"
        assert delivery.error is not None
        assert "login refused: 535" in delivery.error and "after 1 attempt:" in delivery.error
        assert server.connections == 1 and server.messages == []
        assert {login for login, ok in server.logins} == {USER}
    assert "not-the-password" not in delivery.error


async def test_server_down_fails_after_bounded_retries(pki: Pki, password_file: Path) -> None:
    settings = settings_for(free_port(), ca_file=pki.ca_file, password_file=password_file,
                            timeout="1s")
    t0 = time.monotonic()
    delivery = await deliver_report(settings, ok_report(), host=HOST)
    elapsed = time.monotonic() - t0
    assert delivery.status == "failed"
    assert delivery.error == (f"after {ATTEMPTS} attempts: connecting to 127.0.0.1:"
                              f"{settings.smtp.port}: connection refused")
    assert elapsed < 3.0


@pytest.mark.slow
@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_server_that_never_answers_ends_within_the_bound(
        pki: Pki, password_file: Path, security: str) -> None:
    with silent_server() as port:
        settings = settings_for(port, security=security, ca_file=pki.ca_file,
                                password_file=password_file, timeout="1s")
        t0 = time.monotonic()
        delivery = await deliver_report(settings, ok_report(), host=HOST)
        elapsed = time.monotonic() - t0
    assert delivery.status == "failed"
    assert delivery.error == (f"after {ATTEMPTS} attempts: connecting to 127.0.0.1:{port}: "
                              "no answer within 1s")
    # Three attempts of one second each, plus 0.2 s and 0.6 s of waiting.
    assert ATTEMPTS * 1.0 <= elapsed < ATTEMPTS * 1.0 + 0.8 + 1.5
    assert elapsed < total_bound_s(settings.smtp)


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_certificate_from_untrusted_ca_is_refused_unless_ca_file_trusts_it(
        pki: Pki, password_file: Path, security: str) -> None:
    with MailServer(pki, security=security) as server:
        for ca_file in (None, pki.other_ca_file):
            settings = settings_for(server.port, security=security, ca_file=ca_file,
                                    password_file=password_file)
            delivery = await deliver_report(settings, ok_report(), host=HOST)
            assert delivery.status == "failed"
            assert delivery.error is not None
            assert "certificate is not trusted" in delivery.error
            assert "after 1 attempt:" in delivery.error  # no retry: it will not pass later
        assert server.messages == [] and server.logins == []
        settings = settings_for(server.port, security=security, ca_file=pki.ca_file,
                                password_file=password_file)
        delivery = await deliver_report(settings, ok_report(), host=HOST)
        assert delivery.status == "sent", delivery.error
        _only_message(server)


async def test_starttls_is_required_when_configured(pki: Pki, password_file: Path) -> None:
    with MailServer(None, security="none") as server:
        settings = settings_for(server.port, password_file=password_file)
        delivery = await deliver_report(settings, ok_report(), host=HOST)
        assert delivery.status == "failed"
        assert delivery.error is not None and "STARTTLS" in delivery.error
        assert server.logins == [] and server.messages == []
        plain = settings_for(server.port, security="none", password_file=password_file)
        delivery = await deliver_report(plain, ok_report(), host=HOST)
        assert delivery.status == "sent", delivery.error
        assert not _only_message(server).tls


async def test_password_from_env_and_file(pki: Pki, server: MailServer, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIBACKUP_TEST_SMTP_PASSWORD", PASSWORD)
    settings = settings_for(server.port, ca_file=pki.ca_file,
                            password_env="PIBACKUP_TEST_SMTP_PASSWORD")
    assert read_password(settings.smtp) == PASSWORD
    assert (await deliver_report(settings, ok_report(), host=HOST)).status == "sent"
    crlf = tmp_path / "crlf"
    crlf.write_bytes(PASSWORD.encode() + b"\r\n")
    assert read_password(settings_for(1, password_file=crlf).smtp) == PASSWORD
    assert len(server.messages) == 1


async def test_unusable_mail_settings_fail_the_delivery_before_connecting(
        pki: Pki, server: MailServer, tmp_path: Path, password_file: Path) -> None:
    cases = [
        (settings_for(server.port, ca_file=pki.ca_file, password_env="PIBACKUP_TEST_UNSET"),
         "PIBACKUP_TEST_UNSET is not set"),
        (settings_for(server.port, ca_file=pki.ca_file, password_file=tmp_path / "missing"),
         f"cannot read report.smtp.password_file {tmp_path / 'missing'}: No such file"),
        (settings_for(server.port, ca_file=pki.ca_file),
         "username is set but neither password_file nor password_env is"),
        (settings_for(server.port, ca_file=tmp_path / "no-ca.pem",
                      password_file=password_file),
         "cannot use report.smtp.ca_file"),
    ]
    for settings, expected in cases:
        delivery = await deliver_report(settings, ok_report(), host=HOST)
        assert delivery.status == "failed"
        assert delivery.error is not None and expected in delivery.error
    assert server.connections == 0


async def test_password_appears_in_no_log_error_or_message(
        pki: Pki, password_file: Path, tmp_path: Path, logs: list[dict[str, Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "wrong"
    # The server's password is what the client sends here: a server that echoes
    # the attempt, or an error that quotes it, would show it.
    wrong.write_text(PASSWORD + "-but-wrong\n")
    texts: list[str] = []
    with MailServer(pki, refuse_data=1) as server:
        good = settings_for(server.port, ca_file=pki.ca_file, password_file=password_file,
                            timeout="2s")
        bad = settings_for(server.port, ca_file=pki.ca_file, password_file=wrong)
        for settings in (good, bad):
            delivery = await deliver_report(settings, failed_report(), host=HOST)
            texts.append(msgspec.json.encode(delivery).decode())
        texts.append(str(await check_smtp(bad, send_test=False)))
        texts.append(str(await check_smtp(good, send_test=True)))
        texts += [m.data.decode(errors="replace") for m in server.messages]
        assert len(server.messages) == 2
    captured = capsys.readouterr()
    texts += [repr(logs), captured.out, captured.err]
    assert logs, "nothing was logged, so nothing was checked"
    for text in texts:
        assert PASSWORD not in text


async def test_check_connects_authenticates_and_sends_a_test(
        pki: Pki, server: MailServer, password_file: Path, tmp_path: Path) -> None:
    settings = settings_for(server.port, ca_file=pki.ca_file, password_file=password_file)
    assert await check_smtp(settings, send_test=False) is None
    assert server.logins == [(USER, True)] and server.messages == []
    assert await check_smtp(settings, send_test=True) is None
    got = parts(_only_message(server))
    assert got.subject == f"[pibackup] test message from {socket.gethostname()}"
    assert "test message" in got.text and got.attachments == {}
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    problem = await check_smtp(settings_for(server.port, ca_file=pki.ca_file,
                                            password_file=wrong), send_test=False)
    assert problem is not None and "login refused: 535" in problem and "\n" not in problem
    problem = await check_smtp(settings_for(server.port, password_file=password_file),
                               send_test=False)
    assert problem is not None and "certificate is not trusted" in problem
    down = await check_smtp(settings_for(free_port(), password_file=password_file),
                            send_test=False)
    assert down is not None and "connection refused" in down


# --- end to end, through the command line ---------------------------------------------------------


def write_mail_config(ws: Workspace, server_port: int, pki: Pki, password_file: Path, *,
                      when: str = "always", hooks: str = "", timeout: str = "5s",
                      security: str = "starttls") -> None:
    source = ws.make_source("data")
    ws.write_config(f"""
{hooks}
[[sources]]
name = "data"
type = "rsync"
path = "{source}"

[report]
from = "{SENDER}"
to = {json.dumps(RECIPIENTS)}
when = "{when}"

[report.smtp]
host = "127.0.0.1"
port = {server_port}
security = "{security}"
username = "{USER}"
password_file = "{password_file}"
ca_file = "{pki.ca_file}"
timeout = "{timeout}"
""")


def _report_file_matches_attachment(ws: Workspace, received: Received) -> dict[str, Any]:
    report = ws.report()
    got = parts(received)
    attached = json.loads(got.attachments[f"{report['name']}.json"])
    assert attached.pop("delivery") == {"status": "skipped", "error": None}
    final = dict(report)
    final.pop("delivery")
    assert attached == final
    return report


@needs_rsync
def test_cli_ok_run_mails_one_report(ws: Workspace, server: MailServer, pki: Pki,
                                     password_file: Path) -> None:
    write_mail_config(ws, server.port, pki, password_file)
    result = ws.run("run", "-v", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    report = _report_file_matches_attachment(ws, _only_message(server))
    assert report["delivery"] == {"status": "sent", "error": None}
    assert_valid_headers(server.messages[0])
    got = parts(server.messages[0])
    assert server.messages[0].rcpt_tos == RECIPIENTS
    assert got.subject.startswith(
        f"[pibackup] OK {short_host(socket.gethostname())}: 1 source, ")
    assert got.subject.endswith(f" ({report['name']})")
    lines = got.text.splitlines()
    assert lines[0] == "OK — the backup was saved"
    assert f"Host      {socket.gethostname()}" in lines
    for heading in ("Sources", "Timing", "Retention: kept 1, deleted 0"):
        assert heading in lines
    assert any(line.startswith("Destination: ") for line in lines)
    assert PASSWORD not in result.stderr + result.stdout


@needs_rsync
def test_cli_failed_run_mails_the_failure(ws: Workspace, server: MailServer, pki: Pki,
                                          password_file: Path) -> None:
    hooks = """
[[backup_hooks]]
name = "b1"
pre = "echo 'disk not found' >&2; exit 3"
"""
    write_mail_config(ws, server.port, pki, password_file, hooks=hooks)
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    report = _report_file_matches_attachment(ws, _only_message(server))
    assert report["status"] == "failed" and report["delivery"]["status"] == "sent"
    failure = report["failure"]
    assert failure.startswith('hook "b1" pre failed: exit code 3')
    assert_valid_headers(server.messages[0])
    got = parts(server.messages[0])
    assert got.subject == (f"[pibackup] FAILED {short_host(socket.gethostname())}: "
                           f'{failure} ({report["name"]})')
    lines = got.text.splitlines()
    assert lines[:2] == ["FAILED — no backup was saved", failure]
    failures = lines[lines.index("Failures"):]
    assert failures[1:4] == ['  hook "b1" pre: exit code 3',
                             "    $ /bin/sh -c 'echo '\"'\"'disk not found'\"'\"' >&2; exit 3'",
                             "    | disk not found"]


@needs_rsync
def test_cli_critical_hook_stop_still_mails(ws: Workspace, server: MailServer, pki: Pki,
                                            password_file: Path) -> None:
    hooks = """
[[backup_hooks]]
name = "mount"
pre = "exit 4"
critical = true
"""
    write_mail_config(ws, server.port, pki, password_file, hooks=hooks)
    result = ws.run("run")
    assert result.returncode == 1, result.stderr
    report = _report_file_matches_attachment(ws, _only_message(server))
    assert report["failure"].startswith('hook "mount" pre failed: exit code 4')
    assert parts(server.messages[0]).subject == (
        f'[pibackup] FAILED {short_host(socket.gethostname())}: {report["failure"]} '
        f'({report["name"]})')


@needs_rsync
def test_cli_interrupted_run_mails_and_exits_143(ws: Workspace, server: MailServer, pki: Pki,
                                                 password_file: Path) -> None:
    started, release = ws.markers / "in-pre", ws.markers / "release"
    hooks = f"""
[[backup_hooks]]
name = "wait"
pre = 'touch "{started}"; while [ ! -e "{release}" ]; do sleep 0.05; done'
"""
    write_mail_config(ws, server.port, pki, password_file, hooks=hooks, when="failure")
    process = ws.start("run")
    try:
        wait_for(started.exists, 30, "the hook to start")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, stderr
    assert processes_mentioning(str(ws.root)) == []
    report = _report_file_matches_attachment(ws, _only_message(server))
    assert report["status"] == "interrupted" and report["delivery"]["status"] == "sent"
    assert_valid_headers(server.messages[0])
    got = parts(server.messages[0])
    assert got.subject.startswith(
        f"[pibackup] INTERRUPTED {short_host(socket.gethostname())}: after ")
    assert got.subject.endswith(f", no backup saved ({report['name']})")
    assert got.text.startswith("INTERRUPTED — no backup was saved\n")


@needs_rsync
@pytest.mark.parametrize(("when", "args"), [("failure", ()), ("never", ()),
                                            ("always", ("--no-report",))])
def test_cli_sends_nothing_when_not_asked(ws: Workspace, server: MailServer, pki: Pki,
                                          password_file: Path, when: str,
                                          args: tuple[str, ...]) -> None:
    write_mail_config(ws, server.port, pki, password_file, when=when)
    result = ws.run("run", *args)
    assert result.returncode == 0, result.stderr
    assert ws.report()["delivery"] == {"status": "skipped", "error": None}
    assert server.messages == [] and server.connections == 0


@needs_rsync
@pytest.mark.parametrize("problem", ["wrong password", "server down", "421 once",
                                     pytest.param("never answers", marks=pytest.mark.slow)])
def test_cli_delivery_problems_keep_the_backup_and_set_the_exit_code(
        ws: Workspace, pki: Pki, password_file: Path, tmp_path: Path, problem: str) -> None:
    with MailServer(pki, refuse_data=1 if problem == "421 once" else 0) as server, \
            silent_server() as silent:
        port = {"server down": free_port(), "never answers": silent}.get(problem, server.port)
        secret = password_file
        if problem == "wrong password":
            secret = tmp_path / "wrong"
            secret.write_text("wrong-password\n")
        write_mail_config(ws, port, pki, secret, timeout="1s")
        t0 = time.monotonic()
        result = ws.run("run", "--log-format", "json", timeout=60)
        elapsed = time.monotonic() - t0
        sent = list(server.messages)
    report = ws.report()
    assert report["status"] == "ok" and report["saved"] is True
    assert (ws.dest / report["name"] / "data" / "file.txt").exists()
    assert PASSWORD not in result.stderr
    if problem == "421 once":
        assert result.returncode == 0, result.stderr
        assert report["delivery"] == {"status": "sent", "error": None}
        assert len(sent) == 1
        return
    assert result.returncode == 1, result.stderr
    assert report["delivery"]["status"] == "failed"
    error = report["delivery"]["error"]
    expected = {"wrong password": "login refused: 535",
                "server down": "connection refused",
                "never answers": "no answer within 1s"}[problem]
    assert expected in error
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "report not delivered" and e.get("error") == error
               for e in logged), result.stderr
    assert sent == []
    if problem == "never answers":
        assert elapsed < 3 * 1.0 + 0.8 + 5.0  # three timeouts, the waits, the run itself


def test_cli_check_connect_and_send_test(ws: Workspace, server: MailServer, pki: Pki,
                                         password_file: Path, tmp_path: Path) -> None:
    write_mail_config(ws, server.port, pki, password_file)
    result = ws.run("check", "--connect")
    assert result.returncode == 0, result.stderr
    assert server.logins == [(USER, True)] and server.messages == []
    result = ws.run("check", "--send-test")
    assert result.returncode == 0, result.stderr
    assert parts(_only_message(server)).subject.startswith("[pibackup] test message from ")
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong-password\n")
    write_mail_config(ws, server.port, pki, wrong)
    result = ws.run("check", "--connect")
    assert result.returncode == 1
    assert "login refused: 535" in result.stderr
    assert "wrong-password" not in result.stderr
