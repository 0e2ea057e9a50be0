"""End to end: `diff [OLD [NEW]] [--source NAME] [--json]` on real backups (SPEC §7).

Three backups are made by `run`: FIRST, then SECOND after a known change set
(add, remove, a content change at equal size with a new mtime, a chmod, a
symbolic link retargeted, a file turned into a folder, odd names, a source
retired and one added), then THIRD after one more file. `diff FIRST SECOND`
must list exactly those changes, in text and in JSON; no file content is
read (unchanged files are the same inodes, hard-linked by --link-dest).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from conftest import needs_rsync
from datakit import cli_ok, complete_backups, rsync_source, settle_times

if TYPE_CHECKING:

    from conftest import Workspace

pytestmark = [needs_rsync]

LATER = 1_500_000_000_123_456_789

# (source, path as shown, change, old size, new size): FIRST -> SECOND.
EXPECTED = [
    ("data", "added.txt", "+", None, 13),
    ("data", "bad\\xffname", "+", None, 4),
    ("data", "file2dir", "T", 6, None),
    ("data", "file2dir/inner.txt", "+", None, 6),
    ("data", "gone.txt", "-", 5, None),
    ("data", "link", "M", None, None),
    ("data", "mode.txt", "M", 5, 5),
    ("data", "new\\nline", "-", 3, None),
    ("data", "same-size.txt", "M", 8, 8),
    ("data", "sub/more.txt", "+", None, 4),
    ("fresh", "f.txt", "+", None, 2),
    ("retired", "deep", "-", None, None),
    ("retired", "deep/r.txt", "-", 2, None),
]
THIRD_ONLY = [("data", "third.txt", "+", None, 6)]


@dataclass
class History:
    ws: Workspace
    first: str
    second: str
    third: str


def _configure(ws: Workspace, names: list[str]) -> None:
    ws.write_config("".join(rsync_source(n, ws.src / n) for n in names))


def _run(ws: Workspace) -> str:
    before = set(complete_backups(ws.dest))
    cli_ok(ws, "run")
    [name] = set(complete_backups(ws.dest)) - before
    return name


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    from conftest import Workspace

    ws = Workspace(tmp_path_factory.mktemp("diff"))
    data = ws.make_source("data", {
        "keep.txt": "unchanged\n", "gone.txt": "bye\n\n", "same-size.txt": "AAAAAAA\n",
        "mode.txt": "mode\n", "file2dir": "file!\n", "sub/stay.txt": "stay\n",
    })
    (data / "mode.txt").chmod(0o644)
    os.symlink("keep.txt", data / "link")
    with open(os.path.join(os.fsencode(data), b"new\nline"), "wb") as f:
        f.write(b"nl\n")
    ws.make_source("retired", {"deep/r.txt": "r\n"})
    settle_times(data)
    settle_times(ws.src / "retired")
    _configure(ws, ["data", "retired"])
    first = _run(ws)

    (data / "added.txt").write_text("added later\n\n")
    (data / "gone.txt").unlink()
    (data / "same-size.txt").write_text("BBBBBBB\n")
    os.utime(data / "same-size.txt", ns=(LATER, LATER))
    (data / "mode.txt").chmod(0o600)
    (data / "link").unlink()
    os.symlink("mode.txt", data / "link")
    os.utime(data / "link", ns=(LATER, LATER), follow_symlinks=False)
    (data / "file2dir").unlink()
    (data / "file2dir").mkdir()
    (data / "file2dir" / "inner.txt").write_text("inner\n")
    (data / "sub" / "more.txt").write_text("more")  # sub's mtime changes: not listed
    os.unlink(os.path.join(os.fsencode(data), b"new\nline"))
    with open(os.path.join(os.fsencode(data), b"bad\xffname"), "wb") as f:
        f.write(b"odd\n")
    ws.make_source("fresh", {"f.txt": "f\n"})
    _configure(ws, ["data", "fresh"])
    second = _run(ws)

    (data / "third.txt").write_text("third\n")
    third = _run(ws)
    return History(ws, first, second, third)


def _json(ws: Workspace, *args: str) -> list[tuple[Any, ...]]:
    out = cli_ok(ws, "diff", "--json", *args).stdout
    return [(e["source"], e["path"], e["change"], e["old_size"], e["new_size"])
            for e in json.loads(out)]


def _text_entries(stdout: str) -> tuple[list[tuple[str, str, str, str]], dict[str, str]]:
    """(source, change, size text, path) per change line, and each source's summary."""
    entries, summaries = [], {}
    source = ""
    lines = stdout.splitlines()
    for line in lines[1:]:
        if not line:
            continue
        if line[:2] in ("+ ", "- ", "M ", "T "):
            change, size, path = line.split(None, 2)
            entries.append((source, change, size, path))
        elif ": " in line:
            name, _, summary = line.partition(": ")
            summaries[name] = summary
        else:
            source = line
    return entries, summaries


