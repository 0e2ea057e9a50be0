"""What a child printing hundreds of megabytes costs the engine (issue 9 item 9).

A backup hook prints ~500 MB, with or without newlines; the engine runs it
through the real CLI (`run`, one tiny rsync source). Compared with the same
command run by `sh -c '... > /dev/null'`: the hook step's duration from the
report, the CLI's wall time, and the engine's peak RSS (`ru_maxrss` of the
CLI process from `wait4`; its children here — sh, head, tr, seq, rsync — are a
few MiB each, so the figure is the engine's own).

    python benchmarks/bench_output.py            # 500 MB, median of 3
    python benchmarks/bench_output.py --mb 50 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "pibackup_async.cli"]


def producers(size: int) -> list[tuple[str, str]]:
    """(label, shell command printing about ``size`` bytes to stdout)."""
    numbers = size // 8 + size // 80  # seq 1 N prints ~8.8 bytes a number around 5e7
    return [
        ("yes | head: 'y\\n' lines", f"yes | head -c {size}"),
        ("/dev/zero | tr: one line", f"head -c {size} /dev/zero | tr '\\0' x"),
        ("seq: number lines", f"seq 1 {numbers}"),
        ("seq | tr -d: one line", f"seq 1 {numbers} | tr -d '\\n'"),
    ]


def run_plain(command: str) -> float:
    begun = time.perf_counter()
    subprocess.run(["sh", "-c", f"{command} > /dev/null"], check=True)
    return time.perf_counter() - begun


def run_engine(work: Path, command: str) -> tuple[float, float, float]:
    """(hook step s, CLI wall s, CLI peak RSS MiB) of one `run` whose pre hook is ``command``."""
    for name in ("dest", "state"):
        shutil.rmtree(work / name, ignore_errors=True)
    (work / "dest").mkdir()
    source = work / "src"
    source.mkdir(exist_ok=True)
    (source / "file.txt").write_text("tiny\n")
    config = work / "config.toml"
    config.write_text(
        f"destination = {json.dumps(str(work / 'dest'))}\n"
        f"state_dir = {json.dumps(str(work / 'state'))}\n\n"
        f"[[backup_hooks]]\nname = \"noisy\"\npre = {json.dumps(command)}\n\n"
        f"[[sources]]\nname = \"tiny\"\ntype = \"rsync\"\npath = {json.dumps(str(source))}\n"
    )
    begun = time.perf_counter()
    proc = subprocess.Popen([*CLI, "run", "-q", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - begun
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"the engine exited {proc.returncode}:\n{err}")
    [report] = sorted((work / "state" / "reports").glob("*.json"))
    [hook] = [h for h in json.loads(report.read_text())["hooks"] if h["hook"] == "noisy"]
    return float(hook["duration_s"]), wall, usage.ru_maxrss / 1024


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500, help="output size in MB (10^6 bytes)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    size = args.mb * 1_000_000
    print(f"{args.mb} MB printed by a backup hook; median [min-max] of {args.reps}")
    print(f"{'producer':30} {'sh >/dev/null s':>22} {'hook step s':>22} {'ratio':>6} "
          f"{'CLI wall s':>8} {'peak RSS MiB':>12}")
    with tempfile.TemporaryDirectory(prefix="bench-output-") as tmp:
        work = Path(tmp)
        for label, command in producers(size):
            plain, hook, wall, rss = [], [], [], []
            for _ in range(args.reps):
                plain.append(run_plain(command))
                h, w, r = run_engine(work, command)
                hook.append(h)
                wall.append(w)
                rss.append(r)
            ratio = statistics.median(hook) / statistics.median(plain)
            print(f"{label:30} {median_range(plain):>22} {median_range(hook):>22} "
                  f"{ratio:6.2f} {statistics.median(wall):10.2f} {max(rss):12.1f}")
    print(f"(commands: {'; '.join(shlex.quote(c) for _, c in producers(size))})")


if __name__ == "__main__":
    main()
