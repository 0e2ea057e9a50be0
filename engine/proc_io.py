"""How far a running process tree has got, read from /proc: live progress at no cost to it.

rsync's own progress output (``--info=progress2``) costs it a formatted write
per file: 6.5% of a copy of 80,000 small files (benchmarks/RESULTS.md). The
kernel already counts what each process writes; reading that a few times a
second costs microseconds.
"""

from __future__ import annotations

# rsync is two or three processes (and ssh for a remote host): a bound that
# a runaway tree cannot turn into a long walk.
_MAX_PROCESSES = 16


def _wchar(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"wchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def most_written(pid: int) -> int | None:
    """The most bytes any one process of ``pid``'s tree has written so far.

    For rsync that is the data it moved: the sender's writes to the receiver
    and the receiver's to the files are both about the size transferred
    (files hard-linked against an earlier backup are not written). None when
    the tree is gone or cannot be read.
    """
    best: int | None = None
    pending, seen = [pid], 0
    while pending and seen < _MAX_PROCESSES:
        current = pending.pop()
        seen += 1
        written = _wchar(current)
        if written is not None and (best is None or written > best):
            best = written
        pending.extend(_children(current))
    return best
