"""A probe, not the engine: what hashing a first backup's files in worker processes would give.

``bench_manifest.py --per-file`` runs it beside ``write_manifest``. The
manifest's step is one thread of one process (two threads contend for the
interpreter lock: measured slower, RESULTS.md), so the only way onto a
second CPU is another process. This is the cheapest such process: ``python
-I -S`` running the few lines of ``WORKER`` (no engine import: 12 MB, 10 ms
to start), handed each folder's open descriptor over a Unix socket
(SCM_RIGHTS, so no path is resolved twice) and a share of its names; it
answers with a digest, ``st_nlink``, ``st_ino`` and ``st_blocks`` per name,
what the manifest's walk needs. The walk here only lists folders and waits:
no line formatted, nothing written, so it is a lower bound on the engine's
wall time with such a pool.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

WORKER = r"""
import hashlib, os, socket, stat, struct
s = socket.socket(fileno=3)
FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOATIME
def exactly(n):
    got = bytearray()
    while len(got) < n:
        part = s.recv(n - len(got))
        if not part:
            raise SystemExit
        got += part
    return bytes(got)
while True:
    head, fds, _, _ = socket.recv_fds(s, 8, 1)
    if not head:
        break
    head += exactly(8 - len(head))
    folder = fds[0]
    out = []
    for name in exactly(struct.unpack("Q", head)[0]).split(b"\0"):
        fd = os.open(name, FLAGS, dir_fd=folder)
        st = os.fstat(fd)
        digest = hashlib.sha256()
        while True:
            data = os.read(fd, 1 << 20)
            if not data:
                break
            digest.update(data)
        os.close(fd)
        out.append(struct.pack("<32sQQQ", digest.digest(), st.st_nlink, st.st_ino, st.st_blocks))
    os.close(folder)
    body = b"".join(out)
    s.sendall(struct.pack("Q", len(body)) + body)
"""


def _exactly(s: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        part = s.recv(n - len(got))
        if not part:
            raise EOFError("a worker went away")
        got += part
    return bytes(got)


def pool_wall_s(top: str, workers: int, reps: int = 4) -> float:
    """Best wall time of hashing every file of ``top``'s folders (one level) in ``workers``."""
    pool = []
    for _ in range(workers):
        mine, theirs = socket.socketpair()
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c",
             f"import os; os.dup2({theirs.fileno()}, 3); exec({WORKER!r})"],
            pass_fds=(theirs.fileno(),))
        theirs.close()
        pool.append((child, mine))
    folders = sorted(e.path for e in os.scandir(top) if e.is_dir(follow_symlinks=False))
    best = float("inf")
    try:
        for _ in range(reps):
            started = time.perf_counter()
            for path in folders:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                with os.scandir(fd) as listing:
                    names = sorted(os.fsencode(e.name) for e in listing
                                   if e.is_file(follow_symlinks=False))
                shares = [names[i::workers] for i in range(workers)]
                for (_, s), share in zip(pool, shares, strict=True):
                    body = b"\0".join(share)
                    socket.send_fds(s, [struct.pack("Q", len(body))], [fd])
                    s.sendall(body)
                for _, s in pool:
                    _exactly(s, struct.unpack("Q", _exactly(s, 8))[0])
                os.close(fd)
            best = min(best, time.perf_counter() - started)
    finally:
        for child, s in pool:
            s.close()
            child.wait()
    return best
