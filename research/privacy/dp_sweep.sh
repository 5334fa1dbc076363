#!/usr/bin/env bash
# Utility against epsilon on the PENS text profile (docs/privacy.md): the default recipe trained without DP and
# with DP-SGD per user at epsilon 16, 4 and 1, each evaluated on the same unseen test users (`e2p eval`: e2p vs
# shared_prefix perplexity with 95% intervals over users) and audited (`e2p audit`: membership inference, AUC with
# and without DP), then one plot (plot_sweep.py). Runs one training at a time; hours on 2 CPU cores.
#   research/privacy/dp_sweep.sh            needs runs/backbones/pens (research/backbones/run.sh makes it)
# Knobs (environment): PENS (runs/backbones/pens), OUT (runs/privacy), EPSILONS ("16 4 1"), LIMIT (840), E2P.
set -uo pipefail
cd "$(dirname "$0")/../.."
E2P=${E2P:-.venv/bin/e2p}
PENS=${PENS:-runs/backbones/pens}
OUT=${OUT:-runs/privacy}
mkdir -p "$OUT"
for eps in none ${EPSILONS:-16 4 1}; do
  run="$OUT/pens-eps-$eps"
  dp=(); [ "$eps" = none ] || dp=(--dp-epsilon "$eps")
  "$E2P" train --users "$PENS/users_text.npz" --examples "$PENS/examples.jsonl" --out "$run" "${dp[@]}"
  "$E2P" eval --users "$PENS/test/users_text.npz" --examples "$PENS/test/examples.jsonl" --projector "$run" \
      --out "$run-eval" --limit "${LIMIT:-840}" --generate 34
  "$E2P" audit --users "$PENS/users_text.npz" --examples "$PENS/examples.jsonl" --projector "$run" --out "$run-audit"
done
.venv/bin/python research/privacy/plot_sweep.py --runs "$OUT" --out "$OUT/utility_vs_epsilon.png"
