"""What filesystem a path lives on, read from /proc/self/mountinfo, and what a btrfs
subvolume says of itself: no subprocess for either."""

from __future__ import annotations

import ctypes
import fcntl
import os
import uuid
from dataclasses import dataclass

# The first inode of every btrfs subvolume (BTRFS_FIRST_FREE_OBJECTID).
SUBVOLUME_INODE = 256


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str  # the device, e.g. /dev/loop3; equal sources = the same filesystem
    # The folder of the filesystem mounted there (a bind mount's, a btrfs subvol=).
    root: str = "/"


def is_within(child: str, parent: str) -> bool:
    """True when ``child`` is ``parent`` or lies below it (paths normalised, not resolved)."""
    child, parent = os.path.normpath(child), os.path.normpath(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor, resolved."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and path != "/":
        path = os.path.dirname(path)
    return os.path.realpath(path)


def mount_of(path: str) -> Mount | None:
    """The mount that holds ``path`` (or its nearest existing ancestor)."""
    real = _existing(path)
    best: Mount | None = None
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        point = _unescape(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        # Later lines are newer mounts and win over earlier ones at the same point.
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = Mount(point, tail[0], _unescape(tail[1]), _unescape(fields[3]))
    return best


def filesystem_type(path: str) -> str | None:
    mount = mount_of(path)
    return None if mount is None else mount.fstype


def is_btrfs(path: str) -> bool:
    return filesystem_type(path) == "btrfs"


def is_subvolume(path: str) -> bool:
    """True when ``path`` is the top of a btrfs subvolume."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_ino == SUBVOLUME_INODE and is_btrfs(path)


def same_filesystem(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` (or their nearest existing ancestors) share a filesystem.

    btrfs gives every subvolume its own st_dev, so device numbers cannot
    tell; the mount's source device can.
    """
    ma, mb = mount_of(a), mount_of(b)
    return ma is not None and mb is not None and (ma.fstype, ma.source) == (mb.fstype, mb.source)


def on_mounted_filesystem(path: str) -> bool:
    """True when ``path`` (resolved) is a mount point or lies under one, other than ``/``.

    What ``require_mountpoint`` asks of the destination: the backup disk is
    mounted, so nothing is written to the root filesystem by mistake.
    """
    mount = mount_of(os.path.realpath(path))
    return mount is not None and mount.mount_point != "/"


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_uint64), ("nsec", ctypes.c_uint32)]


class _SubvolInfo(ctypes.Structure):
    """struct btrfs_ioctl_get_subvol_info_args (linux/btrfs.h)."""

    _fields_ = [("treeid", ctypes.c_uint64), ("name", ctypes.c_char * 256),
                ("parent_id", ctypes.c_uint64), ("dirid", ctypes.c_uint64),
                ("generation", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("uuid", ctypes.c_uint8 * 16), ("parent_uuid", ctypes.c_uint8 * 16),
                ("received_uuid", ctypes.c_uint8 * 16),
                ("ctransid", ctypes.c_uint64), ("otransid", ctypes.c_uint64),
                ("stransid", ctypes.c_uint64), ("rtransid", ctypes.c_uint64),
                ("ctime", _Timespec), ("otime", _Timespec), ("stime", _Timespec),
                ("rtime", _Timespec), ("reserved", ctypes.c_uint64 * 8)]


# _IOR(BTRFS_IOCTL_MAGIC, 60, struct btrfs_ioctl_get_subvol_info_args), Linux 4.18.
_GET_SUBVOL_INFO = (2 << 30) | (ctypes.sizeof(_SubvolInfo) << 16) | (0x94 << 8) | 60
_ROOT_SUBVOL_RDONLY = 1


def subvolume_info(path: str) -> dict[str, str] | None:
    """``UUID``, ``Received UUID`` and ``Flags`` as ``btrfs subvolume show`` says them.

    One unprivileged ioctl instead of a ``btrfs`` process (5 ms each, three a
    source a run). None when ``path`` is not the top of a subvolume or the
    kernel does not answer: the caller asks ``btrfs subvolume show`` then.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_ino != SUBVOLUME_INODE:
            return None
        info = _SubvolInfo()
        fcntl.ioctl(fd, _GET_SUBVOL_INFO, info, True)
    except OSError:
        return None
    finally:
        os.close(fd)
    received = bytes(info.received_uuid)
    return {"UUID": str(uuid.UUID(bytes=bytes(info.uuid))),
            "Received UUID": str(uuid.UUID(bytes=received)) if any(received) else "-",
            "Flags": "readonly" if info.flags & _ROOT_SUBVOL_RDONLY else "-"}


# Filesystems that keep no journal: after a power cut a file may have its name and
# size but not its content, whatever was flushed in between (SPEC §1).
_WITHOUT_JOURNAL = {"vfat", "msdos", "fat", "exfat", "ext2"}


def _kernel_name(path: str) -> str | None:
    """The block device's kernel name (``sda1``, ``loop3``) of the filesystem of ``path``:
    what /sys/fs/ext4 and /proc/fs/jbd2 name it by."""
    try:
        dev = os.stat(path).st_dev
        return os.path.basename(os.path.realpath(
            f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    except OSError:
        return None


def _ext_has_journal(path: str) -> bool | None:
    """An ext3/ext4 filesystem has a journal (its jbd2 thread runs), or None if unknown.

    Read from what the kernel publishes of the mounted filesystem, so no
    device needs to be opened: /sys/fs/ext4/<dev>/journal_task names the
    journal's thread, ``<none>`` without one; /proc/fs/jbd2/<dev>-<inode>
    exists only for a journal.
    """
    name = _kernel_name(path)
    if name is None:
        return None
    try:
        with open(f"/sys/fs/ext4/{name}/journal_task") as f:
            return f.read().strip() != "<none>"
    except OSError:
        pass
    try:
        return any(entry.startswith(f"{name}-") for entry in os.listdir("/proc/fs/jbd2"))
    except OSError:
        return None


def durability_problem(path: str) -> str | None:
    """Why the filesystem of ``path`` cannot promise that a flushed file survives a power
    cut whole ("vfat, which has no journal"), or None (also when it cannot be told)."""
    fstype = filesystem_type(path)
    if fstype in _WITHOUT_JOURNAL:
        return f"{fstype}, which has no journal"
    if fstype in ("ext3", "ext4") and _ext_has_journal(path) is False:
        return f"{fstype} without a journal"
    return None
