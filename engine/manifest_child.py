"""The program a manifest that reads every file is written in, a process of its own.

A manifest that reads every file (nothing to inherit) is CPU bound: the
Python around each file's system calls, in the one thread the interpreter
lock lets run at a time. Run in a process of its own, the manifests of
several sources take several CPUs at once (destination.py starts them);
nothing else changes: this is ``manifest.write_manifest``, the same walk,
the same file.

Run as ``python -m pibackup_async.engine.manifest_child BACKUP_DIR SOURCE
--beat S``. It imports only the manifest's modules (the engine package
loads nothing eagerly), so it starts in a few tens of milliseconds. Its
standard output is the protocol, one line at a time:

- ``<files>``: still moving (the lines written so far), at most every
  ``--beat`` seconds; the parent counts a stall from the last one;
- at the end, one JSON object: ``{"made": {...}}`` (the fields of
  ``Made``), exit 0, or ``{"error": {"errno", "strerror", "filename"}}``,
  exit 1. Anything else (a traceback on stderr, a signal) is a fault of
  the child itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from .manifest import write_manifest


class _Beat:
    """Says how far the walk is, now and then, and ends the child with its parent."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.files = 0
        self.said = time.monotonic()
        self.parent = os.getppid()

    def on_file(self, files: int) -> None:
        self.files = files

    def check(self) -> None:
        now = time.monotonic()
        if now - self.said < self.every_s:
            return
        self.said = now
        # Without setpriv's parent-death signal, this is how a child of an
        # engine that was killed stops reading a backup nobody will finish.
        if os.getppid() != self.parent:
            os._exit(3)
        _say(str(self.files))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="manifest_child")
    parser.add_argument("backup_dir")
    parser.add_argument("source")
    parser.add_argument("--beat", type=float, required=True)
    args = parser.parse_args(argv)
    beat = _Beat(args.beat)
    try:
        # ``check`` comes between files and between the blocks of a big one: a
        # line then, as long as the reads move, even within one file.
        made = write_manifest(args.backup_dir, args.source, None, beat.check, beat.on_file)
    except OSError as e:
        _say(json.dumps({"error": {"errno": e.errno, "strerror": e.strerror,
                                   "filename": os.fsdecode(e.filename) if e.filename else None}}))
        return 1
    _say(json.dumps({"made": dataclasses.asdict(made)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
