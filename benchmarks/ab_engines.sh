#!/bin/bash
# Interleaved A/B of engines (before/after a change) and the shell at equal parallelism,
# cold cache, on the 4 trees bench_run.py builds (default /tmp/pibench/trees).
#
#   benchmarks/ab_engines.sh [-j "1 2 4"] [-r REPS] [-t TREES] [-f FILES] NAME=SITE ...
#
# SITE is a plain install of that engine (pip install --no-deps --target SITE <checkout>),
# put first on PYTHONPATH; an empty SITE (``head=``) runs the checkout's own engine. Each
# repetition runs every engine and the shell once per --jobs value, the order rotating
# from one repetition to the next; one line per run, then medians [min-max] and each
# engine's median against the shell's. The load average is printed before and after.
# The shell's commands come from a dry-run of the engine on PYTHONPATH (else the
# checkout's): set it to a plain install when others edit the checkout meanwhile.
set -e
jobs="1 2 4"; reps=3; files=20000; trees=/tmp/pibench/trees
while getopts "j:r:t:f:" opt; do
  case $opt in
    j) jobs=$OPTARG ;; r) reps=$OPTARG ;; t) trees=$OPTARG ;; f) files=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-j JOBS] [-r REPS] [-t TREES] [-f FILES] NAME=SITE ..." >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
py=$repo/.venv/bin/python
# A folder of its own: removing an earlier run's copies first would take minutes of disk.
work=/tmp/ab-$$; mkdir -p $work
names=(); declare -A site
for arg in "$@"; do names+=("${arg%%=*}"); site[${arg%%=*}]=${arg#*=}; done
contenders=("${names[@]}" shell)
out=$work/times; : > $out
config() {  # config DIR JOBS
  {
    echo "destination = \"$1/dest\""; echo "state_dir = \"$1/state\""; echo "concurrency = $2"
    for t in alpha beta gamma delta; do
      printf '[[sources]]\nname = "%s"\ntype = "rsync"\npath = "%s/%s-%s"\n' $t $trees $t $files
    done
  } > $1/config.toml
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for rep in $(seq 1 $reps); do
  n=${#contenders[@]}; shift_by=$(( (rep - 1) % n ))
  order=("${contenders[@]:$shift_by}" "${contenders[@]:0:$shift_by}")
  for j in $jobs; do
    for which in "${order[@]}"; do
      d=$work/$which-j$j-$rep; mkdir -p $d/dest; config $d $j
      if [ $which = shell ]; then
        # The engine's own rsync commands (its dry-run plan), in $j lanes.
        (cd $repo/benchmarks && $py -c "
import sys; from pathlib import Path; from bench_run import planned_rsync_commands, shell_script
srcs = [(t, Path('$trees/%s-$files' % t)) for t in ('alpha', 'beta', 'gamma', 'delta')]
shell_script(Path('$d/run.sh'), planned_rsync_commands(Path('$d/config.toml'), srcs), $j)")
        cmd=(/bin/sh $d/run.sh)
      else
        cmd=(env PYTHONPATH=${site[$which]} $py -m pibackup_async.cli run -c $d/config.toml
             --no-report -q)
      fi
      sync; echo 3 > /proc/sys/vm/drop_caches
      s=$(date +%s.%N); "${cmd[@]}" >/dev/null; e=$(date +%s.%N)
      t=$(echo "$e - $s" | bc); echo "$which j$j rep$rep $t" | tee -a $out
    done
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
$py - "$out" "$jobs" "${contenders[@]}" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
jobs, contenders = sys.argv[2].split(), sys.argv[3:]
print(f"{'':10}" + "".join(f"{'--jobs ' + j:>30}" for j in jobs))
med = {}
for c in contenders:
    cells = []
    for j in jobs:
        v = [float(r[3]) for r in rows if r[0] == c and r[1] == f"j{j}"]
        med[c, j] = statistics.median(v)
        cells.append(f"{med[c, j]:.2f} [{min(v):.2f}-{max(v):.2f}]")
    print(f"{c:10}" + "".join(f"{x:>30}" for x in cells))
for c in contenders[:-1]:
    print(f"{c + ' / shell':10}" + "".join(f"{med[c, j] / med['shell', j]:>30.3f}" for j in jobs))
EOF
rm -rf $work
