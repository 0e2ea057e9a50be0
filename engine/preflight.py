"""What ``check`` can tell about the machine beyond the file: paths, filesystems, subvolumes."""

from __future__ import annotations

import os

from .config import BtrfsSource, Config
from .filesystems import filesystem_type
from .sources import btrfs

# Filesystems that cannot keep owners, ACLs or xattrs (NOTES pitfall 13).
_POOR_FILESYSTEMS = {"vfat", "msdos", "exfat", "fat", "ntfs", "ntfs3", "fuseblk"}


def preflight(config: Config) -> tuple[list[str], list[str]]:
    """Problems (the run cannot work) and warnings (it may not), each with its key path.

    Paths that do not exist yet only warn: a backup hook may mount them.
    """
    problems: list[str] = []
    warnings: list[str] = []
    dest = config.destination
    if not os.path.isdir(dest):
        warnings.append(f"destination: {dest} does not exist (yet); a backup hook may mount it")
    else:
        fstype = filesystem_type(dest)
        poor = [s.name for s in config.sources
                if not ("--no-A" in s.rsync_args and "--no-X" in s.rsync_args)]
        if fstype in _POOR_FILESYSTEMS and poor:
            warnings.append(
                f"destination: its filesystem ({fstype}) cannot keep owners, ACLs or xattrs; "
                f'rsync will fail for {", ".join(poor)}: add rsync_args = ["--no-A", "--no-X"]')
    for i, source in enumerate(config.sources):
        if not isinstance(source, BtrfsSource) or source.host is not None:
            continue
        if not os.path.exists(source.path):
            warnings.append(f"sources[{i}].path: {source.path} does not exist (yet)")
            continue
        problems += [f"sources[{i}].path: {p}" for p in btrfs.source_problems(source)]
    return problems, warnings
