#!/usr/bin/env bash
# Utility against epsilon on PENS (docs/privacy.md): the default recipe trained without DP and with DP-SGD per user
# at epsilon 16, 4 and 1, one training at a time, each scored on users never trained on (the training report's
# verdict users; with EVAL=1 also `e2p eval` on the test users) and audited (`e2p audit`: membership inference, AUC
# with and without DP), then one table and plot (plot_sweep.py).
#   research/privacy/dp_sweep.sh            needs $PENS from `e2p data pens` (research/pens/full_run.sh makes one)
# Knobs (environment): PENS (runs/i30/data), USERS (users_text_style.npz), OUT (runs/privacy), EPSILONS ("16 4 1"),
# STEPS (total optimizer steps of each run, the same for every point; empty: the recipe's 180), EVAL (0), LIMIT
# (840, with EVAL=1), AUDIT ("none 1": the runs audited), DP_EXAMPLES (1: --dp-examples-per-user, so that a DP step
# reads 16 users x 1 example, the rows of a plain step, and costs about what it does), E2P.
set -euo pipefail
cd "$(dirname "$0")/../.."
E2P=${E2P:-.venv/bin/e2p}
PENS=${PENS:-runs/i30/data}
USERS=${USERS:-users_text_style.npz}
OUT=${OUT:-runs/privacy}
mkdir -p "$OUT"
steps=(); [ -n "${STEPS:-}" ] && steps=(--steps "$STEPS")
for eps in none ${EPSILONS:-16 4 1}; do
  run="$OUT/pens-eps-$eps"
  dp=(); [ "$eps" = none ] || dp=(--dp-epsilon "$eps" --dp-examples-per-user "${DP_EXAMPLES:-1}")
  start=$SECONDS
  [ -f "$run/training_report.json" ] || \
      "$E2P" train --users "$PENS/$USERS" --examples "$PENS/examples.jsonl" --out "$run" "${dp[@]}" "${steps[@]}"
  printf 'train %s\t%d\n' "$eps" $((SECONDS - start)) | tee -a "$OUT/wall_times.tsv"
  if [ "${EVAL:-0}" = 1 ]; then
    "$E2P" eval --users "$PENS/test/$USERS" --examples "$PENS/test/examples.jsonl" --projector "$run" \
        --out "$run-eval" --limit "${LIMIT:-840}" --generate 34 --conditions shared_prefix,shuffled,e2p
  fi
done
for eps in ${AUDIT:-none 1}; do
  start=$SECONDS
  "$E2P" audit --users "$PENS/$USERS" --examples "$PENS/examples.jsonl" --projector "$OUT/pens-eps-$eps" \
      --out "$OUT/pens-eps-$eps-audit"
  printf 'audit %s\t%d\n' "$eps" $((SECONDS - start)) | tee -a "$OUT/wall_times.tsv"
done
.venv/bin/python research/privacy/plot_sweep.py --runs "$OUT" --out "$OUT/utility_vs_epsilon.png"
