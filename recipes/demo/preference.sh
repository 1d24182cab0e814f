#!/usr/bin/env bash
# Preference tuning of the shipped demo model (models/demo): pairs -> reward model -> DPO (-> PPO) -> evaluation.
#
# Usage (from anywhere):  recipes/demo/preference.sh
# Settings (environment variables):
#   OUT      work folder (default ~/.cache/jneox/demo/preference); nothing is written into the repository
#   MODEL    the SFT model to start from (default models/demo)
#   DEVICE   cpu | cuda | auto (default cpu)
#   PPO      1 to also run PPO (default 0: not yet measured on the demo)
#   PYTHON   interpreter with jneox installed (default python)
# A step that finished is skipped when run again with the same OUT.
#
# On a busy CPU, one thread per process is much faster than PyTorch's default (threads wait for each
# other): a 16-row decode step of the demo model took 0.38 s with 2 threads and 0.019 s with one
# while other jobs loaded the 2-core machine, so OMP_NUM_THREADS defaults to 1 here.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RECIPE="$REPO/recipes/demo"
OUT="${OUT:-$HOME/.cache/jneox/demo/preference}"
MODEL="${MODEL:-$REPO/models/demo}"
DEVICE="${DEVICE:-cpu}"
PPO="${PPO:-0}"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$OUT"
source "$RECIPE/steps.sh"
#   TRAIN_PAIRS  keep this many training pairs, chosen by hash (default 240: about 10 minutes per step on
#                the shared 2-core machine; empty for all 539)
TRAIN_PAIRS="${TRAIN_PAIRS-240}"
common=(--device "$DEVICE" --max-len 512 --log-every 5 --save-every 100000 --no-progress --val-fraction 0)

step pairs "$PYTHON" "$RECIPE/make_preference_data.py" --model "$MODEL" --out-dir "$OUT/data" \
  ${TRAIN_PAIRS:+--max-train-pairs "$TRAIN_PAIRS"}
# the held-out pairs are scored after training (jneox score), not at every eval: that saves a pass over them
step reward "$PYTHON" -m jneox reward --model "$MODEL" --data "$OUT/data/train_pairs.jsonl" --out "$OUT/reward" \
  --epochs 1 --batch-size 8 --lr 5e-5 --min-lr 5e-6 --warmup-steps 3 "${common[@]}"
step score "$PYTHON" -m jneox score --reward-model "$OUT/reward" --data "$OUT/data/heldout_pairs.jsonl" > "$OUT/heldout_scores.jsonl"
step dpo "$PYTHON" -m jneox dpo --model "$MODEL" --data "$OUT/data/train_pairs.jsonl" --out "$OUT/dpo" \
  --epochs 1 --batch-size 8 --beta 0.1 --lr 5e-6 --min-lr 5e-7 --warmup-steps 3 --save-dtype bfloat16 "${common[@]}"
models=(--model "dpo=$OUT/dpo")
if [[ "$PPO" == 1 ]]; then
  step ppo "$PYTHON" -m jneox ppo --model "$MODEL" --reward-model "$OUT/reward" --data "$OUT/data/train_pairs.jsonl" \
    --out "$OUT/ppo" --max-steps 20 --batch-size 8 --ppo-epochs 2 --kl-coef 0.05 --lr 2e-6 --min-lr 2e-6 \
    --warmup-steps 1 --save-dtype bfloat16 --device "$DEVICE" --max-len 512 --log-every 2 --save-every 100000 --no-progress
  models+=(--model "ppo=$OUT/ppo")
fi
step evaluate "$PYTHON" "$RECIPE/evaluate_preference.py" --sft "$MODEL" "${models[@]}" --reward-model "$OUT/reward" \
  --heldout "$OUT/data/heldout_pairs.jsonl" --json "$OUT/preference_eval.json"
