#!/usr/bin/env bash
# Run the vLLM backend for real on a lent GPU machine that has no package index and takes 64 MiB per call.
# vLLM 0.26.0 is the release built for that machine's torch 2.11.0+cu130 (later ones pin torch 2.13/2.14).
# Its wheel is 290 MiB; without the FA2 and MoE kernels and the Rust front end (Hopper runs FA3; all three
# are optional imports) it packs to 72 MiB with xz, so it travels in two parts over two calls:
#   here:      bash bench/vllm_device.sh bundle  -> .dev1/ (missing wheels + part 1), .dev2/ (part 2)
#   device 1:  bash .dev1/vllm_device.sh stash $OUT (carry .dev1): wheels, keep part 1, run the GPU tests
#   device 2:  bash .dev2/vllm_device.sh test $OUT (carry .dev2): the next call, while the machine is warm
# bundle adds .dev1/ and .dev2/ to .git/info/exclude, so that each travels only when carried.
# The tree + part 2 is over 64 MiB unless the big data under leakaudit/resources is out of the tree for the two
# calls (`hold` before, `unhold` after; the GPU tests need only the tiny tokenizer's corpus).
# GPU_TESTS=0 skips test_gpu.py in `stash`; VLLM_K picks tests (-k) in `test`.
set -u
step=${1:?usage: bench/vllm_device.sh bundle|hold|unhold|stash OUT|test OUT}
VLLM=0.26.0
# On the machine's image (KINDS.md) but needed: leakaudit's and vLLM's imports that it lacks.
WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions gguf opacus
rapidfuzz faker phonenumbers rouge-score nltk datasets dill multiprocess cbor2 msgspec pyzmq pybase64
cachetools blake3 setproctitle partial-json-parser ijson python-json-logger"
# Imported on the `LLM(...)` path too, found by importing vLLM's engine, worker and model modules here against the
# image's package list (KINDS.md); they travel with part 2 (xgrammar via vllm/v1/request.py, fastapi and openai via
# vllm/entrypoints/llm.py, openai-harmony via the MCP tool server; versions within vLLM 0.26.0's pins).
WHEELS2="xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 llguidance==1.7.6 openai==2.54.0 openai-harmony==0.0.8 sniffio
distro fastapi==0.136.3 starlette==1.10.0"
case $step in
bundle)
  here=$(cd "$(dirname "$0")/.." && pwd); tmp=$(mktemp -d); cd "$here" || exit 1
  plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform any"
  for t in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_26 manylinux_2_27 \
           manylinux_2_28 manylinux_2_31; do plat="$plat --platform ${t}_x86_64"; done
  grep -qx /.dev1/ .git/info/exclude 2>/dev/null || printf '/.dev1/\n/.dev2/\n' >> .git/info/exclude
  rm -rf .dev1 .dev2 && mkdir -p .dev1 .dev2
  for w in $WHEELS; do python3 -m pip download -q --no-deps $plat -d .dev1 "$w" || exit 2; done
  for w in $WHEELS2; do python3 -m pip download -q --no-deps $plat -d .dev2 "$w" || exit 2; done
  python3 -m pip download -q --no-deps $plat -d "$tmp" "vllm==$VLLM" || exit 2
  (cd "$tmp" && unzip -q vllm-*.whl -x 'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' \
     'vllm/_moe_C_stable_libtorch.abi3.so' 'vllm/vllm-rs' 'vllm/third_party/fmha_sm100/*' \
   && tar -cf - vllm vllm-*.dist-info | xz -T0 -6 > vllm.tar.xz) || exit 3
  head -c 30000000 "$tmp/vllm.tar.xz" > .dev1/vllm.part1
  tail -c +30000001 "$tmp/vllm.tar.xz" > .dev2/vllm.part2
  cp "$0" .dev1/ && cp "$0" .dev2/ && rm -rf "$tmp"
  du -sh .dev1 .dev2;;
hold)  # big data out of the tree for the two device calls (unhold puts it back)
  cd "$(dirname "$0")/.." || exit 1; held=../.leakaudit-held; r=leakaudit/resources
  for f in $r/backdoor-extraction $r/enron-users $r/enron-exposure $r/enron-emails $r/pii-enron-pil/*shot*.jsonl; do
    mkdir -p "$held/$(dirname "$f")" && mv "$f" "$held/$f" || exit 1; done
  du -sh "$held";;
unhold)
  cd "$(dirname "$0")/.." || exit 1; held=../.leakaudit-held
  (cd "$held" && tar -cf - .) | tar -xf - && rm -rf "$held" && git status --short;;
stash)
  out=${2:?OUT}; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  mkdir -p /tmp/stash && cp .dev1/vllm.part1 /tmp/stash/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .dev1/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  [ "${GPU_TESTS:-1}" = 0 ] && exit 0  # GPU_TESTS=0: test_gpu.py left for after the vLLM tests
  timeout 200 python3 -m pytest -m gpu tests/gpu/test_gpu.py -q -p no:cacheprovider -rA \
    > "$out/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"; tail -8 "$out/gpu_tests.txt";;
test)
  out=${2:?OUT}; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  # flashinfer (vLLM's default top-k/top-p sampler on CUDA) is not carried: vLLM's own PyTorch sampler instead
  export VLLM_USE_FLASHINFER_SAMPLER=0
  [ -f /tmp/stash/vllm.part1 ] && [ -d /tmp/site/pydantic ] || { echo "fresh machine: stash first"; exit 5; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .dev2/*.whl || exit 3
  cat /tmp/stash/vllm.part1 .dev2/vllm.part2 | xz -d -T4 | tar -x -C /tmp/site || exit 4
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c "import vllm.entrypoints.llm, vllm.v1.engine.core, vllm.v1.worker.gpu_model_runner, vllm
print('vllm', vllm.__version__, 'imports')" 2>&1 | grep -v "INFO\|WARNING" | tail -4
  timeout 420 python3 -m pytest -m gpu tests/gpu/test_vllm.py ${VLLM_K:+-k "$VLLM_K"} -q -s -p no:cacheprovider -rA \
    > "$out/vllm_tests.txt" 2>&1
  echo "vllm tests rc=$?"; grep -E "vLLM |ranks under|free before|passed|failed|Error" "$out/vllm_tests.txt" | tail -30;;
esac