def _size_text(old: int | None, new: int | None) -> str:
    if old is not None and new is not None and old != new:
        return f"{old}->{new}"
    size = new if new is not None else old
    return "-" if size is None else str(size)


def test_json_lists_exactly_the_changes(history: History) -> None:
    got = _json(history.ws, history.first, history.second)
    assert got == EXPECTED


def test_text_lists_the_changes_and_a_summary_per_source(history: History) -> None:
    result = cli_ok(history.ws, "diff", history.first, history.second)
    assert result.stdout.splitlines()[0] == f"{history.first} -> {history.second}"
    entries, summaries = _text_entries(result.stdout)
    assert entries == [(s, c, _size_text(o, n), p) for s, p, c, o, n in EXPECTED]
    assert summaries == {
        "data": "4 added, 2 removed, 3 changed, 1 retyped; "
                f"{13 + 4 + 6 + 4 + 5 + 8} bytes added, {6 + 5 + 3 + 5 + 8} bytes removed",
        "fresh": f"1 added, 0 removed, 0 changed, 0 retyped; 2 bytes added, 0 bytes removed "
                 f"(only in {history.second})",
        "retired": f"0 added, 2 removed, 0 changed, 0 retyped; 0 bytes added, 2 bytes removed "
                   f"(only in {history.first})",
    }


def test_no_argument_compares_the_two_newest(history: History) -> None:
    assert _json(history.ws) == THIRD_ONLY
    result = cli_ok(history.ws, "diff")
    assert result.stdout.splitlines()[0] == f"{history.second} -> {history.third}"
    assert "fresh: no changes" in result.stdout.splitlines()


def test_one_name_is_compared_with_the_newest(history: History) -> None:
    assert _json(history.ws, history.first) == sorted(EXPECTED + THIRD_ONLY)
    assert _json(history.ws, history.first, "latest") == sorted(EXPECTED + THIRD_ONLY)


def test_source_limits_the_diff_to_one_source(history: History) -> None:
    assert _json(history.ws, history.first, history.second, "--source", "retired") == \
        [e for e in EXPECTED if e[0] == "retired"]
    entries, summaries = _text_entries(
        cli_ok(history.ws, "diff", history.first, history.second, "--source", "data").stdout)
    assert {e[0] for e in entries} == {"data"} and list(summaries) == ["data"]


def test_a_name_the_destination_does_not_hold_or_a_bad_one(history: History) -> None:
    missing = history.ws.run("diff", "2001-01-01t00-00-00+0000", history.second)
    assert missing.returncode == 1, missing.stderr
    assert "holds no complete backup 2001-01-01t00-00-00+0000" in missing.stderr
    assert missing.stdout == ""
    malformed = history.ws.run("diff", history.first, "yesterday")
    assert malformed.returncode == 2, malformed.stderr
    assert "'yesterday' is not a backup name" in malformed.stderr
    no_source = history.ws.run("diff", "--source", "nowhere")
    assert no_source.returncode == 1 and "holds a source nowhere" in no_source.stderr
    assert history.ws.run("diff", "--source", "a/b").returncode == 2


def test_fewer_than_two_backups_exit_1(ws: Workspace) -> None:
    ws.make_source("data")
    _configure(ws, ["data"])
    none = ws.run("diff")
    assert none.returncode == 1 and "needs two complete backups" in none.stderr, none.stderr
    _run(ws)
    one = ws.run("diff", "--json")
    assert one.returncode == 1 and "holds 1" in one.stderr, one.stderr
    assert one.stdout == ""


def test_destination_not_visible_exit_1(ws: Workspace) -> None:
    ws.make_source("data")
    _configure(ws, ["data"])
    ws.dest.rmdir()
    for command in ("diff", "du"):
        result = ws.run(command)
        assert result.returncode == 1, result.stderr
        assert "does not exist" in result.stderr and result.stdout == ""


def test_no_content_is_read(history: History) -> None:
    """diff reads metadata only: no file of either backup gets a newer atime (an atime
    older than the mtime is always updated by a read, even under relatime)."""
    files = [p for name in (history.first, history.second)
             for p in (history.ws.dest / name).rglob("*") if p.is_file() and not p.is_symlink()]
    assert files
    for p in files:
        os.utime(p, ns=(1, p.stat().st_mtime_ns))
    cli_ok(history.ws, "diff", history.first, history.second)
    assert {str(p): p.stat().st_atime_ns for p in files} == dict.fromkeys(map(str, files), 1)
