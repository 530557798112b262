#!/usr/bin/env bash
# The method families on the WHOLE SST-2 training set (67k sentences), MiniLM-L6, 1 epoch each, CPU.
#   bash recipes/compare/run_full_sst2.sh            (resumable: finished runs are skipped, and a run
#                                                     killed mid-training resumes from its checkpoint)
# Writes outputs/full/<method>_sst2/ and outputs/full/report.md (tools/report.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
METHODS=${METHODS-joint sweet cosee deebert}
THREADS=${THREADS-1}
for method in $METHODS; do
  out=outputs/full/${method}_sst2
  [ -f "$out/results.json" ] && continue
  $PY tools/run.py recipes/compare/minilm_${method}.yaml data.max_train_samples=null train.epochs=1 \
    train.stage2_epochs=1 run.output_dir=$out run.checkpoint_every=200 run.resume=auto \
    run.num_threads=$THREADS run.log_with=none
done
$PY tools/report.py outputs/full --output outputs/full/report.md
