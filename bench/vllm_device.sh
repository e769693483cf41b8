#!/usr/bin/env bash
# Run the vLLM backend for real on a lent GPU machine that has no package index and takes 64 MiB per call.
# vLLM 0.26.0 is the release built for that machine's torch 2.11.0+cu130 (later ones pin torch 2.13/2.14).
# Its wheel is 290 MiB; without the FA2 and MoE kernels and the Rust front end (Hopper runs FA3; all three
# are optional imports) it packs to 72 MiB with xz, so it travels in two parts over two calls:
#   here:      bash bench/vllm_device.sh bundle  -> .dev1/ (missing wheels + part 1), .dev2/ (part 2)
#   device 1:  bash .dev1/vllm_device.sh stash $OUT (carry .dev1): wheels, keep part 1, run the GPU tests
#   device 2:  bash .dev2/vllm_device.sh test $OUT (carry .dev2): the next call, while the machine is warm
# bundle adds .dev1/ and .dev2/ to .git/info/exclude, so that each travels only when carried.
set -u
step=${1:?usage: bench/vllm_device.sh bundle|stash OUT|test OUT}
VLLM=0.26.0
# On the machine's image (KINDS.md) but needed: leakaudit's and vLLM's imports that it lacks.
WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions gguf opacus
rapidfuzz faker phonenumbers rouge-score nltk datasets dill multiprocess cbor2 msgspec pyzmq pybase64
cachetools blake3 setproctitle partial-json-parser ijson python-json-logger"
case $step in
bundle)
  here=$(cd "$(dirname "$0")/.." && pwd); tmp=$(mktemp -d); cd "$here" || exit 1
  plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform any"
  for t in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_26 manylinux_2_27 \
           manylinux_2_28; do plat="$plat --platform ${t}_x86_64"; done
  grep -qx /.dev1/ .git/info/exclude 2>/dev/null || printf '/.dev1/\n/.dev2/\n' >> .git/info/exclude
  rm -rf .dev1 .dev2 && mkdir -p .dev1 .dev2
  for w in $WHEELS; do python3 -m pip download -q --no-deps $plat -d .dev1 "$w" || exit 2; done
  python3 -m pip download -q --no-deps $plat -d "$tmp" "vllm==$VLLM" || exit 2
  (cd "$tmp" && unzip -q vllm-*.whl -x 'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' \
     'vllm/_moe_C_stable_libtorch.abi3.so' 'vllm/vllm-rs' 'vllm/third_party/fmha_sm100/*' \
   && tar -cf - vllm vllm-*.dist-info | xz -T0 -6 > vllm.tar.xz) || exit 3
  head -c 30000000 "$tmp/vllm.tar.xz" > .dev1/vllm.part1
  tail -c +30000001 "$tmp/vllm.tar.xz" > .dev2/vllm.part2
  cp "$0" .dev1/ && cp "$0" .dev2/ && rm -rf "$tmp"
  du -sh .dev1 .dev2;;
stash)
  out=${2:?OUT}; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  mkdir -p /tmp/stash && cp .dev1/vllm.part1 /tmp/stash/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .dev1/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  timeout 240 python3 -m pytest -m gpu tests/gpu/test_gpu.py -q -p no:cacheprovider -rA \
    > "$out/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"; tail -8 "$out/gpu_tests.txt";;
test)
  out=${2:?OUT}; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  [ -f /tmp/stash/vllm.part1 ] && [ -d /tmp/site/pydantic ] || { echo "fresh machine: stash first"; exit 5; }
  cat /tmp/stash/vllm.part1 .dev2/vllm.part2 | xz -d -T4 | tar -x -C /tmp/site || exit 4
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c "import vllm; print('vllm', vllm.__version__)"
  timeout 470 python3 -m pytest -m gpu tests/gpu/test_vllm.py -q -s -p no:cacheprovider -rA \
    > "$out/vllm_tests.txt" 2>&1
  echo "vllm tests rc=$?"; grep -E "vLLM fp32|ranks of|passed|failed|Error" "$out/vllm_tests.txt" | tail -30;;
esac
