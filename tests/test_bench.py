"""The benchmarks' A/B switches: each arm must run the code path it names. A switch replaces a name in a
leakaudit module, and a rename or a moved import there leaves it replacing a name nothing reads: both arms
then time the same code, and the benchmark reports no difference without failing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from leakaudit.train import finetune as ft

BENCH = Path(__file__).resolve().parent.parent / "bench"
TEXTS = [f"Message number {i} about the quarterly numbers, sent to the whole team." for i in range(8)]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return p


def _cfg(data, out, **kw):
    return ft.FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(out), epochs=1, batch_size=4,
                             gradient_accumulation=1, max_steps=4, save_steps=2, **kw)


def test_checkpoint_writes_plain_arm_saves_the_optimizer_state_in_every_checkpoint(data, tmp_path, monkeypatch):
    """The plain arm replaced `_lean_trainer_class`, which finetune no longer reads (`_trainer_class(lean)`):
    its runs left the optimizer state out of the last checkpoint, as the lean arm does."""
    from transformers import TrainerCallback

    monkeypatch.setattr(ft, "_trainer_class", ft._trainer_class)  # put back after the bench's switch
    monkeypatch.setattr(ft, "_last_step_checkpoint", ft._last_step_checkpoint)
    _bench("checkpoint_writes").plain_saving()

    saved = {}

    class Saved(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved[state.global_step] = (tmp_path / "out" / f"checkpoint-{state.global_step}" / "optimizer.pt").exists()

    ft.finetune(_cfg(data, tmp_path / "out", method="full"), progress=False, callbacks=[Saved()])
    assert saved == {2: True, 4: True}


def test_packed_attention_sdpa_arm_trains_without_per_example_attention(data, tmp_path, monkeypatch):
    """The sdpa arm replaced `packed_attention` in finetune's namespace, which finetune has imported inside the
    function since the import moved there: its runs trained with per-example attention too."""
    from leakaudit.train import packed_attention as pa

    entered = []
    real = pa.packed_attention

    def spy(model, device):
        entered.append(device)
        return real(model, device)

    monkeypatch.setattr(pa, "packed_attention", spy)  # put back after the bench's switch
    _bench("packed_attention").sdpa_attention()
    ft.finetune(_cfg(data, tmp_path / "out", method="full", device="cpu"), progress=False)
    assert entered == []
