"""GPU checks, run on a CUDA machine with `pytest -m gpu tests/gpu` (deselected by default: CI has no GPU).

They check what CPU tests cannot: scores and greedy samples on CUDA agree with the CPU, and the same
`finetune` under FSDP (torchrun, accelerate FSDP2) reaches the weights of a plain single-GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Please send the report to the board.", "The meeting is moved to Friday at noon, room 4.",
         "Write a haiku about privacy.", "Hello"]


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA (select them only on a GPU machine: pytest -m gpu)")


def test_scores_on_cuda_match_cpu():
    from leakaudit.models import load_model
    from leakaudit.scoring import score_texts

    cpu = load_model("tiny-gpt-neox", device="cpu", dtype="fp32")
    gpu = load_model("tiny-gpt-neox", device="cuda", dtype="fp32")
    a = score_texts(cpu, TEXTS, moments=True, cache=False, progress=False)
    b = score_texts(gpu, TEXTS, moments=True, cache=False, progress=False)
    one = [score_texts(gpu, [t], moments=True, cache=False, progress=False, batch_size=1)[0] for t in TEXTS]
    for x, y, z in zip(a, b, one, strict=True):
        np.testing.assert_allclose(y.logp, x.logp, atol=1e-4)
        np.testing.assert_allclose(y.mu, x.mu, atol=1e-4)
        np.testing.assert_allclose(z.logp, y.logp, atol=1e-5)


def test_bf16_scores_on_cuda_are_close_to_fp32():
    from leakaudit.models import load_model
    from leakaudit.scoring import score_texts

    fp32 = load_model("tiny-gpt-neox", device="cuda", dtype="fp32")
    bf16 = load_model("tiny-gpt-neox", device="cuda", dtype="bf16")
    for x, y in zip(score_texts(fp32, TEXTS[:3], cache=False, progress=False),
                    score_texts(bf16, TEXTS[:3], cache=False, progress=False), strict=True):
        assert len(x.logp) > 3 and abs(float(x.logp.mean()) - float(y.logp.mean())) < 0.05


def test_greedy_samples_on_cuda_match_cpu_and_batch_sizes():
    from leakaudit.models import load_model
    from leakaudit.sampling import SamplingConfig, sample

    cfg = SamplingConfig(max_new_tokens=12, greedy=True, stop_at_eos=False)
    cpu = sample(load_model("tiny-gpt-neox", device="cpu", dtype="fp32"), TEXTS, cfg, progress=False)
    gpu = load_model("tiny-gpt-neox", device="cuda", dtype="fp32")
    batched = sample(gpu, TEXTS, cfg, progress=False)
    single = sample(gpu, TEXTS, cfg, progress=False, batch_size=1)
    assert [s.text for s in batched] == [s.text for s in single] == [s.text for s in cpu]


RUNNER = """
import json, sys
from leakaudit.train.finetune import FinetuneConfig, finetune
finetune(FinetuneConfig(**json.loads(sys.argv[1])), progress=False)
"""


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_run_matches_plain_single_gpu_run(tmp_path, method):
    from leakaudit.models import load_model
    from leakaudit.scoring import score_texts
    from leakaudit.train.finetune import FinetuneConfig, finetune

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Line {i} of the shared corpus, word {'x ' * (i % 5)}"}) + "\n"
                            for i in range(16)))
    common = dict(model="tiny-gpt-neox", data=str(data), method=method, epochs=1, batch_size=4,
                  learning_rate=1e-3 if method == "full" else 1e-2, gradient_accumulation=1, lora_dropout=0.0,
                  max_steps=3, seed=0, bf16=False, device="cuda")
    plain = finetune(FinetuneConfig(out=str(tmp_path / "plain"), **common), progress=False)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    cfg = json.dumps({**common, "out": str(tmp_path / "fsdp"), "fsdp": True})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           str(torch.cuda.device_count()), "--master-port", "29541", str(script), cfg],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = tmp_path / "fsdp"
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    a, b = load_file(str(plain / name)), load_file(str(sharded / name))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
    losses = [[r["loss"] for r in map(json.loads, (d / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (plain, sharded)]
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-3)
    # the FSDP output dir loads and scores like any other
    scores = score_texts(load_model(str(sharded), device="cuda", dtype="fp32"), TEXTS, cache=False, progress=False)
    assert all(np.isfinite(s.logp).all() for s in scores)
