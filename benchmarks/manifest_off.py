"""Benchmark-only (bench_manifest.py): the engine's CLI with the manifest step stubbed out.

``python benchmarks/manifest_off.py run -c ...`` is ``python -m pibackup_async.cli
run -c ...`` except that an rsync source's save (its manifest, SPEC §9) does
nothing: the same run without manifests, to measure what they add. Never a
knob of the engine itself: the stub lives here, patched in before the CLI starts.
"""

from __future__ import annotations

import runpy

from pibackup_async.engine.report import StepResult
from pibackup_async.engine.sources import rsync


async def _no_manifest(self: rsync.RsyncWork) -> StepResult:
    return StepResult()


rsync.RsyncWork.save = _no_manifest  # type: ignore[method-assign]
runpy.run_module("pibackup_async.cli", run_name="__main__", alter_sys=True)
