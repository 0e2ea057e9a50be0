"""``init``'s first configuration, derived from the reference one (SPEC §7).

One source of truth: the text is ``sample-config.toml`` itself (the file at the
repository's root, shipped in this package as ``engine/sample-config.toml``,
a symbolic link to it). ``init`` keeps its option blocks and their comments,
puts the user's destination and sources in, and comments out what belongs to
the sample's Pi server (its hooks and sources, kept as examples). So a new
option documented in the sample reaches every new configuration, and tests
check that both parse and that ``check`` passes on what ``init`` writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgspec

from .config import SOURCE_NAME, load_config
from .errors import ConfigError, PibackupError
from .filesystems import is_within
from .sources.kind import kinds

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

SAMPLE = "sample-config.toml"


class InitRefused(PibackupError):
    """``init`` will not write this configuration (exit 2); ``problems`` says why."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class PlannedSource:
    name: str
    kind: str  # its type tag
    path: str
    # (pattern, why) pairs; why is an end-of-line comment or None
    exclude: list[tuple[str, str | None]] = field(default_factory=list)
    note: str | None = None  # a comment line above the table


@dataclass(frozen=True)
class Written:
    path: str
    destination: str
    sources: list[PlannedSource]


def sample_text() -> str:
    """The reference configuration's text, as installed with the package."""
    try:
        return (resources.files(__package__) / SAMPLE).read_text(encoding="utf-8")
    except OSError as e:
        raise PibackupError(f"the reference configuration {SAMPLE} is missing from this "
                            f"installation ({e.strerror or e}); reinstall pibackup-async") from None


def default_destination() -> str:
    """``/mnt/backup/<short host name>``: several machines can share one backup disk."""
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname().split(".")[0]).strip("-.")
    return f"/mnt/backup/{host or 'this-host'}"


def init_config(destination: str | None, paths: Sequence[str], output: str) -> Written:
    """Write a new configuration at ``output``; never replace an existing file.

    Raises InitRefused (bad usage: no source, a path that cannot be a source,
    ``output`` exists, or the result would not load) or OSError (the file
    cannot be written).
    """
    if not paths:
        raise InitRefused(["at least one --source PATH is needed"])
    dest = os.path.abspath(destination) if destination else default_destination()
    problems = [p for p in (_text_problem("--destination", dest),) if p]
    sources = plan_sources(paths, dest, problems)
    if os.path.lexists(output):
        problems.append(f"{output} already exists; init never replaces a file "
                        "(remove it, or choose another with --output)")
    if problems:
        raise InitRefused(problems)
    text = config_text(dest, sources, output, defaulted=not destination)
    write_new(output, text)
    return Written(output, dest, sources)


# --- sources ------------------------------------------------------------------------------


def plan_sources(paths: Sequence[str], destination: str,
                 problems: list[str]) -> list[PlannedSource]:
    """One source per path: a unique name, btrfs where it can be, nested sources excluded.

    What cannot be a source is appended to ``problems``.
    """
    found: list[tuple[str, str, str | None]] = []  # (path, kind, note)
    seen: dict[str, str] = {}
    for given in paths:
        path = os.path.abspath(given)
        problem = _text_problem(f"--source {given}", path) or _folder_problem(given, path)
        real = os.path.realpath(path)
        if problem is None and real in seen:
            problem = f"--source {given}: the same folder as --source {seen[real]}"
        if problem is not None:
            problems.append(problem)
            continue
        seen[real] = given
        kind, note = _kind(path, destination)
        found.append((path, kind, note))
    names = unique_names([path for path, _, _ in found])
    planned = []
    for (path, kind, note), name in zip(found, names, strict=True):
        exclude: list[tuple[str, str | None]] = []
        if _takes_excludes(kind):
            exclude += _system_excludes() if path == "/" else []
            exclude += _nested_excludes(path, [(n, p) for (p, _, _), n in zip(found, names,
                                                                                strict=True)])
        planned.append(PlannedSource(name, kind, kinds()[kind].init_path(path), exclude, note))
    return planned


