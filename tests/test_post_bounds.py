"""The posts' shared deadline (issue 18 bug 10): it holds every post's worst case.

A post past its timeout gets SIGTERM, a grace of 10 s, then SIGKILL and up
to 30 s more (SPEC §2). The posts run shielded under one deadline; when that
deadline counted only their timeouts, posts that ignore SIGTERM used it up
and the last post — the one that unmounts the backup disk — was cancelled
before it started.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

import pytest
from conftest import needs_rsync
from hookkit import (
    HookSpec,
    assert_no_processes,
    hook_script,
    hook_toml,
    order,
    report_hooks,
    sleeper,
    source_toml,
)

if TYPE_CHECKING:
    from conftest import Workspace

pytestmark = [needs_rsync, pytest.mark.slow]

STUBBORN = ("b2", "b3", "b4", "b5")


def _stubborn_hook(ws: Workspace, name: str) -> str:
    """A hook whose post ignores SIGTERM (its sleep too: an ignored signal stays ignored
    across exec) and outlives its 1 s timeout, so it ends by SIGKILL after the grace."""
    post = (f"trap '' TERM\n{hook_script(ws, HookSpec(name), 'post')}\n"
            f"{shlex.quote(str(sleeper(ws)))} 60")
    # TOML reads a JSON string as a basic string.
    return (f'[[backup_hooks]]\nname = "{name}"\n'
            f"pre = {json.dumps(hook_script(ws, HookSpec(name), 'pre'))}\n"
            f"post = {json.dumps(post)}\ntimeout = \"1s\"\n")


def test_the_last_post_runs_after_posts_that_ignore_sigterm(ws: Workspace) -> None:
    # b1 is the umount: first in the file, so its post runs last.
    body = hook_toml(ws, HookSpec("b1", timeout="1s"))
    body += "".join(_stubborn_hook(ws, name) for name in STUBBORN)
    ws.write_config(body + source_toml("alpha", ws.make_source("alpha")))
    result = ws.run("run", timeout=110)
    assert order(ws) == ["b1.pre", "b2.pre", "b3.pre", "b4.pre", "b5.pre",
                         "b5.post", "b4.post", "b3.post", "b2.post", "b1.post"], result.stderr
    report = ws.report()
    posts = [(hook, status) for hook, phase, status in report_hooks(report) if phase == "post"]
    assert posts == [("b5", "failed"), ("b4", "failed"), ("b3", "failed"), ("b2", "failed"),
                     ("b1", "ok")]
    assert report["failure"] == 'hook "b5" post failed: timed out after 1s'
    assert (report["status"], report["saved"], result.returncode) == ("failed", True, 1)
    assert_no_processes(ws)
