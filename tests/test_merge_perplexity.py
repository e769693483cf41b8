"""Merge gives identical logits; perplexity matches a hand computation; every checkpoint is measured."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_main
from typer.testing import CliRunner

from leakaudit.models import load_model
from leakaudit.perplexity import perplexity, perplexity_per_checkpoint
from leakaudit.train.finetune import FinetuneConfig, finetune
from leakaudit.train.merge import merge_adapter

TEXTS = ["alpha beta gamma delta", "The quick brown fox jumps over the lazy dog.", "Hello world"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("mp") / "d.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3))
    return p


@pytest.mark.parametrize("spec,method", [("tiny-gpt-neox", "lora"), ("tiny-opt", "lora"),
                                         ("tiny-gpt-neox", "dora"), ("tiny-opt", "pissa")])
def test_adapter_reloads_and_merges_with_identical_logits(spec, method, data, tmp_path):
    out = finetune(FinetuneConfig(model=spec, data=str(data), out=str(tmp_path / "a"), method=method,
                                  epochs=1, batch_size=3, gradient_accumulation=1, learning_rate=2e-2,
                                  max_steps=2, lora_dropout=0.0), progress=False)
    adapter = load_model(str(out), dtype="fp32")
    base = load_model(spec, dtype="fp32")
    merged_dir = merge_adapter(out, tmp_path / "merged")
    merged = load_model(str(merged_dir), dtype="fp32")
    ids = torch.tensor([adapter.tokenizer(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        a, m, b = (x.model(input_ids=ids).logits for x in (adapter, merged, base))
    assert not torch.allclose(a, b, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(m, a, atol=2e-5, rtol=1e-5)
    # folded for inference, the weights are in the state a plain load leaves them (torch's matmul picks a
    # 3.5x slower LM-head path in generate for frozen weights: leakaudit/models/load.py)
    assert all(p.requires_grad for p in adapter.model.parameters()) == all(
        p.requires_grad for p in base.model.parameters())


def test_an_adapter_on_a_tied_lm_head_folds_in_without_changing_the_embeddings(data, tmp_path):
    """tiny-opt ties its LM head to the input embeddings; an adapter on the head trains the head only, so
    folding it in (on load, and in merge) must not move the shared embeddings."""
    out = finetune(FinetuneConfig(model="tiny-opt", data=str(data), out=str(tmp_path / "a"), method="lora",
                                  target_modules="q_proj,v_proj,lm_head", epochs=1, batch_size=3,
                                  gradient_accumulation=1, learning_rate=5e-2, max_steps=2, lora_dropout=0.0),
                   progress=False)
    unmerged = load_model(str(out), dtype="fp32", for_training=True)
    unmerged.model.eval()
    folded = load_model(str(out), dtype="fp32")
    merged = load_model(str(merge_adapter(out, tmp_path / "merged")), dtype="fp32")
    base = load_model("tiny-opt", dtype="fp32")
    ids = torch.tensor([base.tokenizer(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        u, f, m, b = (x.model(input_ids=ids).logits for x in (unmerged, folded, merged, base))
    assert not torch.allclose(u, b, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(f, u, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(m, u, atol=2e-5, rtol=1e-5)
    for lm in (folded, merged):
        torch.testing.assert_close(lm.model.get_input_embeddings().weight, base.model.get_input_embeddings().weight)


def test_perplexity_matches_hand_computation(tiny_neox):
    # cache=False: a score cache that persists between test runs would answer both calls, batched or not
    res = perplexity(tiny_neox, TEXTS, batch_size=2, progress=False, cache=False)
    nll, n, per_text = 0.0, 0, []
    for t in TEXTS:
        ids = torch.tensor([tiny_neox.tokenizer(t)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_neox.model(input_ids=ids).logits[0, :-1].double(), -1)
        tok_lp = logp.gather(1, ids[0, 1:, None])[:, 0]
        nll -= float(tok_lp.sum())
        n += tok_lp.numel()
        per_text.append(math.exp(-float(tok_lp.mean())))
    assert res.n_tokens == n and res.n_texts == 3
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert res.mean_text_ppl == pytest.approx(sum(per_text) / 3, rel=1e-4)
    unbatched = perplexity(tiny_neox, TEXTS, batch_size=1, progress=False, cache=False)
    assert unbatched.ppl == pytest.approx(res.ppl, rel=1e-5)


def test_stride_reaches_the_scoring_pass_of_perplexity_and_user_inference(tiny_neox, monkeypatch, capsys):
    """`--stride` was mia's and score's only: perplexity and user inference scored long texts at max length / 2
    whatever one wanted. Both take it now (command, kind, Python API), and a stride the window cannot hold is
    refused at its own key."""
    from leakaudit import scoring
    from leakaudit.attacks.user_inference import run_user_inference
    from leakaudit.data.io import Record
    from leakaudit.kinds import get_kind

    long = " ".join(f"word{i}" for i in range(120))
    strided = scoring.score_texts(tiny_neox, [long], max_length=32, stride=8, cache=False, progress=False)[0]
    halves = scoring.score_texts(tiny_neox, [long], max_length=32, cache=False, progress=False)[0]
    assert abs(strided.sum_logp - halves.sum_logp) > 1e-3  # the stride changes the numbers
    res = perplexity(tiny_neox, [long], max_length=32, stride=8, progress=False, cache=False)
    assert res.ppl == pytest.approx(math.exp(-strided.sum_logp / strided.n_tokens), rel=1e-5)
    from leakaudit import distributed

    seen = []
    real = distributed.score_texts_distributed  # user inference's passes go through attacks.base.scoring_pass
    monkeypatch.setattr(distributed, "score_texts_distributed",
                        lambda lm, texts, **kw: seen.append(kw["stride"]) or real(lm, texts, **kw))
    records = [Record(id=f"{u}{i}", text=f"{long} {u} {i}", user=u, line=i) for u in "abcd" for i in range(2)]
    report = run_user_inference(tiny_neox, tiny_neox, records[:4], records[4:], m_values=[1], n_bootstrap=0,
                                max_length=32, stride=8, cache=False, progress=False)
    assert set(report.user_scores["1"]) == set("abcd") and seen == [8, 8]  # target and reference passes
    for name in ("perplexity", "user-inference"):
        options = get_kind(name).Options
        assert options(max_length=32, stride=8).stride == 8
        with pytest.raises(ValueError, match="stride must be between 1 and max length - 1 \\(31\\)"):
            options(max_length=32, stride=32)


def test_perplexity_cli_over_every_checkpoint(data, tmp_path):
    from leakaudit.cli import app

    run = tmp_path / "run"
    finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(run), epochs=2, batch_size=3,
                            gradient_accumulation=1, learning_rate=2e-2), progress=False)
    results = perplexity_per_checkpoint(run, TEXTS, progress=False)
    assert len(results) == 3  # checkpoint per epoch (2) + final
    assert results[-1].ppl < results[0].ppl
    res = CliRunner().invoke(app, ["perplexity", "--model", str(run), "--data", str(data), "--out",
                                   str(tmp_path / "p"), "--all-checkpoints"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "p" / "perplexity.json").read_text())  # the experiment stage's shape
    assert [c["perplexity"] for c in saved["checkpoints"]] == pytest.approx([r.ppl for r in results])
    assert saved["perplexity"] == pytest.approx(results[-1].ppl)
    # `step` is the optimizer step of each row's weights: 9 rows in batches of 3 are 3 steps an epoch
    assert [c["step"] for c in saved["checkpoints"]] == [3, 6, 6]
    assert [c["name"] for c in saved["checkpoints"]] == ["checkpoint-3", "checkpoint-6", "final"]


def test_a_run_without_a_final_model_names_its_last_checkpoint_not_final(data, tmp_path, monkeypatch, capsys):
    """A run killed mid-training has checkpoints and no final model: `--all-checkpoints` measured its last
    checkpoint and called that row `final`, as if the run had finished."""
    run = tmp_path / "run"
    finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(run), epochs=2, batch_size=3,
                            gradient_accumulation=1), progress=False)
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json", "finetune_done.json"):
        (run / name).unlink(missing_ok=True)
    code, out, err = run_main(["perplexity", "--model", run, "--data", data, "--out", tmp_path / "p",
                               "--all-checkpoints"], monkeypatch, capsys, stdout=True)
    assert code == 0, err
    saved = json.loads((tmp_path / "p" / "perplexity.json").read_text())
    assert [(c["name"], c["step"]) for c in saved["checkpoints"]] == [("checkpoint-3", 3), ("checkpoint-6", 6)]
    assert "final" not in out and out.startswith("checkpoint-3\t"), out
    code, out, err = run_main(["perplexity", "--model", run / "checkpoint-3", "--data", data, "--out",
                               tmp_path / "q"], monkeypatch, capsys, stdout=True)
    assert code == 0 and out.startswith("checkpoint-3\t"), (out, err)


def test_perplexity_over_every_checkpoint_reads_a_home_relative_run_dir(data, tmp_path, monkeypatch, capsys):
    """`--model '~/run' --all-checkpoints` said "no model or checkpoint found in this dir", while the same spec
    loads without --all-checkpoints (and in every other command): `~` was not read as the home folder."""
    finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "run"), max_steps=1,
                            batch_size=4, gradient_accumulation=1, save_steps=1), progress=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, err = run_main(["perplexity", "--model", "~/run", "--data", data, "--out", tmp_path / "p",
                               "--all-checkpoints"], monkeypatch, capsys, stdout=True)
    assert code == 0, err
    assert "checkpoint-1\t" in out and "final\t" in out, out


def test_perplexity_over_every_checkpoint_of_a_model_name_says_it_is_not_a_dir(data, tmp_path, monkeypatch,
                                                                               capsys):
    """`--model tiny-gpt-neox --all-checkpoints` said "no model or checkpoint found in this dir" of a name that is
    no dir at all."""
    code, err = run_main(["perplexity", "--model", "tiny-gpt-neox", "--data", data, "--out", tmp_path / "p",
                          "--all-checkpoints"], monkeypatch, capsys)
    assert code == 2 and "not a directory" in err and "field '--model'" in err, err


def test_perplexity_kind_measures_checkpoints_only_when_asked(data, tmp_path):
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache
    from leakaudit.perplexity import model_dirs

    run = tmp_path / "run"
    finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(run), epochs=2, batch_size=3,
                            gradient_accumulation=1, learning_rate=2e-2), progress=False)
    kind = get_kind("perplexity")
    checkpoints = [str(d) for d in model_dirs(run) if d != run]
    results = {}
    for flag in (True, False):
        out = tmp_path / f"ppl-{flag}"
        out.mkdir()
        ctx = KindContext(out=out, models={"target": str(run)}, data={"data": data}, checkpoints=checkpoints,
                          cache=ModelCache(dtype="fp32"), log=lambda m: None, progress=False)
        results[flag] = kind.run(ctx, kind.Options(checkpoints=flag)).data
    assert len(results[True]["checkpoints"]) == 3 and results[False]["checkpoints"] == []
    assert results[False]["perplexity"] == pytest.approx(results[True]["perplexity"])


def test_merge_reruns_into_its_own_out_and_a_missing_target_names_its_flag(data, tmp_path, monkeypatch, capsys):
    """A second `merge` into the folder the first wrote was refused as 'not written by leakaudit merge'; a
    target that cannot load was reported as field '--model', a flag mia does not have."""
    adapter = finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "a"),
                                      max_steps=1, batch_size=4, gradient_accumulation=1), progress=False)

    def run(*argv):
        return run_main(argv, monkeypatch, capsys)

    for _ in range(2):
        code, err = run("merge", "--adapter", adapter, "--out", tmp_path / "merged")
        assert code == 0, err
    (tmp_path / "m.jsonl").write_text('{"text": "one member text here"}\n')
    (tmp_path / "n.jsonl").write_text('{"text": "one other text here"}\n')
    code, err = run("mia", "--target", tmp_path / "no-such-model", "--members", tmp_path / "m.jsonl",
                    "--nonmembers", tmp_path / "n.jsonl", "--out", tmp_path / "o", "--no-cache")
    assert code == 2 and "field '--target'" in err, err


def test_merge_refuses_to_write_over_its_adapters_base(data, tmp_path, monkeypatch, capsys):
    """An adapter trained on an earlier merge's output, merged with --out that same folder, deleted its own base
    and wrote base + adapter there (exit 0): the base was lost and the adapter then loaded onto itself."""
    first = finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "a"),
                                    max_steps=1, batch_size=4, gradient_accumulation=1), progress=False)
    base = merge_adapter(first, tmp_path / "base")
    second = finetune(FinetuneConfig(model=str(base), data=str(data), out=str(tmp_path / "b"),
                                     max_steps=1, batch_size=4, gradient_accumulation=1), progress=False)
    weights = (base / "model.safetensors").read_bytes()
    code, err = run_main(["merge", "--adapter", second, "--out", base], monkeypatch, capsys)
    assert code == 2 and "base_model_name_or_path" in err, err
    assert (base / "model.safetensors").read_bytes() == weights


def test_merge_of_a_pickle_adapter_names_its_own_flag(data, tmp_path, monkeypatch, capsys):
    """merge refuses adapter_model.bin (no --allow-pickle there), but its error named field '--model', a flag
    merge does not have."""
    from safetensors.torch import load_file

    adapter = Path(finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "a"),
                                           max_steps=1, batch_size=4, gradient_accumulation=1), progress=False))
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    code, err = run_main(["merge", "--adapter", adapter, "--out", tmp_path / "m"], monkeypatch, capsys)
    assert code == 2 and "field '--adapter'" in err and "pickle" in err, err
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_a_merge_that_dies_while_saving_keeps_the_earlier_merge_and_reruns(data, tmp_path, monkeypatch, capsys):
    """A merge killed or failing while saving deleted the earlier merge first, and left --out with weights but no
    leakaudit_merge.json, so that its rerun was refused as 'not written by `leakaudit merge`'."""
    from transformers import PreTrainedTokenizerBase

    adapter = finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "a"),
                                      max_steps=1, batch_size=4, gradient_accumulation=1), progress=False)
    out = merge_adapter(adapter, tmp_path / "merged")
    weights = (out / "model.safetensors").read_bytes()

    def dies(*args, **kwargs):  # after the weights are written, as a kill or a full disk there would
        raise RuntimeError("killed while saving")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerBase, "save_pretrained", dies)
        for target in (out, tmp_path / "fresh"):
            with pytest.raises(RuntimeError):
                merge_adapter(adapter, target)
    assert (out / "model.safetensors").read_bytes() == weights and (out / "leakaudit_merge.json").is_file()
    code, err = run_main(["merge", "--adapter", adapter, "--out", tmp_path / "fresh"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "fresh" / "model.safetensors").read_bytes() == weights


def test_merge_reads_a_home_relative_adapter_as_model_specs_are_read(data, tmp_path, monkeypatch, capsys):
    """`merge --adapter '~/a'` was refused as 'not an adapter dir', while `score --model '~/a'` loads it."""
    finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "a"), max_steps=1,
                            batch_size=4, gradient_accumulation=1), progress=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, err = run_main(["merge", "--adapter", "~/a", "--out", tmp_path / "m"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "m" / "model.safetensors").is_file()
    code, err = run_main(["merge", "--adapter", "~/a", "--out", tmp_path / "a" / "m"], monkeypatch, capsys)
    assert code == 2 and "inside the --adapter directory" in err, err


def test_a_perplexity_model_that_cannot_load_names_its_own_flag(data, tmp_path, monkeypatch, capsys):
    """The error named `--target`, an option perplexity does not have."""
    empty = tmp_path / "empty_model"
    empty.mkdir()
    code, err = run_main(["perplexity", "--model", empty, "--data", data, "--out", tmp_path / "p"], monkeypatch,
                         capsys)
    assert code == 2 and "field '--model'" in err and "--target" not in err, err


def test_texts_with_no_scored_token_are_said_when_left_out(tiny_neox, capsys):
    """A one-token text has no scored token: perplexity left it out and reported n_texts 3 of 4, silently."""
    one_token = next(c for c in "xyzab" if len(tiny_neox.tokenizer(c)["input_ids"]) == 1)
    res = perplexity(tiny_neox, [*TEXTS, one_token], progress=False, cache=False)
    assert res.n_texts == len(TEXTS)
    assert f"1 of {len(TEXTS) + 1} texts have no scored token" in capsys.readouterr().err


def test_perplexity_takes_texts_as_a_list_as_scoring_does(tiny_neox, data, tmp_path):
    """perplexity(lm, "one text") read the string as its characters and said `field '--data': no text has a
    token to score`; perplexity_per_checkpoint(run, generator) gave the generator's texts to the first
    checkpoint only, and the next had none."""
    with pytest.raises(TypeError, match="one string"):
        perplexity(tiny_neox, "The quick brown fox jumps over the lazy dog.")
    run = tmp_path / "run"
    finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(run), epochs=2, batch_size=3,
                            gradient_accumulation=1, learning_rate=2e-2), progress=False)
    results = perplexity_per_checkpoint(run, (t for t in TEXTS), progress=False)
    assert [r.n_texts for r in results] == [3, 3, 3]
