#!/usr/bin/env bash
# Fine-tune the demo model to copy (extractive QA, repeating, fixing typos), for measuring speculative
# decoding where answers quote their context; then its acceptance and whether it still chats.
#
# Usage (from anywhere):  recipes/demo/copy_tune.sh MODEL_OUT      # MODEL_OUT must not exist yet
# Settings (environment variables):
#   OUT       work folder (default ~/.cache/jneox/demo/copy); nothing is written into the repository
#   MODEL     the model to start from (default models/demo)
#   SHORT_STEPS  first stage: steps of 16 short repeat tasks (default 400, lr 1e-3)
#   STEPS     second stage: steps of 8 full-length copy tasks and conversations (default 150)
#   LR        the second stage's peak learning rate (default 3e-4; 6e-4 made the loss climb in the first 50 steps)
#   CATALOGS  Japanese gettext catalogs for copy tasks over unseen text (default /usr/share/locale/ja/LC_MESSAGES)
#   PYTHON    interpreter with jneox installed (default python)
# A step that finished is skipped when run again with the same OUT.
#
# One thread (OMP_NUM_THREADS=1 by default): on the shared 2-core machine two threads ran the SFT at
# 310 tokens/s while other jobs ran, one at 820-860.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RECIPE="$REPO/recipes/demo"
MODEL_OUT="${1:?usage: copy_tune.sh MODEL_OUT (a folder that does not exist yet)}"
OUT="${OUT:-$HOME/.cache/jneox/demo/copy}"
MODEL="${MODEL:-$REPO/models/demo}"
SHORT_STEPS="${SHORT_STEPS:-400}"
STEPS="${STEPS:-150}"
LR="${LR:-3e-4}"
CATALOGS="${CATALOGS:-/usr/share/locale/ja/LC_MESSAGES}"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ -e "$MODEL_OUT" ]]; then
  echo "error: $MODEL_OUT exists; name a new folder" >&2
  exit 2
fi
mkdir -p "$OUT"
source "$RECIPE/steps.sh"

catalogs=()
[[ -d "$CATALOGS" ]] && catalogs=(--catalogs "$CATALOGS")
step data "$PYTHON" "$RECIPE/make_copy_data.py" --out-dir "$OUT/data" "${catalogs[@]}" --chat-share 0.4 --short 6000
resume() { [[ -f "$1/trainer_state.pt" ]] && echo --resume || true; }
common=(--val-data "$OUT/data/heldout.jsonl" --max-len 512 --warmup-steps 10 --eval-every 100 --eval-batches 4
        --save-every 50 --log-every 10 --device cpu --save-dtype bfloat16 --no-progress)
# first short spans (half scrambled: only copying predicts them), where copying starts; then the full-length
# tasks (extractive QA over three passages, repeats, typo fixes) and conversations
step short "$PYTHON" -m jneox sft --model "$MODEL" --data "$OUT/data/short.jsonl" --out "$OUT/short" \
  --max-steps "$SHORT_STEPS" --batch-size 16 --lr 1e-3 --min-lr 1e-4 "${common[@]}" $(resume "$OUT/short")
step sft "$PYTHON" -m jneox sft --model "$OUT/short" --data "$OUT/data/train.jsonl" --out "$OUT/sft" \
  --max-steps "$STEPS" --batch-size 8 --lr "$LR" --min-lr "$(awk "BEGIN{print $LR/10}")" "${common[@]}" $(resume "$OUT/sft")

echo "== model to $MODEL_OUT"
staging="$MODEL_OUT.partial"
rm -rf "$staging"
mkdir -p "$staging"
for file in config.json model.safetensors spiece.model tokenizer_config.json; do
  cp "$OUT/sft/$file" "$staging/$file"
done
mv "$staging" "$MODEL_OUT"

# acceptance on held-out copy and chat prompts (the model at its own size), then the chat format check
"$PYTHON" "$REPO/benchmarks/speculative.py" --model "$MODEL_OUT" --prompts 12 --new-tokens 128 --layers 0
"$PYTHON" "$RECIPE/evaluate.py" --model "$MODEL_OUT" --heldout "$OUT/data/chat.jsonl" --transcripts 3
