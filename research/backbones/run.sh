#!/usr/bin/env bash
# Both backbones trained and evaluated by the same commands, one after the other (never two trainings at once):
# the PENS text profile (deep injection, the recipe's default) and the persona contract (input injection), then
# the side-by-side table (research/backbones/compare.py, docs/studies.md).
#   research/backbones/run.sh [DATA]        DATA: the shared data folder (default ../shared/data)
# Knobs (environment): OUT (runs/backbones), PENS_LIMIT (840 test headlines), PERSONA_LIMIT (480 test replies),
# PERSONA_STEPS (90: half the recipe's steps, for time).
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-../shared/data}
E2P=${E2P:-.venv/bin/e2p}
OUT=${OUT:-runs/backbones}
mkdir -p "$OUT"
t() { local name=$1 s=$SECONDS; shift; echo "== $name: $*"; "$@"; printf '%s\t%d\n' "$name" $((SECONDS-s)) | tee -a "$OUT/wall_times.tsv"; }
[ -f "$OUT/pens/users_text.npz" ] || t data_pens "$E2P" data pens "$DATA/pens" --out "$OUT/pens" --test-fraction 0.2
[ -f "$OUT/persona/users.npz" ] || t data_persona "$E2P" data persona "$DATA" --out "$OUT/persona"
for bb in gemma-3-270m SmolLM2-135M-Instruct; do
  t "train_pens_$bb" "$E2P" train --backbone "$bb" --users "$OUT/pens/users_text.npz" --examples "$OUT/pens/examples.jsonl" --out "$OUT/pens-$bb"
  t "eval_pens_$bb" "$E2P" eval --backbone "$bb" --users "$OUT/pens/test/users_text.npz" --examples "$OUT/pens/test/examples.jsonl" \
      --projector "$OUT/pens-$bb" --out "$OUT/pens-$bb-eval" --limit "${PENS_LIMIT:-840}" --generate 34
  t "train_persona_$bb" "$E2P" train --backbone "$bb" --users "$OUT/persona/users.npz" --examples "$OUT/persona/examples.jsonl" \
      --out "$OUT/persona-$bb" --injection input --steps "${PERSONA_STEPS:-90}"
  t "eval_persona_$bb" "$E2P" eval --backbone "$bb" --users "$OUT/persona/test/users.npz" --examples "$OUT/persona/test/examples.jsonl" \
      --projector "$OUT/persona-$bb" --out "$OUT/persona-$bb-eval" --limit "${PERSONA_LIMIT:-480}" --generate 48
done
.venv/bin/python research/backbones/compare.py --runs "$OUT"
