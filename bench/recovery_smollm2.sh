#!/usr/bin/env bash
# SmolLM2-135M at 20% and 50% (default bip): LoRA recovery on PTB train text, perplexity on a
# fixed PTB-test subset before/after, the shipped offline zero-shot task, and dense-vs-pruned speed.
# Usage: bash bench/recovery_smollm2.sh RUNS_DIR   (about 30 min on 2 CPU cores)
set -euo pipefail
RUNS=${1:?usage: recovery_smollm2.sh RUNS_DIR}
STEPS=${STEPS:-40} EVAL_TOKENS=${EVAL_TOKENS:-16384} LIMIT=${LIMIT:-200}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$RUNS"
python -c "from llm_bip.data import load_text; print(load_text('ptb', 'train'), end='')" > "$RUNS/ptb_train.txt"
lora() {  # the same LoRA run for every model, the dense one included (PTB train text also adapts to PTB's style)
  llm-bip finetune "$1" --data "$RUNS/ptb_train.txt" --out "$2" --overwrite \
    --max-steps "$STEPS" --batch-size 4 --seqlen 128 --lr 5e-4 --save-steps 20 --eval-max-tokens "$EVAL_TOKENS"
}
for r in 20 50; do
  llm-bip prune --ratio "0.$r" --out "$RUNS/bip-$r" --eval none --overwrite
  lora "$RUNS/bip-$r" "$RUNS/bip-$r-lora"
done
lora smollm2 "$RUNS/smollm2-lora"
for m in smollm2 "$RUNS/smollm2-lora" "$RUNS/bip-20" "$RUNS/bip-20-lora" "$RUNS/bip-50" "$RUNS/bip-50-lora"; do
  name=$(basename "$m")
  llm-bip eval "$m" --ppl ptb --max-tokens "$EVAL_TOKENS" --tasks llm_bip_ptb_endings --limit "$LIMIT" \
    --out "$RUNS/eval-$name" --overwrite
done
llm-bip bench-speed smollm2 "$RUNS/bip-20" "$RUNS/bip-50" --out "$RUNS/speed" --overwrite
llm-bip report "$RUNS/bip-50-lora" --speed "$RUNS/speed" --eval "$RUNS/eval-bip-50-lora" --overwrite