def unique_names(paths: Sequence[str]) -> list[str]:
    """A plain folder name per path (``/`` is ``root``), made unique with ``-2``, ``-3``…"""
    names: list[str] = []
    for path in paths:
        base = "root" if os.path.normpath(path) == "/" else os.path.basename(
            os.path.normpath(path))
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip("._-").rstrip("-") or "source"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        assert SOURCE_NAME.fullmatch(name), name
        names.append(name)
    return names


def _text_problem(what: str, path: str) -> str | None:
    # TOML is UTF-8: a path with other bytes cannot be written into the file.
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return f"{what}: the path is not valid UTF-8 and cannot be written in a TOML file"
    return None


def _folder_problem(given: str, path: str) -> str | None:
    if not os.path.exists(path):
        return f"--source {given}: {path} does not exist"
    if not os.path.isdir(path):
        return f"--source {given}: {path} is not a folder"
    return None


def _kind(path: str, destination: str) -> tuple[str, str | None]:
    """The first kind, by rank, that fits the folder (a btrfs snapshot before a copy), and
    why a kind before it did not, if one says."""
    ranked = sorted((k for k in kinds().values() if k.init_rank is not None),
                    key=lambda k: -(k.init_rank or 0))
    notes: list[str] = []
    for kind in ranked:
        choice = kind.init_choice(path, destination)
        if choice.fits:
            return kind.tag, notes[0] if notes else None
        if choice.note is not None:
            notes.append(choice.note)
    raise InitRefused([f"--source {path}: no kind of source can back it up"])


def _takes_excludes(tag: str) -> bool:
    """The kind leaves patterns out (``exclude``): a nested source is not copied twice."""
    return any(f.encode_name == "exclude" for f in msgspec.structs.fields(kinds()[tag].config))


def _sample() -> dict[str, Any]:
    return tomllib.loads(sample_text())


def _anchored(inner: str, outer: str) -> str:
    """The rsync pattern, anchored at ``outer``, that keeps ``inner`` empty."""
    return "/" + os.path.relpath(os.path.normpath(inner), os.path.normpath(outer)) + "/*"


def _system_excludes() -> list[tuple[str, str | None]]:
    """The sample's root source excludes, less those of the sample's own other sources."""
    sources = _sample().get("sources", [])
    root: dict[str, Any] = next((s for s in sources if s.get("path") == "/"), {})
    theirs = {_anchored(s["path"], "/") for s in sources if s.get("path") != "/"}
    return [(p, None) for p in root.get("exclude", []) if p not in theirs]


