#!/usr/bin/env bash
# GPU checks and paper-scale timings, one run: bash bench/gpu.sh OUT_DIR [MODEL ...]
# Needs a CUDA machine with leakaudit's dependencies importable. Models default to the studies' Pythia
# shapes with random weights (no hub needed): random:pythia-1.4b random:pythia-6.9b.
set -u
out=${1:?usage: bench/gpu.sh OUT_DIR [MODEL ...]}; shift
models=("$@"); [ ${#models[@]} -eq 0 ] && models=(random:pythia-1.4b random:pythia-6.9b)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
for m in "${models[@]}"; do
  tag=${m#random:}
  python3 bench/score.py --model "$m" --device cuda --texts 48 --json "$out/score_$tag.json" 2>&1 | tail -15 \
    | tee "$out/score_$tag.txt"
  python3 bench/train.py --model "$m" --device cuda --steps 6 2>&1 | tail -5 | tee "$out/train_$tag.txt"
done
# The same finetune command under torchrun + FSDP2 (one process per GPU), LoRA and full, timed by the Trainer.
python3 -c "import json, sys; sys.path.insert(0, 'bench'); import train; \
open(sys.argv[1], 'w').writelines(json.dumps({'text': t}) + '\n' for t in train.texts(96))" "$out/seed.jsonl"
ngpu=$(nvidia-smi -L | wc -l)
for m in "${models[@]}"; do
  for method in lora full; do
    tag=${m#random:}-$method-fsdp
    rm -rf "$out/run-$tag"
    torchrun --nproc-per-node "$ngpu" --master-port 29551 -m leakaudit finetune --model "$m" \
      --data "$out/seed.jsonl" --out "$out/run-$tag" --method "$method" --batch-size 8 --gradient-accumulation 1 \
      --max-steps 6 --save-steps 1000 --learning-rate 1e-5 --fsdp --no-progress > "$out/finetune_$tag.txt" 2>&1
    echo "$tag rc=$?" | tee -a "$out/fsdp.txt"
    python3 -c "import json,sys; rows=[json.loads(x) for x in open(sys.argv[1])]; \
print(sys.argv[2], [round(r['loss'],3) for r in rows if 'loss' in r], \
[r['elapsed_s'] for r in rows if 'loss' in r], [round(r['train_runtime'],2) for r in rows if 'train_runtime' in r])" "$out/run-$tag/train_log.jsonl" "$tag" \
      2>&1 | tee -a "$out/fsdp.txt"
    rm -rf "$out/run-$tag"
  done
done
