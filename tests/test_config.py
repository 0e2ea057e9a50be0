"""Configuration: every refusal of SPEC §4 through ``check``/``run``, and ``load_config`` itself.

A refused config exits 2 with a message naming the file and the key path,
no traceback, and nothing created on disk.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

import pytest
from datakit import rsync_source, table, toml_value, write_raw_config
from hypothesis import given, settings
from hypothesis import strategies as st
from pibackup_async.engine.config import load_config
from pibackup_async.engine.durations import parse_duration
from pibackup_async.engine.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Workspace

# Placeholders filled per workspace: {dest}, {state}, {src}, {root}.
HEAD = 'destination = "{dest}"\nstate_dir = "{state}"\n'
SOURCE = '[[sources]]\nname = "data"\ntype = "rsync"\npath = "{src}/data"\n'
HOOK = '[[backup_hooks]]\nname = "mount"\npre = "echo pre >> \\"$EVENTS\\""\n'

# (id, config text, key paths the message must name)
REFUSED: list[tuple[str, str, list[str]]] = [
    ("relative-destination",
     'destination = "backups"\nstate_dir = "{state}"\n' + SOURCE, ["destination"]),
    ("relative-state-dir",
     'destination = "{dest}"\nstate_dir = "state"\n' + SOURCE, ["state_dir"]),
    ("relative-lock-file",
     HEAD + 'lock_file = "run.lock"\n' + SOURCE, ["lock_file"]),
    ("relative-source-path",
     HEAD + '[[sources]]\nname = "data"\ntype = "rsync"\npath = "srv/data"\n',
     ["sources[0].path"]),
    ("missing-destination",
     'state_dir = "{state}"\n' + SOURCE, ["destination"]),
    ("destination-is-a-source",
     HEAD + SOURCE + '[[sources]]\nname = "d"\ntype = "rsync"\npath = "{dest}"\n',
     ["sources[1].path"]),
    ("destination-is-a-source-with-slash",
     HEAD + '[[sources]]\nname = "d"\ntype = "rsync"\npath = "{dest}/"\n',
     ["sources[0].path"]),
    ("source-inside-destination",
     HEAD + '[[sources]]\nname = "d"\ntype = "rsync"\npath = "{dest}/old/stuff"\n',
     ["sources[0].path"]),
    ("destination-inside-btrfs-source",
     HEAD + '[[sources]]\nname = "root"\ntype = "btrfs"\npath = "{root}"\n',
     ["sources[0].path"]),
    ("duplicate-source-names",
     HEAD + SOURCE + SOURCE, ["sources[1].name"]),
    ("duplicate-hook-names-across-tables",
     HEAD + HOOK + '[[snapshot_hooks]]\nname = "mount"\npost = "true"\n' + SOURCE,
     ["snapshot_hooks[0].name"]),
    ("duplicate-hook-names",
     HEAD + HOOK + HOOK + SOURCE, ["backup_hooks[1].name"]),
    ("source-name-with-slash",
     HEAD + '[[sources]]\nname = "a/b"\ntype = "rsync"\npath = "{src}/data"\n',
     ["sources[0].name"]),
    ("source-name-dotdot",
     HEAD + '[[sources]]\nname = ".."\ntype = "rsync"\npath = "{src}/data"\n',
     ["sources[0].name"]),
    ("source-name-hidden",
     HEAD + '[[sources]]\nname = ".hidden"\ntype = "rsync"\npath = "{src}/data"\n',
     ["sources[0].name"]),
    ("source-name-empty",
     HEAD + '[[sources]]\nname = ""\ntype = "rsync"\npath = "{src}/data"\n',
     ["sources[0].name"]),
    ("snapshot-dir-on-rsync",
     HEAD + SOURCE + 'snapshot_dir = "{root}/snaps"\n', ["sources[0].snapshot_dir"]),
    ("undefined-host-in-source",
     HEAD + SOURCE + 'host = "nas"\n', ["sources[0].host"]),
    ("undefined-host-in-hook",
     HEAD + HOOK + 'host = "nas"\n' + SOURCE, ["backup_hooks[0].host"]),
    ("hook-without-pre-or-post",
     HEAD + '[[snapshot_hooks]]\nname = "nothing"\n' + SOURCE, ["snapshot_hooks[0]"]),
    ("concurrency-zero",
     HEAD + "concurrency = 0\n" + SOURCE, ["concurrency"]),
    ("concurrency-negative",
     HEAD + "concurrency = -3\n" + SOURCE, ["concurrency"]),
    ("inline-password",
     HEAD + SOURCE + '[report]\nfrom = "a@b.c"\nto = ["d@e.f"]\n'
     '[report.smtp]\nhost = "smtp.example.com"\npassword = "hunter2"\n',
     ["report.smtp.password"]),
    ("exclude-on-btrfs",
     HEAD + '[[sources]]\nname = "vol"\ntype = "btrfs"\npath = "{src}/vol"\n'
     'exclude = ["*.tmp"]\n', ["sources[0].exclude"]),
    ("empty-retention",
     HEAD + SOURCE + "[retention]\n", ["retention"]),
    ("retention-only-zeros",
     HEAD + SOURCE + "[retention]\nkeep_last = 0\nkeep_daily = 0\n", ["retention"]),
    ("retention-negative",
     HEAD + SOURCE + "[retention]\nkeep_daily = -1\n", ["retention.keep_daily"]),
    ("unknown-top-level-key",
     HEAD + "colour = true\n" + SOURCE, ["colour"]),
    ("unknown-source-key",
     HEAD + SOURCE + 'excludes = ["*.tmp"]\n', ["sources[0].excludes"]),
    ("unknown-hook-key",
     HEAD + HOOK + 'pre_command = "true"\n' + SOURCE, ["backup_hooks[0].pre_command"]),
    ("unknown-source-type",
     HEAD + '[[sources]]\nname = "data"\ntype = "zfs"\npath = "{src}/data"\n',
     ["sources[0].type"]),
    ("wrong-value-type",
     HEAD + "concurrency = \"two\"\n" + SOURCE, ["concurrency"]),
    ("duration-unknown-unit",
     HEAD + SOURCE + 'timeout = "5x"\n', ["sources[0].timeout"]),
    ("duration-years",
     HEAD + HOOK + 'timeout = "1y"\n' + SOURCE, ["backup_hooks[0].timeout"]),
    ("keep-within-months",
     HEAD + SOURCE + '[retention]\nkeep_within = "3mo"\n', ["retention.keep_within"]),
    # A timeout must be longer than zero (it would fail every run).
    ("hook-timeout-zero",
     HEAD + HOOK + 'timeout = "0s"\n' + SOURCE, ["backup_hooks[0].timeout"]),
    ("source-timeout-zero",
     HEAD + SOURCE + 'timeout = "0m"\n', ["sources[0].timeout"]),
    ("smtp-timeout-zero",
     HEAD + SOURCE + '[report]\nfrom = "a@b.c"\nto = ["d@e.f"]\n'
     '[report.smtp]\nhost = "smtp.example.com"\ntimeout = "0h0s"\n', ["report.smtp.timeout"]),
    # A hook's env must be usable as a shell environment.
    ("env-name-with-equals",
     HEAD + HOOK + 'env = {{ "A=B" = "x" }}\n' + SOURCE, ['backup_hooks[0].env."A=B"']),
    ("env-name-starting-with-digit",
     HEAD + HOOK + 'env = {{ "1X" = "x" }}\n' + SOURCE, ["backup_hooks[0].env.1X"]),
    ("env-value-with-nul",
     HEAD + '[[snapshot_hooks]]\nname = "db"\npost = "true"\nenv = {{ X = "a\\u0000b" }}\n'
     + SOURCE, ["snapshot_hooks[0].env.X"]),
    # No program can be given a NUL byte.
    ("command-with-nul",
     HEAD + HOOK + 'post = ["echo", "a\\u0000b"]\n' + SOURCE, ["backup_hooks[0].post"]),
    ("rsync-arg-with-nul",
     HEAD + SOURCE + 'rsync_args = ["--bwlimit=1\\u0000"]\n', ["sources[0].rsync_args"]),
    ("path-with-nul",
     HEAD + '[[sources]]\nname = "data"\ntype = "rsync"\npath = "/srv\\u0000/x"\n',
     ["sources[0].path"]),
    # ssh would read these as options.
    ("host-address-option",
     HEAD + SOURCE + '[hosts.nas]\naddress = "-oProxyCommand=touch /tmp/pwned"\n',
     ["hosts.nas.address"]),
    ("host-user-option",
     HEAD + SOURCE + '[hosts.nas]\naddress = "nas.lan"\nuser = "-lroot"\n', ["hosts.nas.user"]),
    # A host's name is part of its ssh control socket's path (SPEC §4).
    ("host-name-with-space",
     HEAD + SOURCE + '[hosts."my nas"]\naddress = "nas.lan"\n', ['hosts."my nas"']),
    ("host-name-with-ssh-token",
     HEAD + SOURCE + '[hosts."nas%h"]\naddress = "nas.lan"\n', ['hosts."nas%h"']),
    ("host-name-with-slash",
     HEAD + SOURCE + '[hosts."../nas"]\naddress = "nas.lan"\n', ['hosts."../nas"']),
    ("host-name-dot-dot",
     HEAD + SOURCE + '[hosts.".."]\naddress = "nas.lan"\n', ['hosts.".."']),
    ("host-name-starting-with-dash",
     HEAD + SOURCE + '[hosts.-nas]\naddress = "nas.lan"\n', ["hosts.-nas"]),
    ("host-name-too-long",
     HEAD + SOURCE + f'[hosts.{"n" * 33}]\naddress = "nas.lan"\n', [f"hosts.{'n' * 33}"]),
    # urlsplit raises ValueError on these rather than returning parts.
    ("ping-url-unclosed-ipv6",
     HEAD + SOURCE + '[monitor]\nping_url = "http://[::1"\n', ["monitor.ping_url"]),
    ("ping-url-bracketed-ipv4",
     HEAD + SOURCE + '[monitor]\nping_url = "https://[10.0.0.1]/ping"\n', ["monitor.ping_url"]),
    ("ping-url-port-out-of-range",
     HEAD + SOURCE + '[monitor]\nping_url = "http://127.0.0.1:99999/ping"\n',
     ["monitor.ping_url"]),
]


def fill(ws: Workspace, text: str) -> str:
    return text.format(dest=ws.dest, state=ws.state, src=ws.src, root=ws.root)


def assert_refused(ws: Workspace, result_code: int, stderr: str, paths: list[str]) -> None:
    assert result_code == 2, f"exit {result_code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert str(ws.config_path) in stderr, stderr
    for path in paths:
        assert path in stderr, f"{path!r} not named in:\n{stderr}"
    assert not ws.state.exists(), "state_dir was created for a refused config"


@pytest.mark.parametrize(("text", "paths"), [(t, p) for _, t, p in REFUSED],
                         ids=[i for i, _, _ in REFUSED])
def test_check_refuses(ws: Workspace, text: str, paths: list[str]) -> None:
    ws.make_source("data")
    write_raw_config(ws, fill(ws, text))
    dest_before = sorted(os.listdir(ws.dest))

    result = ws.run("check")

    assert_refused(ws, result.returncode, result.stderr, paths)
    assert sorted(os.listdir(ws.dest)) == dest_before


RUN_REFUSED = [case for case in REFUSED if case[0] in {
    "relative-destination", "destination-is-a-source", "duplicate-source-names",
    "unknown-hook-key", "duration-years", "empty-retention",
}]


@pytest.mark.parametrize(("text", "paths"), [(t, p) for _, t, p in RUN_REFUSED],
                         ids=[i for i, _, _ in RUN_REFUSED])
def test_run_refuses_before_doing_anything(ws: Workspace, text: str, paths: list[str]) -> None:
    ws.make_source("data")
    write_raw_config(ws, fill(ws, text) + "\n" + HOOK.replace("mount", "never-runs"))

    result = ws.run("run")

    assert_refused(ws, result.returncode, result.stderr, paths)
    assert not ws.events.exists(), "a hook ran for a refused config"
    assert os.listdir(ws.dest) == []


def error_lines(ws: Workspace, stderr: str) -> list[str]:
    """The key-path part of every ``error: <file>: <key path>: ...`` line."""
    prefix = f"error: {ws.config_path}: "
    return [line[len(prefix):] for line in stderr.splitlines() if line.startswith(prefix)]


def test_check_lists_every_problem_at_once(ws: Workspace) -> None:
    text = fill(ws, (
        'destination = "relative/dest"\nstate_dir = "{state}"\nconcurrency = 0\nmystery = 1\n'
        + HOOK + "bogus = 1\n"
        + '[[snapshot_hooks]]\nname = "empty"\n'
        + '[[sources]]\nname = "data"\ntype = "rsync"\npath = "{src}/data"\ntimeout = "1y"\n'
        + '[[sources]]\nname = "bad/name"\ntype = "rsync"\npath = "rel"\n'
        + '[[sources]]\nname = "x"\ntype = "nope"\npath = "{src}/x"\n'
    ))
    write_raw_config(ws, text)

    result = ws.run("check")

    # Field problems (unknown keys, wrong types) and cross-field rules together.
    expected = ["mystery", "concurrency", "backup_hooks[0].bogus", "sources[2].type",
                "destination", "snapshot_hooks[0]", "sources[0].timeout", "sources[1].name",
                "sources[1].path"]
    assert_refused(ws, result.returncode, result.stderr, expected)
    assert sorted(line.split(":")[0] for line in error_lines(ws, result.stderr)) == sorted(
        expected), result.stderr


def test_field_and_rule_problems_in_one_listing(ws: Workspace) -> None:
    """An unknown key and a wrong type in one source show with a duplicate name elsewhere."""
    ws.make_source("data")
    text = fill(ws, HEAD + (
        '[[backup_hooks]]\nname = "mount"\npre = "true"\nhost = "nas"\n'
        '[[sources]]\nname = "data"\ntype = "rsync"\npath = "{src}/data"\n'
        'excludes = ["*.tmp"]\nrsync_ok_codes = "0,24"\n'
        '[[sources]]\nname = "other"\ntype = "rsync"\npath = "{src}/data"\n'
        '[[sources]]\nname = "other"\ntype = "btrfs"\npath = "{src}/vol"\n'
    ))
    write_raw_config(ws, text)

    result = ws.run("check")

    assert_refused(ws, result.returncode, result.stderr, [])
    lines = error_lines(ws, result.stderr)
    assert sorted(line.split(":")[0] for line in lines) == [
        "backup_hooks[0].host", "sources[0].excludes", "sources[0].rsync_ok_codes",
        "sources[2].name"], result.stderr
    assert "is already the name of sources[1]" in result.stderr
    assert "'nas' is not defined in [hosts]" in result.stderr


def test_each_problem_is_listed_once(tmp_path: Path) -> None:
    """Rules stay silent where the field pass has already named the mistake."""
    path = tmp_path / "config.toml"
    path.write_text(
        'destination = 5\nstate_dir = "/var/lib/x"\nhosts = "nas"\n'
        '[[backup_hooks]]\nname = "a"\npre = "true"\nhost = "nas"\ntimeout = 10\n'
        '[[sources]]\nname = 3\ntype = "rsync"\npath = "/srv"\nhost = "nas"\n'
        '[retention]\nkeep_dayly = 7\nkeep_last = -1\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    keys = [p.split(":")[0] for p in caught.value.problems]
    assert sorted(keys) == sorted([
        "destination", "hosts", "backup_hooks[0].timeout", "sources[0].name",
        "retention.keep_dayly", "retention.keep_last"]), caught.value.problems


def test_check_lists_every_rule_problem_at_once(ws: Workspace) -> None:
    text = fill(ws, (
        'destination = "relative/dest"\nstate_dir = "{state}"\n'
        + '[[snapshot_hooks]]\nname = "empty"\n'
        + '[[sources]]\nname = "data"\ntype = "rsync"\npath = "{src}/data"\ntimeout = "1y"\n'
        + '[[sources]]\nname = "bad/name"\ntype = "rsync"\npath = "rel"\n'
        + '[[sources]]\nname = "data"\ntype = "rsync"\npath = "{src}/y"\nhost = "nas"\n'
        + "[retention]\n"
    ))
    write_raw_config(ws, text)

    result = ws.run("check")

    assert_refused(ws, result.returncode, result.stderr, [
        "destination", "snapshot_hooks[0]", "sources[0].timeout", "sources[1].name",
        "sources[1].path", "sources[2].name", "sources[2].host", "retention",
    ])


def test_a_host_name_is_refused_saying_what_is_expected(ws: Workspace) -> None:
    ws.make_source("data")
    write_raw_config(ws, fill(ws, HEAD + SOURCE + '[hosts."nas %h"]\naddress = "nas.lan"\n'))

    result = ws.run("check")

    assert_refused(ws, result.returncode, result.stderr, ['hosts."nas %h"'])
    [line] = error_lines(ws, result.stderr)
    assert "[A-Za-z0-9][A-Za-z0-9._-]*" in line and "32 characters" in line, line
    assert "'nas %h'" in line, line


def test_a_host_name_of_32_characters_with_dots_and_dashes_is_accepted(ws: Workspace) -> None:
    name = "nas-1.lan_" + "x" * 22
    assert len(name) == 32
    write_raw_config(ws, fill(ws, HEAD + SOURCE + f'host = "{name}"\n'
                              + f'[hosts."{name}"]\naddress = "nas.lan"\n'))

    config = load_config(str(ws.config_path))

    assert list(config.hosts) == [name]
    assert config.sources[0].host == name


def test_missing_and_unparsable_files(ws: Workspace, tmp_path: Path) -> None:
    ws.config_path = tmp_path / "absent.toml"
    result = ws.run("check")
    assert result.returncode == 2, result.stderr
    assert str(ws.config_path) in result.stderr
    assert "Traceback" not in result.stderr

    ws.config_path = tmp_path / "broken.toml"
    ws.config_path.write_text('destination = "/x\n[[sources]\n')
    result = ws.run("check")
    assert result.returncode == 2, result.stderr
    assert str(ws.config_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_a_ping_url_that_urlsplit_cannot_read_says_what_was_expected(ws: Workspace) -> None:
    ws.make_source("data")
    write_raw_config(ws, fill(ws, HEAD + SOURCE + '[monitor]\nping_url = "http://[::1"\n'))
    result = ws.run("check")
    assert_refused(ws, result.returncode, result.stderr, ["monitor.ping_url"])
    assert error_lines(ws, result.stderr) == [
        "monitor.ping_url: expected an http:// or https:// URL, got 'http://[::1' "
        "(Invalid IPv6 URL)"]


def test_a_config_that_is_not_utf8_is_refused_naming_the_file(ws: Workspace) -> None:
    ws.make_source("data")
    # Latin-1, as an editor on an old system may save it: "café" in a comment.
    ws.config_path.write_bytes(fill(ws, HEAD + SOURCE).encode() + b"# caf\xe9\n")
    result = ws.run("check")
    assert_refused(ws, result.returncode, result.stderr, [])
    [line] = error_lines(ws, result.stderr)
    assert line.startswith("not UTF-8 text (TOML files are UTF-8): "), line
    assert "unexpected error" not in result.stderr


def valid_config(ws: Workspace, dest: Path | None = None) -> str:
    """A config using most keys, with durations in several forms."""
    return fill(ws, (
        f'destination = "{dest or ws.dest}"\nstate_dir = "{{state}}"\n'
        "concurrency = 3\n"
        '[[backup_hooks]]\nname = "mount"\npre = "true"\npost = ["true"]\n'
        'critical = true\ntimeout = "1h30m"\nenv = {{ FOO = "bar" }}\n'
        + table("[[snapshot_hooks]]", name="db", post="true", timeout="90s")
        + rsync_source("data", ws.src / "data", exclude=["*.tmp", "cache/"],
                       rsync_args=["--bwlimit=1000"], rsync_ok_codes=[0, 24, 23],
                       timeout="2w", optional=True)
        + '[retention]\nkeep_last = 3\nkeep_daily = 7\nkeep_within = "1h30m"\n'
    ))


def test_check_accepts_a_valid_config(ws: Workspace) -> None:
    ws.make_source("data")
    write_raw_config(ws, valid_config(ws))

    result = ws.run("check")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == "", "stdout carries only the dry-run plan and list output"


def test_check_warns_when_the_destination_does_not_exist(ws: Workspace) -> None:
    ws.make_source("data")
    missing = ws.root / "usb-disk"
    write_raw_config(ws, valid_config(ws, dest=missing))

    result = ws.run("check")

    assert result.returncode == 0, result.stderr
    assert str(missing) in result.stderr, result.stderr
    assert not missing.exists()


# --- load_config, called directly --------------------------------------------------


class _Paths:
    """Just enough of a Workspace for ``fill``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dest = root / "dest"
        self.state = root / "state"
        self.src = root / "src"


