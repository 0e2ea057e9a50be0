#!/bin/bash
# Interleaved A/B of two engines (before/after a change), --jobs 2, cold cache, on the
# trees bench_run.py builds under /tmp/pibench. The old engine is a plain install of the
# older commit: pip install --no-deps --target /tmp/old-lead-site <checkout of it>.
set -e
work=/tmp/ab; rm -rf $work; mkdir -p $work
trees=/tmp/pibench/trees
for rep in 1 2 3 4; do
  for which in old new; do
    d=$work/$which-$rep; mkdir -p $d/dest
    {
      echo "destination = \"$d/dest\""; echo "state_dir = \"$d/state\""; echo "concurrency = 2"
      for t in alpha beta gamma delta; do printf '[[sources]]\nname = "%s"\ntype = "rsync"\npath = "%s/%s-20000"\n' $t $trees $t; done
    } > $d/config.toml
    sync; echo 3 > /proc/sys/vm/drop_caches
    if [ $which = old ]; then pp=/tmp/old-lead-site; else pp=; fi
    s=$(date +%s.%N)
    PYTHONPATH=$pp /work/main/.venv/bin/python -m pibackup_async.cli run -c $d/config.toml --no-report -q
    e=$(date +%s.%N)
    echo "$which rep$rep $(echo "$e - $s" | bc)"
  done
done
