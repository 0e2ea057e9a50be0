"""Where a source's wall time goes at ``--jobs 1``, outside rsync itself: the engine against xargs.

Run as root from the repository root (needs ``perf``)::

    python benchmarks/trace_source_cost.py                 # K = 100 sources of 200 files
    python benchmarks/trace_source_cost.py --sources 20 --files 50

Two runs, each under ``perf record -a -k CLOCK_MONOTONIC`` of the scheduler's
fork, exec and exit events (cheap tracepoints, not ptrace): the engine, with
monotonic marks written from inside it around the per-source machinery
(``--trace-child``: this script run as the CLI with those functions wrapped),
and ``xargs -P 1 -L 1 rsync`` on the engine's own rsync commands. Both clocks
are CLOCK_MONOTONIC, so the marks and the kernel's events interleave. For
each segment of a source's life the median over the sources is printed.
Under load every hand-over (a thread, a child, the event loop waking) waits
for a CPU: compare within one invocation, and print the load beside it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_EVENTS = "sched:sched_process_fork,sched:sched_process_exec,sched:sched_process_exit"
_LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+(\d+\.\d+):\s+sched:(\w+):\s*(.*)$")


def _trace_child(marks: str, argv: list[str]) -> None:
    """The CLI with monotonic marks around a source's copy (run in the traced process)."""
    fd = os.open(marks, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)

    def mark(what: str, extra: object = "") -> None:
        os.write(fd, f"{time.monotonic():.6f} {what} {extra}\n".encode())

    import anyio
    from pibackup_async.engine.sources import rsync

    def wrap(module: Any, name: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            mark(name + ">")
            try:
                return await original(*args, **kwargs)
            finally:
                mark("<" + name)

        setattr(module, name, wrapped)

    open_process = anyio.open_process

    async def traced_open(*args: Any, **kwargs: Any) -> Any:
        mark("spawn>")
        process = await open_process(*args, **kwargs)
        mark("<spawn", process.pid)
        return process

    anyio.open_process = traced_open  # type: ignore[assignment]
    for name in ("copy_into", "run_process", "written"):
        wrap(rsync, name)
    from pibackup_async.cli.main import main

    sys.argv = ["pibackup-async", *argv]
    raise SystemExit(main())


def _perf_events(data: Path) -> list[tuple[float, str, str, str]]:
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    events = []
    for line in out.splitlines():
        m = _LINE.match(line)
        if m:
            _, pid, t, kind, rest = m.groups()
            events.append((float(t), kind, pid, rest))
    return events


def _print(title: str, rows: list[dict[str, float]], order: list[str]) -> None:
    print(title)
    for a, b in itertools.pairwise(order):
        values = [(r[b] - r[a]) * 1e3 for r in rows if a in r and b in r]
        if values:
            print(f"  {a:>14} -> {b:<14} {statistics.median(values):8.2f} ms "
                  f"(mean {statistics.mean(values):.2f}, n={len(values)})")
    whole = [(r["next"] - r[order[0]]) * 1e3 for r in rows if "next" in r]
    own = [(r["exit"] - r["exec rsync"]) * 1e3 for r in rows if "exit" in r and "exec rsync" in r]
    if whole and own:
        around = statistics.median(whole) - statistics.median(own)
        print(f"  a source: {statistics.median(whole):.2f} ms, of which rsync (exec to exit) "
              f"{statistics.median(own):.2f} ms: {around:.2f} ms around it")


def engine_rows(marks: Path, data: Path) -> list[dict[str, float]]:
    events: list[tuple[float, str, str, str]] = []
    for line in marks.read_text().splitlines():
        t, what, *extra = line.split()
        events.append((float(t), "mark:" + what, extra[0] if extra else "", ""))
    events += _perf_events(data)
    events.sort()
    rows: list[dict[str, float]] = []
    row: dict[str, Any] = {}
    for t, kind, who, rest in events:
        if kind == "mark:copy_into>":
            row = {"step start": t}
            rows.append(row)
        elif not row:
            continue
        elif kind == "mark:spawn>":
            row.setdefault("spawn call", t)
        elif kind == "mark:<spawn":
            row.setdefault("pid", who)
        elif kind == "sched_process_fork" and "fork" not in row and "spawn call" in row:
            row["fork"], row["pid"] = t, re.search(r"child_pid=(\d+)", rest).group(1)  # type: ignore[union-attr]
        elif kind == "sched_process_exec" and who == row.get("pid"):
            row["exec setpriv" if rest.split()[0].endswith("setpriv") else "exec rsync"] = t
        elif kind == "sched_process_exit" and who == row.get("pid"):
            row["exit"] = t
        elif kind == "mark:<run_process":
            row.setdefault("rsync reaped", t)
        elif kind == "mark:written>":
            row["walk start"] = t
        elif kind == "mark:<written":
            row["walk end"] = t
    for this, following in itertools.pairwise(rows):
        this["next"] = following["step start"]
    return rows


def shell_rows(data: Path) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    xargs = None
    for t, kind, pid, rest in _perf_events(data):
        if kind == "sched_process_exec" and rest.startswith("filename=") and \
                rest.split()[0].endswith("/xargs"):
            xargs = pid
        elif xargs is None:
            continue
        elif kind == "sched_process_fork" and pid == xargs:
            child = re.search(r"child_pid=(\d+)", rest).group(1)  # type: ignore[union-attr]
            rows.append({"fork": t, "pid": float(child)})
        elif rows and pid == str(int(rows[-1]["pid"])):
            if kind == "sched_process_exec":
                rows[-1].setdefault("exec rsync", t)
            elif kind == "sched_process_exit":
                rows[-1]["exit"] = t
    for this, following in itertools.pairwise(rows):
        this["next"] = following["fork"]
    return rows


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--trace-child":
        _trace_child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=100)
    parser.add_argument("--files", type=int, default=200, help="files of 1 KiB a source")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "trace")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed (apt-get install linux-perf)")
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cost import build_sources
    from bench_run import engine_config, planned_rsync_commands

    work = args.work.resolve()
    sources = build_sources(work / "src", args.sources, args.files)
    shutil.rmtree(work / "runs", ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    load_before = os.getloadavg()

    run = work / "runs" / "engine"
    (run / "dest").mkdir(parents=True)
    config = engine_config(run / "config.toml", run / "dest", run / "state", sources)
    marks, data = run / "marks", run / "perf.data"
    subprocess.run(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-a", "-e", _EVENTS,
                    "-o", str(data), "--", sys.executable, __file__, "--trace-child", str(marks),
                    "run", "-c", str(config), "--jobs", "1", "-q", "--no-report"],
                   check=True, env=env, stderr=subprocess.DEVNULL)
    engine = engine_rows(marks, data)

    run = work / "runs" / "shell"
    (run / "dest").mkdir(parents=True)
    config = engine_config(run / "config.toml", run / "dest", run / "state", sources)
    commands = planned_rsync_commands(config, sources)
    (run / "commands").write_text("".join(
        shlex.join(argv[1:]) + "\n" for argv in commands))
    targets = sorted({os.path.dirname(argv[-1].rstrip("/")) for argv in commands})
    for target in targets:
        os.makedirs(target, exist_ok=True)
    data = run / "perf.data"
    with open(run / "commands") as commands_file:
        subprocess.run(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-a", "-e", _EVENTS,
                        "-o", str(data), "--", "xargs", "-P", "1", "-L", "1", "rsync"],
                       stdin=commands_file, stdout=subprocess.DEVNULL, check=True)
    shell = shell_rows(data)
    load_after = os.getloadavg()
    shutil.rmtree(work / "runs", ignore_errors=True)

    print(f"{args.sources} sources x {args.files} files of 1 KiB, --jobs 1, warm; load average "
          f"before {load_before[0]:.2f}, after {load_after[0]:.2f}; medians over the sources")
    _print("the engine:", engine, ["step start", "spawn call", "fork", "exec setpriv",
                                   "exec rsync", "exit", "rsync reaped", "walk start",
                                   "walk end", "next"])
    _print("xargs -P 1 rsync:", shell, ["fork", "exec rsync", "exit", "next"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
