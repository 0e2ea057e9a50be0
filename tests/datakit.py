"""Helpers for the data-path tests: config snippets, tree comparison, report times.

Used by test_fidelity, test_linking, test_concurrency, test_dry_run and
test_config. Everything here inspects real files; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from conftest import Workspace

BACKUP_NAME = re.compile(r"\d{4}-\d{2}-\d{2}t\d{2}-\d{2}-\d{2}[+-]\d{4}")


# --- configuration text ---------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, int or list of them.

    JSON's escapes (``\\"``, ``\\\\``, ``\\n``, ``\\uXXXX``) are valid in TOML
    basic strings, so json.dumps renders strings and lists safely.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def table(header: str, **keys: Any) -> str:
    """One TOML table such as ``[[sources]]`` with its keys, in the given order."""
    lines = [header]
    lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def rsync_source(name: str, path: str | Path, **keys: Any) -> str:
    return table("[[sources]]", name=name, type="rsync", path=str(path), **keys)


def write_raw_config(ws: Workspace, text: str) -> Path:
    """Write the config exactly as given (no destination/state_dir prefix)."""
    ws.config_path.write_text(text)
    return ws.config_path


def cli_ok(ws: Workspace, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI and fail the test, showing its output, unless it exits 0."""
    result = ws.run(*args, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


# --- the destination ------------------------------------------------------------------


def complete_backups(dest: Path) -> list[str]:
    """Names in ``dest`` that are exactly backup names (complete backups), oldest first."""
    if not dest.exists():
        return []
    names = [p.name for p in dest.iterdir() if BACKUP_NAME.fullmatch(p.name)]
    return sorted(names, key=lambda n: datetime.strptime(n, "%Y-%m-%dt%H-%M-%S%z"))


def only_backup(dest: Path) -> Path:
    names = complete_backups(dest)
    assert len(names) == 1, f"expected exactly one backup in {dest}, found {names}"
    return dest / names[0]


def listing(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path below ``root`` with (inode, size, mtime_ns): to show nothing changed."""
    found: dict[str, tuple[int, int, int]] = {}
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            full = os.path.join(dirpath, entry)
            st = os.lstat(full)
            found[os.path.relpath(full, root)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


# --- comparing trees ------------------------------------------------------------------


def _entries(root: bytes) -> list[bytes]:
    """Relative bytes paths of everything below ``root``, the root itself as b"."."""
    found = [b"."]
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            found.append(os.path.relpath(os.path.join(dirpath, entry), root))
    return sorted(found)


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    values = {}
    for name in names:
        try:
            values[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            values[name] = f"<error {e.errno}>".encode()
    return values


def describe_tree(root: str | bytes | Path) -> dict[bytes, dict[str, Any]]:
    """Everything a restore must reproduce, per relative path (bytes, so odd names work).

    Link counts are left out on purpose: --link-dest shares inodes across
    backups, so a backup's counts legitimately exceed the source's.
    """
    base = os.fsencode(root)
    tree: dict[bytes, dict[str, Any]] = {}
    for rel in _entries(base):
        full = os.path.join(base, rel)
        st = os.lstat(full)
        entry: dict[str, Any] = {
            "mode": oct(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "xattrs": _xattrs(full),
        }
        if stat.S_ISREG(st.st_mode):
            entry["size"] = st.st_size
            with open(full, "rb") as f:
                entry["content"] = f.read()
        elif stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(full)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            entry["rdev"] = st.st_rdev
        tree[rel] = entry
    return tree


def settle_times(root: str | bytes | Path, ns: int = 1_400_000_000_987_654_321) -> None:
    """Give everything below (and at) ``root`` one past mtime, deepest first.

    rsync (checked with 3.x here) leaves the mtime of a copied folder, symlink,
    FIFO or device alone when it equals the source's to the second, so an
    entry made in the same second as the backup keeps the copy's own
    sub-second time. Real sources are not that fresh; tests that compare times
    exactly start from settled ones.
    """
    base = os.fsencode(root)
    walk = sorted(os.walk(base), key=lambda w: -w[0].count(b"/"))
    for dirpath, dirnames, filenames in walk:
        for entry in dirnames + filenames:
            os.utime(os.path.join(dirpath, entry), ns=(ns, ns), follow_symlinks=False)
        os.utime(dirpath, ns=(ns, ns), follow_symlinks=False)


def hardlink_groups(root: str | bytes | Path) -> set[frozenset[bytes]]:
    """Groups (of two or more) of relative paths below ``root`` that share an inode."""
    base = os.fsencode(root)
    by_inode: dict[int, set[bytes]] = {}
    for rel in _entries(base):
        st = os.lstat(os.path.join(base, rel))
        if not stat.S_ISDIR(st.st_mode):
            by_inode.setdefault(st.st_ino, set()).add(rel)
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def acl_listing(root: str | Path) -> dict[str, str]:
    """``getfacl`` output (numeric ids) per path below ``root``, keyed by its ``# file:`` line.

    getfacl walks in directory order, which differs between two trees, so
    the output is split into one block per file.
    """
    result = subprocess.run(
        ["getfacl", "-R", "-P", "-n", "."], cwd=root, capture_output=True, check=True,
    )
    blocks = {}
    for block in result.stdout.decode(errors="surrogateescape").split("\n\n"):
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("# file: "):
            blocks[lines[0]] = "\n".join(lines[1:])
    return blocks


def diff_trees(expected: dict[bytes, dict[str, Any]],
               got: dict[bytes, dict[str, Any]]) -> list[str]:
    """Human-readable differences, empty when the trees match."""
    problems = []
    for rel in sorted(set(expected) | set(got)):
        if rel not in got:
            problems.append(f"{rel!r}: missing from the backup")
        elif rel not in expected:
            problems.append(f"{rel!r}: in the backup but not in the source")
        else:
            for key in sorted(set(expected[rel]) | set(got[rel])):
                want, have = expected[rel].get(key), got[rel].get(key)
                if want != have:
                    if key == "content":
                        want, have = f"<{len(want or b'')} bytes>", f"<{len(have or b'')} bytes>"
                    problems.append(f"{rel!r}: {key} expected {want!r}, got {have!r}")
    return problems


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


# --- report times ---------------------------------------------------------------------


def snapshot_intervals(report: dict[str, Any]) -> dict[str, tuple[datetime, datetime]]:
    """Each source's snapshot (start, end) as aware datetimes."""
    intervals = {}
    for name, source in report["sources"].items():
        snap = source["snapshot"]
        intervals[name] = (datetime.fromisoformat(snap["start"]),
                           datetime.fromisoformat(snap["end"]))
    return intervals


def max_overlap(intervals: Iterable[tuple[datetime, datetime]]) -> int:
    """The largest number of intervals running at one instant.

    An interval that ends exactly when another starts does not overlap it.
    """
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends (-1) sort before starts (+1)
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def assert_same_tree(source: Path, copy: Path) -> None:
    """The copy matches the source field by field, hard-link groups included."""
    problems = diff_trees(describe_tree(source), describe_tree(copy))
    assert problems == [], "\n".join(problems)
    assert hardlink_groups(copy) == hardlink_groups(source)


# --- the fidelity tree ------------------------------------------------------------------

ODD_NAMES = [b"with space", b"new\nline", b"bad \xff\xfe byte", b"tab\there", b"-starts-with-dash"]


def set_mtime(path: bytes | Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def build_tree(root: Path) -> bytes:
    """A source tree with everything rsync -aHAX --numeric-ids --sparse must keep
    (the fidelity tree: modes, times, odd names, links, a hard-linked pair, a sparse file)."""
    base = os.fsencode(root)
    base_ns = 1_600_000_000_123_456_789
    files = {
        b"plain.txt": (0o644, b"plain\n"),
        b"private": (0o600, b"secret\n"),
        b"script.sh": (0o755, b"#!/bin/sh\necho hi\n"),
        b"odd-751": (0o751, b"odd\n"),
        b"readonly": (0o444, b"ro\n"),
        b"setgid-less-2711": (0o711, b"x\n"),
        b"empty": (0o640, b""),
    }
    for i, (name, (mode, content)) in enumerate(files.items()):
        path = os.path.join(base, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        set_mtime(path, base_ns + i * 1_000_000_007)
    for i, name in enumerate(ODD_NAMES):
        path = os.path.join(base, name)
        with open(path, "wb") as f:
            f.write(b"odd name " + name + b"\n")
        set_mtime(path, base_ns - i * 3_000_000_011)
    # Directories with their own modes and times (set after their contents).
    sub = os.path.join(base, b"sub dir")
    os.mkdir(sub)
    with open(os.path.join(sub, b"inner"), "wb") as f:
        f.write(b"inner\n")
    os.mkdir(os.path.join(base, b"empty-dir"))
    os.mkdir(os.path.join(base, b"dir-0710"))
    os.mkdir(os.path.join(base, b"sticky"))
    # Links: a symlink, a dangling one, a relative one out of a folder, a hard-linked pair.
    os.symlink(b"plain.txt", os.path.join(base, b"link-to-plain"))
    os.symlink(b"/nonexistent/target", os.path.join(base, b"dangling"))
    os.symlink(b"../plain.txt", os.path.join(sub, b"up-link"))
    with open(os.path.join(base, b"hard-a"), "wb") as f:
        f.write(b"shared inode\n")
    os.link(os.path.join(base, b"hard-a"), os.path.join(sub, b"hard-b"))
    set_mtime(os.path.join(base, b"hard-a"), base_ns + 5)
    # A sparse file: 64 MiB apparent, two small islands of data.
    sparse = os.path.join(base, b"sparse.img")
    with open(sparse, "wb") as f:
        f.write(b"head" * 1024)
        f.seek(64 * 1024 * 1024 - 4096)
        f.write(b"tail" * 1024)
    for name in (b"link-to-plain", b"dangling"):
        set_mtime(os.path.join(base, name), base_ns + 77)
    set_mtime(os.path.join(sub, b"up-link"), base_ns + 78)
    os.chmod(os.path.join(base, b"dir-0710"), 0o710)
    os.chmod(os.path.join(base, b"sticky"), 0o1777)
    os.chmod(sub, 0o2750)
    for name in (b"sub dir", b"empty-dir", b"dir-0710", b"sticky"):
        set_mtime(os.path.join(base, name), base_ns + 99)
    return base
