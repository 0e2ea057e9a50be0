"""What ``check`` can tell about the machine beyond the file: paths, filesystems, programs.

Also what ``run`` and ``prune`` ask before any hook: whether ``state_dir`` and
the lock file can be used at all (``state_problems``), and whether other users
can write a folder on their way (``writable_by_others``).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
from typing import TYPE_CHECKING

from .destination import destination_problem, identify
from .filesystems import (
    durability_problem,
    filesystem_type,
    on_mounted_filesystem,
    same_filesystem,
)
from .sources.kind import kind_of

if TYPE_CHECKING:
    from .config import Config, Hook

__all__ = [
    "on_mounted_filesystem", "preflight", "read_only_warnings", "state_problems",
    "writable_by_others",
]

# Filesystems that cannot keep owners, ACLs or xattrs (NOTES pitfall 13).
_POOR_FILESYSTEMS = {"vfat", "msdos", "exfat", "fat", "ntfs", "ntfs3", "fuseblk"}


def preflight(config: Config) -> tuple[list[str], list[str]]:
    """Problems (the run cannot work) and warnings (it may not), each with its key path.

    Paths that do not exist yet only warn: a backup hook may mount them.
    ``state_dir`` and the lock file are judged apart, by ``state_problems``.
    """
    problems: list[str] = []
    warnings = _destination_warnings(config)
    for i, source in enumerate(config.sources):
        if source.host is not None:
            continue
        if not os.path.exists(source.path):
            warnings.append(f"sources[{i}].path: {source.path} does not exist (yet)")
            continue
        found, warned = kind_of(source).check(source)
        problems += [f"sources[{i}].{line}" for line in found]
        warnings += [f"sources[{i}].{line}" for line in warned]
    warnings += _hook_warnings(config)
    warnings += read_only_warnings(config)
    if os.geteuid() != 0:
        warnings.append(
            f"running as {_user(os.geteuid())}, not root: owners cannot be kept, and files "
            "this user cannot read will fail the run")
    return problems, warnings


def _destination_warnings(config: Config) -> list[str]:
    dest = config.destination
    # Only a backup hook's pre runs before the destination is looked at: say
    # that one may mount it only when there is one.
    can_mount = any(hook.pre is not None for hook in config.backup_hooks)
    if not os.path.isdir(dest):
        if can_mount:
            return [f"destination: {dest} does not exist (yet); a backup hook may mount it"]
        return [f"destination: {dest} does not exist; a run fails until it does "
                "(it is never created)"]
    warnings = []
    if config.require_mountpoint and not on_mounted_filesystem(dest):
        until = "unless a backup hook mounts it" if can_mount else "until it is mounted"
        warnings.append(
            f"destination: {dest} is not on a mounted filesystem other than the root one "
            f"(require_mountpoint = true): a run fails {until}")
    elif not config.require_mountpoint and same_filesystem(dest, "/"):
        warnings.append(
            f"destination: {dest} is on the root filesystem and require_mountpoint is not "
            "set: if the backup disk is not mounted one night, the run fills the root disk; "
            "set require_mountpoint = true")
    fragile = durability_problem(dest)
    if fragile is not None:
        warnings.append(
            f"destination: its filesystem ({fragile}) cannot promise that a backup survives "
            "a power cut whole: a complete backup may be left with empty or short files; "
            "prefer ext4 (with its journal), XFS or btrfs")
    fstype = filesystem_type(dest)
    poor = [s.name for s in config.sources if kind_of(s).asks_for_metadata(s)]
    if fstype in _POOR_FILESYSTEMS and poor:
        warnings.append(
            f"destination: its filesystem ({fstype}) cannot keep owners, ACLs or xattrs; "
            f'rsync will fail for {", ".join(poor)}: add rsync_args = ["--no-A", "--no-X"]')
    return warnings


def _hook_warnings(config: Config) -> list[str]:
    """A list-form local hook whose program cannot be started (a string goes to /bin/sh)."""
    warnings = []
    for table, hooks in (("backup_hooks", config.backup_hooks),
                         ("snapshot_hooks", config.snapshot_hooks)):
        for i, hook in enumerate(hooks):
            if hook.host is not None:
                continue
            for phase, command in (("pre", hook.pre), ("post", hook.post)):
                if isinstance(command, list) and command:
                    problem = _program_problem(hook, command[0])
                    if problem:
                        warnings.append(f"{table}[{i}].{phase}: {problem}")
    return warnings


def _program_problem(hook: Hook, program: str) -> str | None:
    # The hook's own env may set PATH; the process is started with it.
    search = hook.env.get("PATH", os.environ.get("PATH", os.defpath))
    if shutil.which(program, path=search) is not None:
        return None
    if os.sep in program:
        if os.path.isfile(program):
            return f"{program} is not executable"
        return f"{program} does not exist"
    return f"program {program!r} is not found in PATH"


def details(config: Config) -> list[str]:
    """What ``check -v`` says of each source beyond problems, with its key path (a btrfs
    source: where its snapshots for this destination go)."""
    identity = None
    if destination_problem(config) is None:
        try:
            identity = identify(config.destination)
        except OSError:
            pass  # as if not there: decided at run time
    return [f"sources[{i}].{line}" for i, source in enumerate(config.sources)
            for line in kind_of(source).details(source, identity)]


# --- state_dir and the lock file ----------------------------------------------------------


def state_problems(config: Config) -> list[str]:
    """Why ``state_dir`` or the lock file cannot be used, one line each; empty if they can.

    Judged by type, owner and permission bits, never by writing: a full disk
    does not make them unusable (the report then travels by mail). A path
    that does not exist yet is fine when it can be created.
    """
    problems = _folder_problems("state_dir", config.state_dir)
    if not problems:
        reports = config.reports_dir
        if os.path.lexists(reports) and not os.path.isdir(reports):
            problems.append(f"state_dir {reports} is {_kind(reports)}, not a folder")
    return problems + _lock_problems(config)


def _folder_problems(label: str, path: str) -> list[str]:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.lexists(path):
            return [f"{label} {path} is {_kind(path)}, not a folder"]
        return _creation_problems(label, path)
    except OSError as e:
        return [f"{label} {path} cannot be examined: {e.strerror}"]
    if not stat.S_ISDIR(st.st_mode):
        return [f"{label} {path} is {_kind(path)}, not a folder"]
    if st.st_uid != os.geteuid():
        return [f"{label} {path} is owned by {_user(st.st_uid)}, not by {_user(os.geteuid())} "
                "who runs the engine"]
    needed = stat.S_IWUSR | stat.S_IXUSR
    if st.st_mode & needed != needed:
        return [f"{label} {path} is not writable and searchable by its owner "
                f"(mode {stat.S_IMODE(st.st_mode):04o})"]
    return []


def _lock_problems(config: Config) -> list[str]:
    path = config.lock_path
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.dirname(os.path.normpath(path)) == os.path.normpath(config.state_dir):
            return []  # created with state_dir, which is judged on its own
        return _creation_problems("lock_file", path)
    except OSError as e:
        return [f"lock_file {path} cannot be examined: {e.strerror}"]
    # The lock is opened without following links: a link would let whoever
    # can write its folder point the engine at any file.
    if not stat.S_ISREG(st.st_mode):
        return [f"lock_file {path} is {_kind(path)}, not a regular file"]
    if st.st_uid != os.geteuid():
        return [f"lock_file {path} is owned by {_user(st.st_uid)}, not by "
                f"{_user(os.geteuid())} who runs the engine"]
    needed = stat.S_IRUSR | stat.S_IWUSR
    if st.st_mode & needed != needed:
        return [f"lock_file {path} is not readable and writable by its owner "
                f"(mode {stat.S_IMODE(st.st_mode):04o})"]
    return []


def read_only_warnings(config: Config) -> list[str]:
    """``state_dir`` or the lock file on a read-only filesystem, one line each (SPEC §2).

    Usable still (the lock is taken on the file opened read-only, or on its
    folder where it cannot be created), but no report can be written there:
    an SD card the kernel remounted read-only after errors, which the
    admin should hear of before it fails for good.
    """
    mail = config.report is not None
    ping = config.monitor is not None and config.monitor.ping_url is not None
    carried = ("the mail and the ping carry it" if mail and ping
               else "the mail carries it" if mail
               else "the ping carries it" if ping
               else "nothing carries it ([report] and [monitor] are not set)")
    lines = []
    if _on_read_only_filesystem(config.state_dir):
        # The default lock lies in state_dir; a lock_file of its own gets its own line.
        lock = "takes its lock read-only and " if config.lock_file is None else ""
        lines.append(
            f"state_dir {config.state_dir} is on a read-only filesystem (an SD card remounted "
            f"read-only after errors? see dmesg): a run {lock}cannot write its report there; "
            f"{carried}")
    if config.lock_file is not None and _on_read_only_filesystem(config.lock_path):
        on = ("the file opened read-only" if os.path.lexists(config.lock_path)
              else f"its folder {os.path.dirname(config.lock_path)}")
        lines.append(f"lock_file {config.lock_path} is on a read-only filesystem: a run takes "
                     f"the lock on {on}")
    return lines


def _on_read_only_filesystem(path: str) -> bool:
    """Whether ``path``, or the nearest folder above it that exists, is on a read-only mount."""
    while True:
        try:
            return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        except FileNotFoundError:
            above = os.path.dirname(path)
            if above == path:
                return False
            path = above
        except OSError:
            return False


# --- folders on the way that other users can write ---------------------------------------


def writable_by_others(config: Config) -> list[str]:
    """Folders on the way to ``state_dir``, the lock file or a folder a source's kind writes
    here (a local ``snapshot_dir``) that a user other than root and the engine's own can
    write, one line each (SPEC §5).

    Whoever can write such a folder can squat the lock and stop every backup,
    or plant links. ``check`` fails on them; the commands that take the lock
    use the paths while they are usable and warn. Only folders that exist
    are judged: the missing ones are the engine's to create.
    """
    # (key, configured path, the deepest folder on its way)
    ways = [("state_dir", config.state_dir, config.state_dir)]
    if config.lock_file is not None:  # the default lies in state_dir, judged just above
        ways.append(("lock_file", config.lock_path, os.path.dirname(config.lock_path)))
    for i, source in enumerate(config.sources):
        for key, folder in kind_of(source).own_folders(source):
            ways.append((f"sources[{i}].{key}", folder, folder))
    # One line per folder, naming every configured path it lies on.
    found: dict[tuple[int, int], tuple[str, str, list[str]]] = {}
    for label, path, deepest in ways:
        for folder, st in _folders_on_the_way(deepest):
            why = _others_can_write(st)
            if why is not None:
                found.setdefault((st.st_dev, st.st_ino), (folder, why, []))[2].append(
                    f"{label} {path}")
    who = "root" if os.geteuid() == 0 else f"root and {_user(os.geteuid())}"
    return [f"{' and '.join(labels)}: {folder} can be written by users other than {who} "
            f"({why}); anyone there could squat the lock and stop every backup, or plant "
            f"links: choose a folder that only {who} can write"
            for folder, why, labels in found.values()]


def _folders_on_the_way(path: str) -> list[tuple[str, os.stat_result]]:
    """Every existing folder from ``/`` down to ``path``, as written and as links resolve it."""
    seen: dict[tuple[int, int], tuple[str, os.stat_result]] = {}
    for way in (os.path.abspath(path), os.path.realpath(path)):
        chain = [way]
        while chain[-1] != "/":
            chain.append(os.path.dirname(chain[-1]))
        for folder in reversed(chain):
            try:
                st = os.lstat(folder)
            except OSError:
                continue
            # A link's own mode says nothing; where it leads is on the resolved way.
            if stat.S_ISDIR(st.st_mode):
                seen.setdefault((st.st_dev, st.st_ino), (folder, st))
    return list(seen.values())


def _others_can_write(st: os.stat_result) -> str | None:
    """Why a user other than root and the engine's own can write this folder, or None.

    The sticky bit (/tmp) does not help: it keeps others from removing what
    is there, not from creating the name first.
    """
    mode = stat.S_IMODE(st.st_mode)
    reasons = []
    if st.st_uid not in (0, os.geteuid()):
        reasons.append(f"owned by {_user(st.st_uid)}")
    if mode & stat.S_IWOTH:
        reasons.append(f"world-writable, mode {mode:04o}")
    elif mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        reasons.append(f"group-writable by {_group(st.st_gid)}, mode {mode:04o}")
    return ", ".join(reasons) or None


def _creation_problems(label: str, path: str) -> list[str]:
    """A missing ``path`` is made later: its nearest existing ancestor must allow that."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return [f"{label} {path} cannot be created: {ancestor} is {_kind(ancestor)}, "
                "not a folder"]
    # os.access asks the kernel without writing (a read-only mount says no).
    if not os.access(ancestor, os.W_OK | os.X_OK):
        if _on_read_only_filesystem(ancestor):
            # Where the lock file cannot be created, its folder is locked instead
            # (SPEC §2); read_only_warnings says so. Reading the folder is enough.
            if (label == "lock_file" and ancestor == os.path.dirname(os.path.abspath(path))
                    and os.access(ancestor, os.R_OK | os.X_OK)):
                return []
            return [f"{label} {path} cannot be created: {ancestor} is on a read-only "
                    "filesystem"]
        return [f"{label} {path} cannot be created: {ancestor} is not writable "
                f"by {_user(os.geteuid())}"]
    return []


def _kind(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "missing"
    if stat.S_ISLNK(mode):
        try:
            target = os.stat(path).st_mode
        except OSError:
            return "a symbolic link to nothing"
        return "a symbolic link to " + _kind_of_mode(target)
    return _kind_of_mode(mode)


def _kind_of_mode(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def _group(gid: int) -> str:
    try:
        return f"group {grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
