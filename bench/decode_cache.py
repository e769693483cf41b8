"""The sampler's preallocated key/value cache against the growing one it replaced, in one run, alternating.

A growing cache (transformers' DynamicCache) appends each decoding step's keys and values with a copy of the
whole cache; the sampler now allocates the cache once for the batch's prompt and new tokens (StaticCache,
written in place). Two workloads of the demo, on the same model:
- self-instruct's instance step: 12 prompts of ~150-560 tokens (seed tasks as demonstrations), 48 new tokens,
  temperature 0.7, top-p 0.5;
- the extraction grid: templates A-D x 61 shipped name/address targets, 15 new tokens, top-k 100.
Prints each run's seconds and how many outputs the two caches share.

    .venv/bin/python bench/decode_cache.py [--model default] [--dtype auto] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from peers import cpu_kind  # noqa: E402

from leakaudit import resources, sampling  # noqa: E402
from leakaudit.attacks.pii import run_cells  # noqa: E402
from leakaudit.data import synth  # noqa: E402
from leakaudit.data.enron import shipped_targets  # noqa: E402
from leakaudit.kinds.pii import PiiOptions  # noqa: E402
from leakaudit.models import load_model  # noqa: E402

PREALLOCATED = sampling._decoding_cache


def growing_cache(lm, batch, groups, length, size):
    """The former cache: the same shared starts, in a DynamicCache that grows by one position per step."""
    from transformers import DynamicCache

    filled = PREALLOCATED(lm, batch, groups, length, size)
    cache = DynamicCache(config=lm.model.config)
    if length:
        for i, layer in enumerate(filled.layers):
            cache.update(layer.keys[:, :, :length], layer.values[:, :, :length], i)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    print(f"model={args.model} dtype={lm.dtype} threads={torch.get_num_threads()} cpu={cpu_kind()}")

    seeds = synth.load_seed_tasks(resources.path("self-instruct-seed", "seed_tasks.jsonl"))
    rng = synth._round_rng(0, 0)
    instructions = [t.instruction for t in seeds[:12]]
    prompts = [synth.instance_prompt(rng.sample(list(seeds), 3), c) for c in instructions]
    lengths = sorted(len(lm.tokenizer(p).input_ids) for p in prompts)
    print(f"instance prompts: {len(prompts)}, {lengths[0]}-{lengths[-1]} tokens")
    cfg = sampling.SamplingConfig(max_new_tokens=48, temperature=0.7, top_p=0.5, seed=0, stop_at_eos=False)
    targets = shipped_targets()[:61]
    cells = PiiOptions(templates="fake-privacy", temperatures=[1.0], top_k=100, max_new_tokens=15).cells()

    def instances() -> list[str]:
        return [s.text for s in sampling.sample(lm, prompts, cfg, progress=False)]

    def extraction() -> list[str]:
        return [x["response"] for r in run_cells(lm, cells, targets, progress=False) for x in r.extractions]

    for name, work in (("self-instruct instances", instances), ("extraction grid", extraction)):
        times: dict[str, list[float]] = {"growing": [], "preallocated": []}
        outputs: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for kind in times:
                sampling._decoding_cache = growing_cache if kind == "growing" else PREALLOCATED
                start = time.perf_counter()
                outputs[kind] = work()
                times[kind].append(time.perf_counter() - start)
        sampling._decoding_cache = PREALLOCATED
        ratios = [g / p for g, p in zip(times["growing"], times["preallocated"], strict=True)]
        same = sum(a == b for a, b in zip(outputs["growing"], outputs["preallocated"], strict=True))
        print(f"{name}: growing {', '.join(f'{t:.2f}' for t in times['growing'])} s; preallocated "
              f"{', '.join(f'{t:.2f}' for t in times['preallocated'])} s; growing / preallocated "
              f"{min(ratios):.2f}-{max(ratios):.2f}x; identical outputs {same}/{len(outputs['growing'])}")


if __name__ == "__main__":
    main()
