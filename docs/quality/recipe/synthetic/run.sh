#!/usr/bin/env bash
# Does `mldcn tune` beat the default where the default recipe was not selected? The built-in
# synthetic generator (100k rows, seed 0), DCNv2 and ML-DCN at the small level: 20 trials each
# (recipe space, 2 seeds per trial, the no-regret check on 5 fresh seeds), then the default and
# the kept configs over 5 seeds on the held-out test rows (~25 minutes on one core).
#
#   docs/quality/recipe/synthetic/run.sh [OUT]      (default docs/quality/recipe/synthetic)
# With the default OUT the committed studies resume and nothing runs: pass a new OUT to redo them.
set -euo pipefail
out="${1:-docs/quality/recipe/synthetic}"
mkdir -p "$out"
syn=.cache/mldcn/synth100k
[ -f "$syn/data.parquet" ] || mldcn synth --rows 100000 --seed 0 --format parquet "$syn"
data=(--data "$syn/data.parquet" --schema "$syn/schema.json" --split random --valid-frac 0.1
      --test-frac 0.1 --split-seed 0)
mldcn tune "${data[@]}" --archs dcnv2,mldcn --level small --trials 20 --seeds-per-trial 2 \
  --lr 0.001 --batch-size 2048 --patience 2 --threads 1 --confirm-seeds 5 --out "$out/tune" \
  2> "$out/tune.log"
common=(--archs dcnv2,mldcn --levels small --seeds 5 --batch-size 2048 --lr 0.001 --patience 2
        --threads 1)
mldcn bench quality "${data[@]}" "${common[@]}" --title "synthetic: the default recipe" \
  --out "$out/default" > /dev/null
mldcn bench quality "${data[@]}" "${common[@]}" --config "$out/tune/dcnv2-small.json" \
  --config "$out/tune/mldcn-small.json" --title "synthetic: the tuned recipe" \
  --out "$out/tuned" > /dev/null
mldcn bench quality-diff "$out/default" "$out/tuned" --title "synthetic: tuned vs default recipe" \
  --out "$out/tuned-vs-default.md"
