#!/bin/bash
# The multi-turn chat check of docs/attacks.md (every reply vs the last reply only), end to end
# (about 6 minutes on 2 shared CPU cores): bash scripts/chat_multiturn_study.sh OUT
set -e
OUT=${1:?usage: chat_multiturn_study.sh OUT}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT" && cd "$OUT"
ATTACKS=loss,min_k,min_k_pp,zlib,ref
python "$HERE/chat_multiturn_study.py" data .
leakaudit finetune --model tiny-gpt-neox --data data/pretrain.jsonl --out base --format plain --method full --epochs 2 \
    --learning-rate 1e-3 --batch-size 16 --gradient-accumulation 1 --warmup-steps 20 --seed 0 --no-progress
for r in 0 1; do
  leakaudit finetune --model base --data data/members_r$r.jsonl --out ft_r$r --format chat --method full --epochs 8 \
      --learning-rate 5e-4 --batch-size 4 --gradient-accumulation 1 --seed 0 --no-progress
  leakaudit mia --target ft_r$r --reference base --data data/eval_r$r.jsonl --id-field id --format chat \
      --attacks $ATTACKS --n-bootstrap 1000 --seed 0 --out mia_r${r}_all
done
# the check of the last-reply path: one-reply conversations, where the last reply is every reply
leakaudit mia --target ft_r0 --reference base --data data/first_r0.jsonl --id-field id --format chat \
    --attacks $ATTACKS --n-bootstrap 0 --seed 0 --out mia_r0_first
python "$HERE/chat_multiturn_study.py" last .
python "$HERE/chat_multiturn_study.py" analyse .
