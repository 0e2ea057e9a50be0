"""Benchmark-only (bench_manifest.py): the engine's CLI with the manifest step stubbed out.

``python benchmarks/manifest_off.py run -c ...`` is ``python -m pibackup_async.cli
run -c ...`` except that an rsync source's save writes no manifest (SPEC §9): the
same run without manifests, to measure what they add. It still walks the copy for
its bytes (SPEC §6), as the engine did before manifests (the manifest's walk counts
them now). Never a knob of the engine itself: the stub lives here, patched in before
the CLI starts.
"""

from __future__ import annotations

import os
import runpy

import anyio.from_thread
from pibackup_async.engine.allocated import written_bytes
from pibackup_async.engine.report import StepResult
from pibackup_async.engine.sources import rsync
from pibackup_async.engine.threads import in_worker


async def _no_manifest(self: rsync.RsyncWork) -> StepResult:
    run = self.run
    earlier = await run.dest.newest_holding(run.previous, self.source.name)
    total = await in_worker(written_bytes, os.path.join(run.in_progress_dir, self.source.name),
                            earlier, anyio.from_thread.check_cancelled)
    return StepResult(bytes=total)


rsync.RsyncWork.save = _no_manifest  # type: ignore[method-assign]
runpy.run_module("pibackup_async.cli", run_name="__main__", alter_sys=True)