@pytest.mark.parametrize(("text", "paths"), [(t, p) for _, t, p in REFUSED],
                         ids=[i for i, _, _ in REFUSED])
def test_load_config_raises_config_error(tmp_path: Path, text: str, paths: list[str]) -> None:
    where = _Paths(tmp_path)
    where.dest.mkdir()
    path = tmp_path / "config.toml"
    path.write_text(fill(where, text))  # type: ignore[arg-type]

    with pytest.raises(ConfigError) as caught:
        load_config(str(path))

    error = caught.value
    assert error.problems, "a ConfigError must list its problems"
    assert all(isinstance(p, str) for p in error.problems)
    for key in paths:
        assert any(key in problem for problem in error.problems), (key, error.problems)
    assert str(path) in str(error)
    assert not where.state.exists()


def test_load_config_reads_a_valid_file(ws: Workspace) -> None:
    write_raw_config(ws, valid_config(ws))

    config = load_config(str(ws.config_path))

    assert config.destination == str(ws.dest)
    assert config.concurrency == 3
    assert [s.name for s in config.sources] == ["data"]
    assert config.sources[0].exclude == ["*.tmp", "cache/"]  # type: ignore[union-attr]
    assert config.backup_hooks[0].critical is True
    assert config.backup_hooks[0].env == {"FOO": "bar"}
    assert not ws.state.exists()


