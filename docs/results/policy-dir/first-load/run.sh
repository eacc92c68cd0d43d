#!/bin/sh
# Interleaved first loads, before (main at 6d5f99b: `git archive 6d5f99b meshlib benchmarks`
# extracted to $BEFORE, this branch's benchmarks/config_load.py copied over its own) and
# after (this worktree), three times each; then the readers' figures of the after tree.
# Run from the worktree root: sh docs/results/policy-dir/first-load/run.sh
set -e
OUT=docs/results/policy-dir/first-load
BEFORE=${BEFORE:-/tmp/yaml_before}
AFTER=$(git rev-parse --short HEAD)
for i in 1 2 3; do
  (cd "$BEFORE" && "$OLDPWD/.venv/bin/python" benchmarks/config_load.py --many --rounds 3 \
      --json "$OLDPWD/$OUT/before-6d5f99b-$i.json") > "$OUT/before-6d5f99b-$i.txt"
  .venv/bin/python benchmarks/config_load.py --many --rounds 3 \
      --json "$OUT/after-$AFTER-$i.json" > "$OUT/after-$AFTER-$i.txt"
  uptime >> "$OUT/after-$AFTER-$i.txt"
done
.venv/bin/python benchmarks/config_load.py --readers --rounds 5 \
    --json "$OUT/readers-$AFTER.json" > "$OUT/readers-$AFTER.txt"
