#!/bin/bash
# The chat-format check of docs/attacks.md, end to end (about 10 CPU minutes on 2 cores): bash scripts/chat_mia_study.sh OUT
set -e
OUT=${1:?usage: chat_mia_study.sh OUT}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT" && cd "$OUT"
python "$HERE/chat_mia_study.py" data .
leakaudit finetune --model tiny-gpt-neox --data data/pretrain.jsonl --out base --format plain --method full --epochs 2 \
    --learning-rate 1e-3 --batch-size 16 --gradient-accumulation 1 --warmup-steps 20 --seed 0 --no-progress
for r in 0 1; do
  leakaudit finetune --model base --data data/members_r$r.jsonl --out ft_r$r --format chat --method full --epochs 8 \
      --learning-rate 5e-4 --batch-size 4 --gradient-accumulation 1 --seed 0 --no-progress
  for mode in chat text; do
    leakaudit mia --target ft_r$r --reference base --data data/eval_r$r.jsonl --attacks loss,min_k,min_k_pp,zlib,ref \
        --n-bootstrap 1000 --seed 0 --out mia_r${r}_$mode $([ $mode = chat ] && echo --format chat || echo --text-field text)
  done
done
python "$HERE/chat_mia_study.py" analyse .
