#!/usr/bin/env bash
# The recipe's acceptance study, on MovieLens-100K and the Criteo attribution set (DCNv2 and
# ML-DCN at the medium level, the splits of docs/quality/):
#   1. the default recipe, 5 seeds, paired by seed with the old recipe's cells of the same
#      splits and seeds (docs/quality/movielens-100k, docs/quality/criteo-attribution);
#   2. `mldcn tune`, the same trial budget for both architectures (each trial 2 seeds, the
#      first trial the default recipe), on validation AUC only;
#   3. the tuned configs, 5 seeds, paired with the default recipe.
# Every stage resumes where it stopped (studies and tuning are resumable).
#
#   docs/quality/recipe/accept.sh [OUT] [TRIALS]     (default docs/quality/recipe, 12)
#
# Needs MovieLens at .cache/mldcn/ml-100k (mldcn data movielens .cache/mldcn/ml-100k) and
# ../shared/data. The two datasets run side by side, one torch thread each.
set -euo pipefail
out="${1:-docs/quality/recipe}"
trials="${2:-12}"
ml=.cache/mldcn/ml-100k
common=(--archs dcnv2,mldcn --levels medium --seeds 5 --batch-size 2048 --lr 0.001 --patience 2
        --threads 1)
movielens=(--data "$ml/ml-100k.parquet" --schema "$ml/schema.json" --split time
           --valid-frac 0.1 --test-frac 0.1)
criteo=(--data ../shared/data/criteo_attribution/small_train.parquet
        --schema model/schemas/criteo_attribution.json --split random --valid-frac 0.15
        --split-seed 0)
criteo_test=(--test-data ../shared/data/criteo_attribution/small_valid.parquet)

run() {  # NAME OLD_STUDY DATA_ARGS... -- STUDY_ONLY_ARGS...
  local name=$1 old=$2
  shift 2
  local data=() extra=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do data+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  extra=("$@")
  local d="$out/$name"
  nice -n 10 mldcn bench quality "${data[@]}" "${extra[@]}" "${common[@]}" \
    --title "$name: the default recipe" --out "$d/default" >/dev/null
  nice -n 10 mldcn tune "${data[@]}" --archs dcnv2,mldcn --level medium --trials "$trials" \
    --seeds-per-trial 2 --lr 0.001 --batch-size 2048 \
    --patience 2 --threads 1 --out "$d/tune" 2>"$d/tune.log"
  nice -n 10 mldcn bench quality "${data[@]}" "${extra[@]}" "${common[@]}" \
    --config "$d/tune/dcnv2-medium.json" --config "$d/tune/mldcn-medium.json" \
    --title "$name: the tuned recipe" --out "$d/tuned" >/dev/null
  mldcn bench quality-diff "$old" "$d/default" --title "$name: default vs old recipe" \
    --out "$d/default-vs-old.md"
  mldcn bench quality-diff "$d/default" "$d/tuned" --title "$name: tuned vs default recipe" \
    --out "$d/tuned-vs-default.md"
}
mkdir -p "$out/movielens" "$out/criteo"
run movielens docs/quality/movielens-100k "${movielens[@]}" & a=$!
run criteo docs/quality/criteo-attribution "${criteo[@]}" --test-frac 0 -- "${criteo_test[@]}" &
b=$!
wait $a
wait $b