def test_load_config_reports_several_problems(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'destination = "rel"\nstate_dir = "also/rel"\n'
        '[[sources]]\nname = "a b"\ntype = "rsync"\npath = "/srv"\n'
        '[[sources]]\nname = "a b"\ntype = "rsync"\npath = "/srv2"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    joined = "\n".join(caught.value.problems)
    for key in ("destination", "state_dir", "sources[0].name", "sources[1].name"):
        assert key in joined, joined
    assert len(caught.value.problems) >= 4


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("10m", 600), ("36h", 129600), ("14d", 1209600), ("2w", 1209600),
    ("1h30m", 5400), ("1d2h3m4s", 93784),
])
def test_durations_parse(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "1y", "3mo", "", "m", "1.5h", "-1h", "1h 30m", "10"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("duration", ["90s", "1h30m", "2w"])
def test_durations_accepted_in_a_config(ws: Workspace, duration: str) -> None:
    ws.make_source("data")
    write_raw_config(ws, fill(ws, HEAD + HOOK + f'timeout = "{duration}"\n' + SOURCE
                              + f'timeout = "{duration}"\n'
                              + f'[retention]\nkeep_within = "{duration}"\n'))
    config = load_config(str(ws.config_path))
    assert config.backup_hooks[0].timeout == duration
    result = ws.run("check")
    assert result.returncode == 0, result.stderr


# --- paths compared where they lead (symbolic links resolved) ------------------------------


def _link(link: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def test_source_reached_through_a_link_to_the_destination_is_refused(ws: Workspace) -> None:
    source = _link(ws.root / "looks-like-a-source", ws.dest)
    write_raw_config(ws, fill(ws, HEAD) + rsync_source("data", source))

    result = ws.run("check")

    assert_refused(ws, result.returncode, result.stderr, ["sources[0].path"])
    assert "the destination cannot also be a source" in result.stderr
    assert str(ws.dest) in result.stderr, "the message shows where the link leads"


def test_source_linked_into_the_destination_is_refused(ws: Workspace) -> None:
    source = _link(ws.src / "data", ws.dest / "old" / "stuff")
    write_raw_config(ws, fill(ws, HEAD) + rsync_source("data", f"{source}/"))

    result = ws.run("check")

    assert_refused(ws, result.returncode, result.stderr, ["sources[0].path"])
    assert "a source cannot lie inside the destination" in result.stderr


def test_destination_linked_into_a_btrfs_source_is_refused(ws: Workspace) -> None:
    volume = ws.src / "vol"
    dest = _link(ws.root / "usb", volume / "backups")
    write_raw_config(ws, f'destination = "{dest}"\nstate_dir = "{ws.state}"\n'
                     + table("[[sources]]", name="vol", type="btrfs", path=str(volume)))

    result = ws.run("run")

    assert_refused(ws, result.returncode, result.stderr, ["sources[0].path"])
    assert "the destination cannot lie inside a btrfs source" in result.stderr
    assert os.listdir(volume / "backups") == []


def test_btrfs_source_linked_around_the_destination_is_refused(ws: Workspace) -> None:
    """The source's path is a link to a folder that holds the destination."""
    volume = _link(ws.src / "vol", ws.root / "real-vol")
    dest = ws.root / "real-vol" / "backups"
    dest.mkdir()
    write_raw_config(ws, f'destination = "{dest}"\nstate_dir = "{ws.state}"\n'
                     + table("[[sources]]", name="vol", type="btrfs", path=str(volume)))

    result = ws.run("check")

    assert_refused(ws, result.returncode, result.stderr, ["sources[0].path"])
    assert "the destination cannot lie inside a btrfs source" in result.stderr


def test_destination_linked_into_an_rsync_source_is_not_refused(ws: Workspace) -> None:
    """rsync excludes it instead (SPEC §2 step 3): backing up / to a disk just works."""
    data = ws.make_source("data")
    dest = _link(ws.root / "usb", data / "backups")
    write_raw_config(ws, f'destination = "{dest}"\nstate_dir = "{ws.state}"\n'
                     + rsync_source("data", data))

    config = load_config(str(ws.config_path))

    assert config.destination == str(dest)


def test_a_link_that_leads_out_of_the_source_does_not_nest(ws: Workspace) -> None:
    """Written inside the btrfs source, but the link leads to another disk: no nesting."""
    volume = ws.src / "vol"
    volume.mkdir()
    dest = _link(volume / "backups", ws.root / "usb")
    write_raw_config(ws, f'destination = "{dest}"\nstate_dir = "{ws.state}"\n'
                     + table("[[sources]]", name="vol", type="btrfs", path=str(volume)))

    config = load_config(str(ws.config_path))

    assert config.sources[0].path == str(volume)


# --- no document makes the loader crash ------------------------------------------------------

_VALID = {
    "destination": "/mnt/backup", "state_dir": "/var/lib/x", "require_mountpoint": True,
    "hosts": {"nas": {"address": "nas.lan", "user": "backup", "port": 22}},
    "retention": {"keep_last": 3, "keep_within": "1h"},
    "backup_hooks": [{"name": "m", "pre": ["true"], "env": {"A": "b"}, "host": "nas"}],
    "snapshot_hooks": [{"name": "n", "post": "true", "timeout": "10m"}],
    "sources": [
        {"name": "vol", "type": "btrfs", "path": "/srv", "snapshot_dir": "/snap"},
        {"name": "d2", "type": "rsync", "path": "/srv2", "exclude": ["a"], "host": "nas"},
    ],
    "report": {"from": "a@b", "to": ["c@d"],
               "smtp": {"host": "h", "username": "u", "password_env": "P", "timeout": "5s"}},
}
_ODD_VALUES = [0, -1, True, 1.5, "", "0s", "-x", "rel", "/", "a\x00b", "/mnt/backup/x",
               [], [1], [""], {}, {"x": 1}, {"A=B": "x"}, "btrfs", "nas", "vol"]


def _key_paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = []
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        found.append((*prefix, key))
        if isinstance(value, dict | list):
            found += _key_paths(value, (*prefix, key))
    return found


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return toml_value(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_key_paths(_VALID)),
                          st.sampled_from([None, *_ODD_VALUES])), min_size=1, max_size=4))
def test_mutated_documents_are_refused_never_crash(
        mutations: list[tuple[tuple[Any, ...], Any]]) -> None:
    document = copy.deepcopy(_VALID)
    for keys, value in mutations:
        parent: Any = document
        try:
            for key in keys[:-1]:
                parent = parent[key]
            if value is None:
                del parent[keys[-1]]
            else:
                parent[keys[-1]] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the parent
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.toml")
        with open(path, "w") as f:
            f.write("\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in document.items()))
        try:
            load_config(path)
        except ConfigError as e:
            assert e.problems
            assert len(e.problems) == len(set(e.problems)), e.problems
