#!/usr/bin/env bash
# The PENS study at full size, end to end, from the raw PENS files to the report (docs/studies.md).
#   research/pens/full_run.sh SRC [TEST_USERS_FILE]
# SRC: the PENS folder or .tsv file. TEST_USERS_FILE (optional): a PENS file of further users who are only
# evaluated, never trained on (without it, 20% of SRC's users are held out by user). Everything is chosen on
# validation users inside `e2p train`; nothing here looks at the test users until the study scores them.
# Then the ceiling (oracle_prefix_ceiling.py). Knobs (environment): OUT (default runs/pens-full), LORA_STEPS (300), TEXT_STEPS (60), GENERATE (68), STYLE_GENERATE (340), LIMIT (all).
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:?usage: research/pens/full_run.sh SRC [TEST_USERS_FILE]}
OUT=${OUT:-runs/pens-full}
E2P=${E2P:-.venv/bin/e2p}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
stage() {  # name, command...: runs the command and appends its wall time to $OUT/wall_times.tsv
    local name=$1 start=$SECONDS; shift
    echo "== $name: $*"
    "$@"
    printf '%s\t%d\n' "$name" $((SECONDS - start)) | tee -a "$OUT/wall_times.tsv"
}
split=(--test-fraction 0.2)
[ -n "${2:-}" ] && split=(--test-users "$2")
stage data "$E2P" data pens "$SRC" --out "$OUT/data" "${split[@]}" --behaviour als --behaviour-dim 16
stage train_behaviour "$E2P" train --users "$OUT/data/users.npz" --examples "$OUT/data/examples.jsonl" \
    --out "$OUT/behaviour" --hidden-dims linear --text-steps "${TEXT_STEPS:-60}"
stage train_textprofile "$E2P" train --users "$OUT/data/users_text.npz" --examples "$OUT/data/examples.jsonl" \
    --out "$OUT/textprofile" --shared-from "$OUT/behaviour/shared_prefix"
# the recipe that closes most of the gap (docs/studies.md, Closing the gap): the text profile joined with the
# history's headline style (users_text_style.npz), the default recipe otherwise; scored on the test users alone
stage train_textstyle "$E2P" train --users "$OUT/data/users_text_style.npz" --examples "$OUT/data/examples.jsonl" \
    --out "$OUT/textstyle" --shared-from "$OUT/behaviour/shared_prefix"
limit=()
[ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
stage eval_textstyle "$E2P" eval --users "$OUT/data/test/users_text_style.npz" --examples "$OUT/data/test/examples.jsonl" \
    --projector "$OUT/textstyle" --out "$OUT/textstyle-eval" --generate "${STYLE_GENERATE:-340}" "${limit[@]}"
stage train_lora "$PY" research/pens/train_lora.py --users "$OUT/data/users_text.npz" \
    --examples "$OUT/data/examples.jsonl" --out "$OUT/lora" --steps "${LORA_STEPS:-300}"
stage study "$PY" research/pens/study.py --data "$OUT/data" --behaviour "$OUT/behaviour" \
    --text-profile "$OUT/textprofile" --lora "$OUT/lora" --out "$OUT/study" --generate "${GENERATE:-68}" "${limit[@]}"
# the ceiling: per-user prompt tuning on half of each test user's own headlines (an oracle: it trains on test users)
stage oracle "$PY" research/pens/oracle_prefix_ceiling.py --users "$OUT/data/test/users.npz" \
    --examples "$OUT/data/test/examples.jsonl" --shared "$OUT/behaviour/shared_prefix" --out "$OUT/oracle"
