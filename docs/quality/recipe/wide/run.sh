#!/usr/bin/env bash
# The wide search (issue 17): `mldcn tune --space wide` on MovieLens-100K and the Criteo
# attribution set, DCNv2 and ML-DCN at the medium level, 40 finished trials per architecture
# (2 seeds each, the default recipe as trial 0), the no-regret check on 5 fresh seeds; then the
# configs it kept over 5 seeds on the test rows, paired with the default-recipe study.
#
#   docs/quality/recipe/wide/run.sh [OUT]       (default docs/quality/recipe/wide; ~45 min)
#
# Needs MovieLens at .cache/mldcn/ml-100k (mldcn data movielens .cache/mldcn/ml-100k) and
# ../shared/data. One torch thread, one core at a time.
# With the default OUT the committed studies resume and nothing runs: pass a new OUT to redo them.
set -euo pipefail
out="${1:-docs/quality/recipe/wide}"
ml=.cache/mldcn/ml-100k
common=(--archs dcnv2,mldcn --level medium --trials 40 --seeds-per-trial 2 --lr 0.001
        --batch-size 2048 --patience 2 --threads 1 --confirm-seeds 5 --space wide)
criteo=(--data ../shared/data/criteo_attribution/small_train.parquet
        --schema model/schemas/criteo_attribution.json --split random --valid-frac 0.15
        --split-seed 0)
mkdir -p "$out/movielens" "$out/criteo"
mldcn tune --data "$ml/ml-100k.parquet" --schema "$ml/schema.json" --split time \
  --valid-frac 0.1 --test-frac 0.1 "${common[@]}" --out "$out/movielens/tune" \
  2> "$out/movielens/tune.log"
# (the Criteo search holds no test rows out of small_train: its test rows are small_valid)
mldcn tune "${criteo[@]}" --test-frac 0 "${common[@]}" --out "$out/criteo/tune" \
  2> "$out/criteo/tune.log"
# MovieLens: the check kept the default recipe for both, so the tuned study is the default one
mldcn bench quality "${criteo[@]}" --test-data ../shared/data/criteo_attribution/small_valid.parquet \
  --archs dcnv2,mldcn --levels medium --seeds 5 --batch-size 2048 --lr 0.001 --patience 2 \
  --threads 1 --config "$out/criteo/tune/dcnv2-medium.json" \
  --config "$out/criteo/tune/mldcn-medium.json" --title "Criteo attribution: the wide-tuned recipe" \
  --out "$out/criteo/tuned" > /dev/null
mldcn bench quality-diff docs/quality/recipe/criteo/default "$out/criteo/tuned" \
  --title "Criteo attribution: wide-tuned vs default recipe (5 seeds, test rows)" \
  --out "$out/criteo/tuned-vs-default.md"