def _nested_excludes(path: str, others: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """Each other source inside ``path`` is backed up on its own: not twice."""
    return [(_anchored(p, path), f'the "{n}" source') for n, p in others
            if os.path.normpath(p) != os.path.normpath(path) and is_within(p, path)]


# --- text ---------------------------------------------------------------------------------


def _blocks(text: str) -> list[list[str]]:
    """The sample's paragraphs: runs of lines between blank lines."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _first_code(block: list[str]) -> str:
    return next((line for line in block if not _is_comment(line)), "")


def _commented(block: list[str]) -> list[str]:
    return [line if _is_comment(line) else f"# {line}" for line in block]


def _toml(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def _header(output: str) -> list[str]:
    when = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    return [
        f"# pibackup-async configuration, written by `pibackup-async init` on "
        f"{socket.gethostname()}, {when}.",
        "#",
        "# The destination and the sources are yours; every other option is shown with its",
        "# comment, as in the reference configuration (sample-config.toml), with its default or",
        "# an example; the parts that need something this machine may not have (hooks, remote",
        "# hosts, the mail report) are commented out: uncomment and adapt them. Check it, and",
        "# again after every change, with:",
        "#",
        f"#     pibackup-async check -c {output}",
        "#",
        "# Unknown keys are errors. Paths must be absolute. Durations are written \"90s\",",
        '# "10m" (minutes), "36h", "14d", "2w" or combined ("1h30m").',
    ]


def _source_lines(source: PlannedSource) -> list[str]:
    lines = [f"# {source.note}"] if source.note else []
    lines += ["[[sources]]", f"name = {_toml(source.name)}", f'type = "{source.kind}"',
              f"path = {_toml(source.path)}"]
    if source.exclude:
        lines.append("exclude = [")
        lines += [f"    {_toml(p)},{f'  # {why}' if why else ''}" for p, why in source.exclude]
        lines.append("]")
    return lines


def _replaced(block: list[str], old: str, new: str) -> list[str]:
    at = block.index(old)
    return [*block[:at], new, *block[at + 1:]]


def _top_level(destination: str, *, defaulted: bool) -> dict[str, str]:
    """The sample's top-level lines that ``init`` writes its own way."""
    note = ("  # init's default (no --destination given): change it to your backup disk"
            if defaulted else "")
    # Always true, whatever init sees now: without it, the night the backup disk
    # is not mounted (a forgotten or failed mount hook) the run fills the root disk.
    values = {"destination": f"destination = {_toml(destination)}{note}",
              "require_mountpoint": "require_mountpoint = true"}
    if os.geteuid() != 0:
        # The sample's system paths need root; `check` would fail on them.
        state = os.path.join(os.path.expanduser("~"), ".local", "state", "pibackup-async")
        values["state_dir"] = f"state_dir = {_toml(state)}  # init: not run as root"
    return values


def config_text(destination: str, sources: list[PlannedSource], output: str, *,
                defaulted: bool = False) -> str:
    """The configuration ``init`` writes: the sample's blocks, with these values in."""
    out: list[list[str]] = [_header(output)]
    values = _top_level(destination, defaulted=defaulted)
    seen_sources = False
    found = set()
    for block in _blocks(sample_text())[1:]:  # the first is the sample's own header
        code = _first_code(block)
        key = code.split("=", 1)[0].strip()
        if key in values:
            found.add(key)
            out.append(_replaced(block, code, values[key]))
        elif code == "[[sources]]" and not seen_sources:
            found.add("sources")
            seen_sources = True
            at = block.index(code)
            out.append(block[:at] + _source_lines(sources[0]) if sources else block[:at])
            out += [_source_lines(s) for s in sources[1:]]
            out.append(["# Examples from the reference configuration, commented out:",
                        *_commented(block[at:])])
        elif code.startswith("[["):
            out.append(_commented(block))  # the sample server's hooks and sources
        else:
            out.append(block)
    missing = {*values, "sources"} - found
    if missing:
        raise PibackupError(f"{SAMPLE} has changed: no {', '.join(sorted(missing))} block "
                            "found for init to fill in")
    return "\n\n".join("\n".join(b) for b in out) + "\n"


# --- writing ------------------------------------------------------------------------------


def write_new(output: str, text: str) -> None:
    """Write ``text`` at ``output`` atomically, mode 0600, never replacing a file.

    The file is complete and loads (``load_config``) before it appears under
    its name: a hard link, which fails when the name exists, even if another
    process made it a moment ago.
    """
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        # /etc/pibackup-async may not exist yet; it also holds the SMTP password file.
        os.makedirs(folder, mode=0o700)
    fd, temp = tempfile.mkstemp(prefix=".init-", suffix=".toml", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            load_config(temp)
        except ConfigError as e:
            raise InitRefused(e.problems) from None
        _link_new(temp, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    _sync_folder(folder)


def _link_new(temp: str, output: str) -> None:
    try:
        os.link(temp, output)
    except FileExistsError:
        raise InitRefused([f"{output} already exists; init never replaces a file"]) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        # No hard links here (vfat): a rename, after one more look.
        if os.path.lexists(output):
            raise InitRefused([f"{output} already exists; init never replaces a file"]) from None
        os.rename(temp, output)


def _sync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def summary(written: Written) -> Iterator[str]:
    """``name (type)`` per source, for the one-line note."""
    for s in written.sources:
        yield f"{s.name} ({s.kind} {s.path})"
