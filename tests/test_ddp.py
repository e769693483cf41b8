"""DDP: two CPU processes (gloo, torchrun) reach the same model as one process on the same data.

Both runs train in fp32 whatever LEAKAUDIT_DTYPE says (bf16=False): then only the summation order differs.
Under bf16 autocast Adam turns rounding noise in near-zero gradients into whole +-lr steps (measured: 1e-2
apart after 3 steps at lr 1e-2), so no tolerance would still tell a DDP bug from rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leakaudit.train.finetune import FinetuneConfig, finetune

RUNNER = """
import json, sys
from leakaudit.train.finetune import FinetuneConfig, finetune
finetune(FinetuneConfig(**json.loads(sys.argv[1])), progress=False)
"""


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Line {i} of the shared corpus, repeated word {'x ' * (i % 5)}"})
                            + "\n" for i in range(16)))
    common = dict(model="tiny-gpt-neox", data=str(data), method="lora", epochs=1, learning_rate=1e-2,
                  gradient_accumulation=1, lora_dropout=0.0, max_steps=3, seed=0, bf16=False)
    single = finetune(FinetuneConfig(out=str(tmp_path / "one"), batch_size=4, **common), progress=False)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    cfg = json.dumps({**common, "out": str(tmp_path / "two"), "batch_size": 2})
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),  # torchrun's temp dirs go with the test
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29533", str(script), cfg], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    a = load_file(str(single / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter_model.safetensors"))
    moved = [v for k, v in a.items() if "lora_B" in k]
    assert all(float(v.abs().max()) > 0 for v in moved)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
    losses = [[r["loss"] for r in map(json.loads, (d / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (single, two)]
    assert len(losses[1]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)
