#!/usr/bin/env bash
# Rebuild the shipped demo model (models/demo) from nothing, with jneox's own pipeline:
#   Debian docs -> corpus -> tokenizer -> pretrain -> SFT -> models/demo (bfloat16) -> evaluation.
#
# Usage (from anywhere; paths are relative to the repository):
#   recipes/demo/build.sh                     # default settings, device chosen by jneox (cuda if present)
#   DEVICE=cpu PRETRAIN_STEPS=200 recipes/demo/build.sh
#
# Settings (environment variables):
#   OUT             work folder for everything but the shipped model (default ~/.cache/jneox/demo/build)
#   DEVICE          auto | cpu | cuda                                   (default auto)
#   PRETRAIN_STEPS  optimizer steps of pretraining                      (default 1000)
#   BATCH           sequences of BLOCK tokens per pretraining step      (default 64)
#   SFT_BATCH       conversations per SFT step                          (default 16)
#   BLOCK           tokens per pretraining sequence                     (default 512)
#   SFT_EPOCHS      passes over the SFT conversations                   (default 12)
#   SFT_LR          peak SFT learning rate                              (default 3e-4)
#   VOCAB           tokenizer vocabulary                                (default 6000)
#   MODEL_OUT       where the final model goes                          (default models/demo)
#   PYTHON          interpreter that has jneox installed                (default python)
#   CONVERSATIONS   hand-written conversation JSONL files or folder     (default recipes/demo/data/conversations)
#   STOP_AFTER      stop once this step is done (corpus, faq, sft-data, tokenizer, pretrain, sft):
#                   e.g. make the data where the network is, train where the GPU is
#   CORPUS, FAQ_PAIRS  an already made corpus.jsonl / faq_pairs.jsonl: copied into OUT instead of
#                   fetching the Debian packages (for a GPU machine without network access)
#
# A step that finished is skipped when the build runs again with the same OUT, and an
# interrupted pretraining or SFT resumes from its last checkpoint; `rm -rf "$OUT"` rebuilds
# from nothing.  The corpus is never committed: it is made again in every new OUT.
#
# Time, measured for the shipped model (see models/demo/README.md for its exact provenance):
#   corpus ~4 min here (+ ~110 MB of .deb downloads); FAQ pairs and SFT data a few seconds;
#   tokenizer 4-6 min on this 2-core CPU (all lines);
#   pretraining (1000 steps of 64 x 512 tokens = 33M tokens, ~11 epochs of the 3M-token corpus):
#     61 s on one H100 (bf16 autocast, 1.1M tokens/s); on this 2-core CPU (fp32, 1.5-1.8k
#     tokens/s) it would take 5-6 hours, so pretrain with DEVICE=cuda where you can;
#   SFT (12 epochs, 705 steps of 16 conversations): 28 min on this CPU (~1.7k tokens/s);
#   evaluation of the 79 held-out conversations: under a minute on this CPU.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RECIPE="$REPO/recipes/demo"
OUT="${OUT:-$HOME/.cache/jneox/demo/build}"
DEVICE="${DEVICE:-auto}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-1000}"
BATCH="${BATCH:-64}"
SFT_BATCH="${SFT_BATCH:-16}"
BLOCK="${BLOCK:-512}"
SFT_EPOCHS="${SFT_EPOCHS:-12}"
SFT_LR="${SFT_LR:-3e-4}"
VOCAB="${VOCAB:-6000}"
MODEL_OUT="${MODEL_OUT:-$REPO/models/demo}"
PYTHON="${PYTHON:-python}"
CONVERSATIONS="${CONVERSATIONS:-$RECIPE/data/conversations}"
MAX_MODEL_MB=40

mkdir -p "$OUT"
# loss curves need matplotlib (a recipe-only dependency); without it the build goes on without them
REPORT=$("$PYTHON" -c "import matplotlib" 2>/dev/null && echo --report || true)
declare -a TIMES=()
step() {  # step NAME COMMAND...: run COMMAND unless NAME finished in an earlier build; record its time
  local name="$1"; shift
  if [[ -e "$OUT/.done-$name" ]]; then
    echo "== $name: done in an earlier run, skipped"
    return
  fi
  echo "== $name"
  local started=$SECONDS
  "$@"
  touch "$OUT/.done-$name"
  TIMES+=("$(printf '%-10s %6d s' "$name" $((SECONDS - started)))")
  if [[ "${STOP_AFTER:-}" == "$name" ]]; then
    printf '%s\n' "${TIMES[@]}"
    echo "== stopping after $name (STOP_AFTER): run again with the same OUT to go on"
    exit 0
  fi
}
resume_flag() {  # --resume when an interrupted training run left its state in folder $1
  [[ -f "$1/trainer_state.pt" ]] && echo --resume || true
}

