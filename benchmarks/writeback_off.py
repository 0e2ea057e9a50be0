"""Benchmark-only (writeback_pairs.py): the engine's CLI with ``start_writeback`` a no-op.

``python benchmarks/writeback_off.py run -c ...`` is ``python -m pibackup_async.cli
run -c ...`` except that the destination is not asked to start writing back what
the copies wrote when the snapshot window closes: the same run without that head
start, to measure what it gives. Never a knob of the engine itself.
"""

from __future__ import annotations

import runpy

from pibackup_async.engine.destination import LocalDestination

LocalDestination.start_writeback = lambda self: None  # type: ignore[method-assign]
runpy.run_module("pibackup_async.cli", run_name="__main__", alter_sys=True)
