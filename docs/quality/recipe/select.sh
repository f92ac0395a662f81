#!/usr/bin/env bash
# How the default training recipe was chosen: every variant in configs/ (one setting changed
# from the old recipe, or the combinations of stage 2) trains DCNv2 and ML-DCN at the medium
# level, 2 seeds, on MovieLens-100K and the Criteo attribution set, and is ranked by its mean
# VALIDATION AUC (test rows are scored but never read here). Results land in $OUT/<data>/<v>/;
# summary.json and the table in README.md come from the last step.
#
#   docs/quality/recipe/select.sh OUT [variant ...]     (default: every configs/*.json)
#
# Needs MovieLens at .cache/mldcn/ml-100k (mldcn data movielens .cache/mldcn/ml-100k) and
# ../shared/data. Two datasets run side by side, one torch thread each.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: select.sh OUT [variant ...]}"
shift
variants=("$@")
if [ ${#variants[@]} -eq 0 ]; then
  variants=()
  for f in "$here"/configs/*.json; do variants+=("$(basename "$f" .json)"); done
fi
ml=.cache/mldcn/ml-100k
common=(--archs dcnv2,mldcn --levels medium --seeds 2 --batch-size 2048 --lr 0.001
        --patience 2 --threads 1)
run_movielens() {
  for v in "${variants[@]}"; do
    nice -n 10 mldcn bench quality --data "$ml/ml-100k.parquet" --schema "$ml/schema.json" \
      --split time --valid-frac 0.1 --test-frac 0.1 "${common[@]}" \
      --config "$here/configs/$v.json" --out "$out/movielens/$v" >/dev/null
  done
}
run_criteo() {
  for v in "${variants[@]}"; do
    nice -n 10 mldcn bench quality --data ../shared/data/criteo_attribution/small_train.parquet \
      --test-data ../shared/data/criteo_attribution/small_valid.parquet \
      --schema model/schemas/criteo_attribution.json --split random --valid-frac 0.15 \
      --split-seed 0 "${common[@]}" --config "$here/configs/$v.json" \
      --out "$out/criteo/$v" >/dev/null
  done
}
run_movielens & a=$!
run_criteo & b=$!
wait $a $b
python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {}
for report in sorted(out.glob("*/*/report.json")):
    data, variant = report.parent.parent.name, report.parent.name
    for r in json.loads(report.read_text())["rows"]:
        rows.setdefault(variant, {})[f"{data}/{r['arch']}"] = {
            "valid_auc": r["valid_auc"]["mean"], "epochs": r["epochs_run"]["mean"]}
keys = sorted({k for v in rows.values() for k in v})
summary = {v: {**cells, "mean_valid_auc": sum(c["valid_auc"] for c in cells.values()) / len(cells)}
           for v, cells in rows.items() if len(cells) == len(keys)}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("| variant | " + " | ".join(keys) + " | mean |")
print("|---|" + "---|" * (len(keys) + 1))
for v, s in sorted(summary.items(), key=lambda kv: -kv[1]["mean_valid_auc"]):
    cells = " | ".join(f"{s[k]['valid_auc']:.4f} ({s[k]['epochs']:.0f} ep)" for k in keys)
    print(f"| {v} | {cells} | {s['mean_valid_auc']:.4f} |")
EOF