if [[ -n "${CORPUS:-}" ]]; then
  step corpus cp "$CORPUS" "$OUT/corpus.jsonl"
else
  step corpus "$PYTHON" "$RECIPE/make_corpus.py" --cache "$OUT/packages" --out "$OUT/corpus.jsonl"
fi
if [[ -n "${FAQ_PAIRS:-}" ]]; then
  step faq cp "$FAQ_PAIRS" "$OUT/faq_pairs.jsonl"
else
  step faq "$PYTHON" "$RECIPE/faq_pairs.py" --cache "$OUT/packages" --out "$OUT/faq_pairs.jsonl"
fi

step sft-data \
  "$PYTHON" "$RECIPE/make_sft_data.py" --conversations "$CONVERSATIONS" \
    --faq "$OUT/faq_pairs.jsonl" --out-dir "$OUT/sft-data" --tokenizer-text "$OUT/sft-data/conversations.txt"

# a small vocabulary suits a small model: fewer embedding rows to learn from 16 MB of text
step tokenizer \
  "$PYTHON" -m jneox train-tokenizer --input "$OUT/corpus.jsonl" "$OUT/sft-data/conversations.txt" \
    --vocab-size "$VOCAB" --out "$OUT/tokenizer" --seed 0 --overwrite  # the recipe's own folder (a rerun)

# the training conversations' text joins the documentation prose (held-out ones stay out): the
# corpus is all manuals, and the model should also have read everyday Japanese before SFT
step pretrain \
  "$PYTHON" -m jneox pretrain --model-config demo --tokenizer "$OUT/tokenizer" \
    --data "$OUT/corpus.jsonl" "$OUT/sft-data/conversations.txt" --val-fraction 0.02 \
    --out "$OUT/pretrain" --block-size "$BLOCK" --batch-size "$BATCH" --max-steps "$PRETRAIN_STEPS" \
    --lr 1e-3 --min-lr 1e-4 --warmup-steps $((PRETRAIN_STEPS / 20 + 1)) --eval-every 100 --save-every 250 --log-every 25 \
    --device "$DEVICE" $REPORT $(resume_flag "$OUT/pretrain")

# the SFT model is saved in bfloat16: that is what ships and what the evaluation scores
step sft \
  "$PYTHON" -m jneox sft --model "$OUT/pretrain" --data "$OUT/sft-data/train.jsonl" \
    --val-data "$OUT/sft-data/heldout.jsonl" --out "$OUT/sft" --epochs "$SFT_EPOCHS" --max-len "$BLOCK" \
    --batch-size "$SFT_BATCH" --lr "$SFT_LR" --min-lr "$(awk "BEGIN{print $SFT_LR/10}")" --warmup-steps 20 \
    --eval-every 50 --log-every 10 --save-every 100000 --device "$DEVICE" --save-dtype bfloat16 $REPORT $(resume_flag "$OUT/sft")

echo "== ship to $MODEL_OUT"
mkdir -p "$MODEL_OUT"
for file in config.json model.safetensors spiece.model tokenizer_config.json; do
  cp "$OUT/sft/$file" "$MODEL_OUT/.$file.tmp"
  mv "$MODEL_OUT/.$file.tmp" "$MODEL_OUT/$file"  # README.md (the model card) is kept as it is
done
size_mb=$(( $(du -cb "$MODEL_OUT"/config.json "$MODEL_OUT"/model.safetensors "$MODEL_OUT"/spiece.model | tail -1 | cut -f1) / 1000000 ))
echo "models/demo weights + tokenizer: ${size_mb} MB"
if (( size_mb > MAX_MODEL_MB )); then
  echo "error: the demo model is over ${MAX_MODEL_MB} MB" >&2
  exit 1
fi

EVAL_DEVICE="$DEVICE"; [[ "$EVAL_DEVICE" == auto ]] && EVAL_DEVICE=cpu  # the shipped model runs on CPU
step evaluate \
  "$PYTHON" "$RECIPE/evaluate.py" --model "$MODEL_OUT" --pretrained "$OUT/pretrain" \
    --heldout "$OUT/sft-data/heldout.jsonl" --json "$OUT/eval.json" --device "$EVAL_DEVICE" --transcripts 5

echo "== times"
printf '%s\n' "${TIMES[@]}"
echo "figures: $OUT/eval.json; loss curves: $OUT/pretrain/loss.png, $OUT/sft/loss.png"
