"""``serve --read-only PATH``: the forced command of a mirror's SSH key on the origin (SPEC §10).

sshd runs it for every session of that key, with what the client asked for in
``SSH_ORIGINAL_COMMAND``. It lets through only what a mirror needs, by
exec'ing the program itself (the stream goes straight from it to sshd):

- ``rsync --server --sender …`` reading under PATH, with the options a pull
  sends and that ``rrsync -ro`` accepts, less those that follow links out or
  write; ``--confine-root`` added, so file lists and merge files that travel
  inside rsync's protocol cannot resolve outside PATH either;
- ``btrfs send [-p PARENT] [-c CLONE]… SUBVOL…`` of subvolumes under PATH;
- ``true`` (``check --connect``'s "can I log in").

Anything else is refused with one line on stderr and exit 1. It reads no
configuration and imports no engine module: importing ``pibackup_async.engine``
costs about half a second, which every rsync of a mirror would pay here.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

PROG = "pibackup-async serve"

# rrsync's short options (a pull sends them as one cluster such as
# -lHogDtpAXrSe.iLsfxCIvu), less -s (the arguments would travel inside the
# protocol, past this check) and -L/-k/-K (links followed out of PATH).
_SHORT = "ACDEHIJNORSUWXbcdglmnopqrtuvxyz"
_SHORT_CLUSTER = re.compile(rf"^-(?=.)[{_SHORT}]*(e\d*\.\w*)?$")
_SHORT_NUMBER = re.compile(r"^-[@B]\d+$")

# The long options a sender may be given (rrsync -ro's list, narrowed): a
# value in the set takes an argument, which needs no check (it names no path).
_LONG_PLAIN = frozenset({
    "append", "delay-updates", "dirs", "existing", "from0", "fuzzy", "group", "hard-links",
    "ignore-existing", "ignore-missing-args", "ignore-times", "inplace", "links", "list-only",
    "msgs2stderr", "munge-links", "new-compress", "no-W", "no-implied-dirs", "no-msgs2stderr",
    "no-r", "no-relative", "no-specials", "numeric-ids", "old-compress", "one-file-system",
    "open-noatime", "owner", "partial", "perms", "preallocate", "recursive", "safe-links",
    "size-only", "sparse", "specials", "stats", "times", "use-qsort",
})
_LONG_VALUE = frozenset({
    "block-size", "bwlimit", "checksum-choice", "checksum-seed", "compress-choice",
    "compress-level", "compress-threads", "groupmap", "iconv", "info", "log-format",
    "max-alloc", "max-size", "min-size", "modify-window", "skip-compress", "stderr",
    "timeout", "usermap",
})
# Why the dangerous ones are refused, said in the refusal.
_WHY = {
    "copy-links": "follows symbolic links out of the served folder",
    "copy-unsafe-links": "follows symbolic links out of the served folder",
    "copy-dirlinks": "follows symbolic links out of the served folder",
    "keep-dirlinks": "follows symbolic links out of the served folder",
    "copy-devices": "reads devices",
    "remove-source-files": "removes files on this side",
    "remove-sent-files": "removes files on this side",
    "log-file": "writes a file on this side",
    "write-batch": "writes a file on this side",
    "only-write-batch": "writes a file on this side",
    "secluded-args": "hides the arguments from this check",
    "protect-args": "hides the arguments from this check",
}
_SHORT_WHY = {
    "L": "copy-links", "k": "copy-dirlinks", "K": "keep-dirlinks", "s": "secluded-args",
}
_BTRFS_PLAIN = frozenset({"-q", "--quiet", "-v", "--verbose", "-e", "--compressed-data"})


class Refused(Exception):
    """What the client asked for is not something a mirror may do; the message says why."""


@dataclass(frozen=True)
class Root:
    """The served folder: as the forced command names it, and with its links resolved."""

    given: str
    real: str

    @classmethod
    def of(cls, path: str) -> Root:
        if not os.path.isabs(path):
            raise Refused(f"the served folder must be an absolute path: {path!r}")
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise Refused(f"the served folder {path} is not a folder here")
        return cls(os.path.normpath(path), real)

    def relative(self, arg: str) -> list[str]:
        """``arg``'s components below the root; Refused if it may lead elsewhere."""
        text = re.sub("/+", "/", arg)
        if text.startswith("/"):
            for prefix in (self.given, self.real):
                base = prefix.rstrip("/")
                if text == base or text.startswith(base + "/"):
                    text = text[len(base):]
                    break
            else:
                raise Refused(f"{arg!r} is outside the served folder {self.given}")
        parts = text.split("/")
        if ".." in parts:
            raise Refused(f"{arg!r} has a '..' in it")
        return [part for part in parts if part not in ("", ".")]

    def check(self, arg: str, *, subvolume: bool = False) -> None:
        """Refused unless ``arg`` names something under the root without a link on the way.

        Walked one component at a time from the root without following any
        link (openat with O_NOFOLLOW), so what is checked is what is there,
        not where a link leads. A path that ends early (a backup deleted
        meanwhile) passes: rsync or btrfs says it is missing.
        """
        parts = self.relative(arg)
        fd = os.open(self.real, os.O_PATH | os.O_DIRECTORY)
        try:
            for index, part in enumerate(parts):
                try:
                    child = os.open(part, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    return
                os.close(fd)
                fd = child
                mode = os.fstat(fd).st_mode
                if stat.S_ISLNK(mode):
                    walked = "/".join(parts[:index + 1])
                    raise Refused(f"{arg!r}: {walked} is a symbolic link")
                if index < len(parts) - 1 and not stat.S_ISDIR(mode):
                    return
            if subvolume and not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise Refused(f"{arg!r} is not a subvolume")
        finally:
            os.close(fd)


def _refuse_long(name: str) -> Refused:
    return Refused(f"rsync option --{name} {_WHY.get(name, 'is not one a mirror needs')}")


def _rsync(words: list[str], root: Root) -> list[str]:
    """The rsync command to exec for ``rsync --server --sender …``; Refused otherwise."""
    if words[1:2] != ["--server"]:
        raise Refused("only rsync's server side may run here (--server first)")
    if words[2:3] != ["--sender"]:
        raise Refused("only reading is allowed here: rsync must be the sender (a pull)")
    options: list[str] = []
    rest = words[3:]
    index = 0
    while index < len(rest):
        word = rest[index]
        index += 1
        if word == ".":
            break
        if word.startswith("--"):
            name, has_value, _ = word[2:].partition("=")
            if name in _LONG_PLAIN and not has_value:
                options.append(word)
            elif name in _LONG_VALUE:
                if not has_value:
                    if index >= len(rest):
                        raise Refused(f"rsync option --{name} needs a value")
                    word = f"--{name}={rest[index]}"
                    index += 1
                options.append(word)
            elif name == "files-from":
                value = word.partition("=")[2] if has_value else (
                    rest[index] if index < len(rest) else "")
                index += 0 if has_value else 1
                if value != "-":
                    raise Refused("rsync's --files-from may only come from the client (-)")
                options.append("--files-from=-")
            else:
                raise _refuse_long(name)
        elif _SHORT_CLUSTER.match(word) or _SHORT_NUMBER.match(word):
            options.append(word)
        elif word.startswith("-") and len(word) > 1:
            letters = word[1:].split("e.", 1)[0]
            for letter in letters:
                if letter in _SHORT_WHY:
                    raise _refuse_long(_SHORT_WHY[letter])
            raise Refused(f"rsync option {word} is not one a mirror needs")
        else:
            raise Refused(f"rsync argument {word!r} before the '.' that starts the paths")
    else:
        raise Refused("not an rsync server command line (no '.' before the paths)")
    paths = rest[index:] or ["."]
    for path in paths:
        root.check(path)
    # rrsync's safeguard: a merge file or a --files-from name that rsync
    # opens itself never resolves outside the served folder.
    return ["rsync", "--server", "--sender", *options, f"--confine-root={root.real}",
            "--", ".", *paths]


def _btrfs(words: list[str], root: Root) -> list[str]:
    """The btrfs command to exec for ``btrfs send …``; Refused otherwise."""
    if words[1:2] != ["send"]:
        raise Refused("only `btrfs send` may run here")
    options: list[str] = []
    subvolumes: list[str] = []
    rest = words[2:]
    index = 0
    while index < len(rest):
        word = rest[index]
        index += 1
        if subvolumes or not word.startswith("-") or word == "-":
            subvolumes.append(word)
        elif word == "--":
            subvolumes += rest[index:]
            break
        elif word in _BTRFS_PLAIN:
            options.append(word)
        elif word in ("-p", "-c"):
            if index >= len(rest):
                raise Refused(f"btrfs send {word} needs a subvolume")
            root.check(rest[index], subvolume=True)
            options += [word, rest[index]]
            index += 1
        elif word.startswith("--proto"):
            value = word.partition("=")[2] if "=" in word else (
                rest[index] if index < len(rest) else "")
            index += 0 if "=" in word else 1
            if word not in ("--proto", f"--proto={value}") or not value.isdigit():
                raise Refused(f"btrfs send {word}: a protocol number is expected")
            options.append(f"--proto={value}")
        elif word.startswith("-f"):
            raise Refused("btrfs send -f writes a file on this side")
        else:
            raise Refused(f"btrfs send option {word} is not one a mirror needs")
    if not subvolumes:
        raise Refused("btrfs send needs a subvolume")
    for subvolume in subvolumes:
        root.check(subvolume, subvolume=True)
    return ["btrfs", "send", *options, "--", *subvolumes]


def allowed(command: str | None, path: str) -> list[str]:
    """The argv to exec for the client's ``command`` served from ``path``; Refused if none.

    ``command`` is split as a shell would split it (rsync quotes its
    arguments for the remote shell), but nothing is expanded and no shell
    runs: a ``;`` or ``$(…)`` is a word like any other, and then refused.
    """
    root = Root.of(path)
    if command is None:
        raise Refused("no command: this key only serves a mirror's rsync and btrfs send")
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise Refused(f"cannot read the command: {e}") from None
    if words == ["true"]:
        return words
    program = words[0] if words else ""
    if program == "rsync":
        return _rsync(words, root)
    if program == "btrfs":
        return _btrfs(words, root)
    shown = command if len(command) <= 60 else command[:57] + "..."
    raise Refused(f"{shown!r}: this key only serves a mirror's rsync and btrfs send")


def serve(path: str, environ: Mapping[str, str]) -> int:
    """Exec what the client asked for, if allowed; else one line on stderr and 1."""
    try:
        if environ.get("SUDO_USER"):
            raise Refused("refusing to run through sudo: the key's own user serves")
        argv = allowed(environ.get("SSH_ORIGINAL_COMMAND"), path)
        if argv == ["true"]:
            return 0
        # Relative paths are the served folder's.
        os.chdir(os.path.realpath(path))
        sys.stderr.flush()
        os.execvp(argv[0], argv)
    except Refused as e:
        print(f"{PROG}: refused: {e}", file=sys.stderr)
    except OSError as e:
        print(f"{PROG}: refused: {e.strerror or e}", file=sys.stderr)
    return 1
