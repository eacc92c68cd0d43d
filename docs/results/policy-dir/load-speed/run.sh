cd /work/wt-load
OUT=docs/results/policy-dir/load-speed
for run in 1 2 3; do
  for which in before after; do
    if [ $which = before ]; then tree=/tmp/load/main; tag=before-55b97ee; else tree=/tmp/load/after; tag=after-1b1d032; fi
    (cd $tree && PYTHONPATH=$tree /work/wt-load/.venv/bin/python benchmarks/config_load.py --many --rounds 3 --json /work/wt-load/$OUT/$tag-$run.json) > $OUT/$tag-$run.txt 2>&1
    echo "$tag run $run: $(uptime | sed 's/.*load/load/')" >> $OUT/$tag-$run.txt
  done
done
