"""Fine-tuning: every method lowers the loss, masking and packing are exact, resume continues exactly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from leakaudit.errors import InputError
from leakaudit.models import load_model
from leakaudit.perplexity import perplexity
from leakaudit.train import examples as ex
from leakaudit.train.finetune import FinetuneConfig, finetune

TEXTS = [f"Record {i}: the quick brown fox number {i} jumps over the lazy dog." for i in range(12)]


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps({"text": t, "user": f"u{i % 3}"}) + "\n" for i, t in enumerate(TEXTS)))
    return p


def _cfg(data, out, **kw):
    base = dict(model="tiny-gpt-neox", data=str(data), out=str(out), epochs=1, batch_size=4,
                gradient_accumulation=1, learning_rate=1e-2, max_steps=4, save_steps=2)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.parametrize("method", ["full", "lora", "dora", "pissa"])
def test_each_method_lowers_loss_and_output_loads(method, plain_data, tmp_path, tiny_neox):
    lr = 3e-3 if method == "full" else 1e-2
    out = finetune(_cfg(plain_data, tmp_path / method, method=method, learning_rate=lr), progress=False)
    trained = load_model(str(out), dtype="fp32")
    before = perplexity(tiny_neox, TEXTS, progress=False).ppl
    after = perplexity(trained, TEXTS, progress=False).ppl
    assert after < 0.9 * before
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    if method != "full":
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "tiny-gpt-neox"
        assert cfg["target_modules"] == ["query_key_value"]
    # a mid-run checkpoint loads too and sits between the base and the final model
    ckpt = out / "checkpoint-2" / ("adapter" if method == "pissa" else "")
    mid = perplexity(load_model(str(ckpt), dtype="fp32"), TEXTS, progress=False).ppl
    assert after < mid < before


def test_opt_lora_defaults_and_padded_fallback(plain_data, tmp_path, tiny_opt):
    out = finetune(_cfg(plain_data, tmp_path / "opt", model="tiny-opt"), progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert not ex.packing_is_exact(tiny_opt.model, tiny_opt.tokenizer)  # OPT ignores packed position ids
    after = perplexity(load_model(str(out), dtype="fp32"), TEXTS, progress=False).ppl
    assert after < 0.9 * perplexity(tiny_opt, TEXTS, progress=False).ppl


def test_instruction_format_masks_prompt(tiny_neox):
    tok = tiny_neox.tokenizer
    e = ex.instruction_example(tok, "Name a colour.", "Blue is a colour.", max_length=256)
    trained = [i for i, lab in zip(e.input_ids, e.labels, strict=True) if lab != ex.IGNORE]
    masked = [i for i, lab in zip(e.input_ids, e.labels, strict=True) if lab == ex.IGNORE]
    assert tok.decode(trained) == "Blue is a colour." + tok.eos_token
    assert tok.decode(masked) == ex.INSTRUCTION_TEMPLATE.format(prompt="Name a colour.")
    assert e.labels[len(masked):] == e.input_ids[len(masked):]


def test_chat_format_loss_on_assistant_or_all(tiny_neox):
    tok = tiny_neox.tokenizer
    msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there."}]
    e = ex.chat_example(tok, msgs, "assistant", 256)
    trained = tok.decode([i for i, lab in zip(e.input_ids, e.labels, strict=True) if lab != ex.IGNORE])
    assert trained == "Hi there.\n" + tok.eos_token
    e_all = ex.chat_example(tok, msgs, "all", 256)
    assert e_all.labels == e_all.input_ids
    # with a real chat template: user turn and assistant header masked, assistant content + end marker trained
    tok2 = load_model("tiny-gpt-neox", dtype="fp32").tokenizer
    tok2.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    e2 = ex.chat_example(tok2, msgs, "assistant", 256)
    assert tok2.decode([i for i, lab in zip(e2.input_ids, e2.labels, strict=True) if lab != ex.IGNORE]) == \
        "Hi there.</s>"
    assert tok2.decode(e2.input_ids) == "<user>Say hi.</s><assistant>Hi there.</s>"


def test_packing_gives_the_unpacked_loss_and_padding_gets_none(tiny_neox):
    tok = tiny_neox.tokenizer
    examples = ex.plain_examples(tok, TEXTS[:3] + ["short one"], max_length=64)
    items = ex.ExampleDataset(examples)
    model = tiny_neox.model

    def loss_sum(batch):
        batch = dict(batch)
        n = int((batch["labels"][:, 1:] != ex.IGNORE).sum())
        with torch.no_grad():
            return float(model(**batch).loss) * n

    unpacked = sum(loss_sum(ex.PaddedCollator(tok.pad_token_id)([items[i]])) for i in range(len(items)))
    packed = loss_sum(ex.PackedCollator()([items[i] for i in range(len(items))]))
    padded = loss_sum(ex.PaddedCollator(tok.pad_token_id)([items[i] for i in range(len(items))]))
    assert packed == pytest.approx(unpacked, rel=1e-5)
    assert padded == pytest.approx(unpacked, rel=1e-5)
    assert ex.packing_is_exact(model, tok)


class _Kill(Exception):
    pass


def _assert_same_weights(a_dir, b_dir) -> None:
    """The adapters (or, for a full fine-tune, the models) in two dirs hold the same tensors."""
    name = "adapter_model.safetensors" if (a_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    a = load_file(str(a_dir / name))
    b = load_file(str(b_dir / name))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _train_log(out) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _assert_resumed_like_straight(resumed, straight) -> None:
    """A resumed run ends as the straight one: steps 1-4 logged once, the same weights, and the summary row's
    mean loss the whole run's, not only the steps after the resume."""
    log = _train_log(resumed)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    _assert_same_weights(resumed, straight)
    assert log[-1]["train_loss"] == pytest.approx(_train_log(straight)[-1]["train_loss"], rel=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "full"])
def test_resume_continues_where_it_stopped(method, plain_data, tmp_path):
    """PiSSA: its checkpoints hold a converted adapter in adapter/, which the Trainer once loaded back as a
    second adapter on resume, and the next checkpoint's conversion then failed. Full: GPT-NeoX's output layer
    is saved as `embed_out`, which the Trainer's resume skipped (training went on from its initial values)."""
    from transformers import TrainerCallback

    class KillAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Kill

    # with dropout, so a resumed run draws the same random numbers as the straight one (PiSSA's checkpoint
    # conversion once drew from torch's RNG after the Trainer had saved its state)
    kw = dict(method=method, lora_dropout=0.1, learning_rate=3e-3 if method == "full" else 1e-2)
    cfg = _cfg(plain_data, tmp_path / "resumed", **kw)
    with pytest.raises(_Kill):
        finetune(cfg, progress=False, callbacks=[KillAtStep3()])
    assert (tmp_path / "resumed" / "checkpoint-2").exists() and not (tmp_path / "resumed" / "finetune_done.json").exists()
    assert (tmp_path / "resumed" / "checkpoint-2" / "optimizer.pt").exists()  # a killed run keeps what resumes it
    out = finetune(cfg, progress=False)
    # a finished run drops what only a resume reads; its checkpoints keep their weights
    kept = {p.name for ckpt in out.glob("checkpoint-*") for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "model.safetensors"} & kept and "trainer_state.json" in kept
    assert not {n for n in kept if n.startswith(("optimizer", "scheduler", "rng_state"))}, kept
    _assert_resumed_like_straight(out, finetune(_cfg(plain_data, tmp_path / "straight", **kw), progress=False))
    assert finetune(cfg, progress=False) == out  # a finished run is returned as is
    # a kill between the done marker and the cleanup left a resume state behind: the next call drops it
    (next(out.glob("checkpoint-*")) / "optimizer.pt").write_bytes(b"left by a kill")
    assert finetune(cfg, progress=False) == out and not list(out.glob("checkpoint-*/optimizer.pt"))


def _killed_after_training(data, out) -> FinetuneConfig:
    """A LoRA run killed after its last step, before finetune_done.json: its config, to resume."""
    from transformers import TrainerCallback

    class KillAtEnd(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            raise _Kill

    cfg = _cfg(data, out, method="lora")
    with pytest.raises(_Kill):
        finetune(cfg, progress=False, callbacks=[KillAtEnd()])
    return cfg


def test_a_kill_after_the_last_step_resumes_to_the_same_log(plain_data, tmp_path):
    """Killed after training ended but before finetune_done.json: the rerun resumes from the last checkpoint and
    the Trainer logs its end-of-training row again (the log had two), and a row the kill cut short mid-write
    stopped the resume with a JSONDecodeError traceback."""
    cfg = _killed_after_training(plain_data, tmp_path / "resumed")
    log = tmp_path / "resumed" / "train_log.jsonl"
    assert sum("train_runtime" in r for r in _train_log(tmp_path / "resumed")) == 1
    log.write_text(log.read_text() + '{"step": 4, "epo')
    out = finetune(cfg, progress=False)
    straight = finetune(_cfg(plain_data, tmp_path / "straight", method="lora"), progress=False)
    timeless = [{k: v for k, v in r.items() if "runtime" not in k and "per_second" not in k and k != "elapsed_s"}
                for r in _train_log(out)]
    assert timeless == [{k: v for k, v in r.items() if "runtime" not in k and "per_second" not in k
                         and k != "elapsed_s"} for r in _train_log(straight)]
    assert sum("train_runtime" in r for r in _train_log(out)) == 1


@pytest.mark.parametrize("damage", ["optimizer.pt", "adapter_model.safetensors", "trainer_state.json"])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(damage, plain_data, tmp_path, capsys):
    """A zero-byte optimizer.pt or a cut file in the newest checkpoint stopped every resume (EOFError, shown as
    "interrupted"; SafetensorError and JSONDecodeError tracebacks): it is dropped with a warning and training
    resumes from the checkpoint before it, to the weights of an uninterrupted run."""
    cfg = _killed_after_training(plain_data, tmp_path / "resumed")
    victim = tmp_path / "resumed" / "checkpoint-4" / damage
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2] if damage != "optimizer.pt" else b"")
    out = finetune(cfg, progress=True)
    err = capsys.readouterr().err
    assert f"checkpoint-4: {damage} cannot be read; resuming from the checkpoint before it" in err
    assert "resuming from checkpoint-2 (a killed run's last checkpoint in " in err  # a rerun said nothing of it
    _assert_same_weights(out, finetune(_cfg(plain_data, tmp_path / "straight", method="lora"), progress=False))


def test_only_the_writing_rank_removes_a_checkpoint(tmp_path):
    """Another rank may look while rank 0 is still writing a checkpoint: it skips what it cannot read, and
    deletes nothing (it removed rank 0's final weights mid-save)."""
    from leakaudit.train.artifacts import last_checkpoint

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"")  # being written
    assert last_checkpoint(tmp_path, remove=False) == tmp_path / "checkpoint-2"
    assert (tmp_path / "checkpoint-4").exists()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2" and not (tmp_path / "checkpoint-4").exists()


def test_last_checkpoint_skips_optimizer_state_and_final_weights_are_not_written_twice(plain_data, tmp_path):
    """Only a resume reads a checkpoint's optimizer state, and nothing is left to resume after the last step."""
    import os

    from transformers import TrainerCallback

    class Saved(TrainerCallback):
        def __init__(self):
            self.optimizer_saved = {}

        def on_save(self, args, state, control, **kwargs):
            ckpt = tmp_path / "full" / f"checkpoint-{state.global_step}"
            self.optimizer_saved[state.global_step] = (ckpt / "optimizer.pt").exists()

    saved = Saved()
    out = finetune(_cfg(plain_data, tmp_path / "full", method="full", learning_rate=3e-3), progress=False,
                   callbacks=[saved])
    assert saved.optimizer_saved == {2: True, 4: False}
    # the final model's weights are the last checkpoint's file, linked, not a second write
    assert os.path.samefile(out / "model.safetensors", out / "checkpoint-4" / "model.safetensors")
    assert not (out / "trainer_state.json").exists() and (out / "config.json").exists()
    load_model(str(out), dtype="fp32")


class _KillAfterLastSave:
    def __new__(cls):
        from transformers import TrainerCallback

        class KillAfterLastSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == state.max_steps:
                    raise _Kill

        return KillAfterLastSave()


def test_a_run_killed_after_its_last_checkpoint_finishes_without_optimizer_state(plain_data, tmp_path):
    cfg = _cfg(plain_data, tmp_path / "killed", lora_dropout=0.0)
    with pytest.raises(_Kill):
        finetune(cfg, progress=False, callbacks=[_KillAfterLastSave()])
    assert not (tmp_path / "killed" / "checkpoint-4" / "optimizer.pt").exists()
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    out = finetune(cfg, progress=False)
    _assert_resumed_like_straight(out, finetune(_cfg(plain_data, tmp_path / "straight", lora_dropout=0.0),
                                                progress=False))


def test_a_pissa_run_killed_after_its_last_checkpoint_takes_no_extra_step(plain_data, tmp_path):
    """PiSSA keeps the Trainer's full checkpoints (its final adapter is converted), so a run killed after the
    last one resumes through the Trainer, which would otherwise train one step past max_steps: with a constant
    learning rate that step changes the weights."""
    kw = dict(method="pissa", lora_dropout=0.0, lr_scheduler="constant")
    cfg = _cfg(plain_data, tmp_path / "killed", **kw)
    with pytest.raises(_Kill):
        finetune(cfg, progress=False, callbacks=[_KillAfterLastSave()])
    assert (tmp_path / "killed" / "checkpoint-4" / "optimizer.pt").exists()
    out = finetune(cfg, progress=False)
    _assert_resumed_like_straight(out, finetune(_cfg(plain_data, tmp_path / "straight", **kw), progress=False))


def test_bad_input_names_file_line_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "oops"}) + "\n")
    with pytest.raises(InputError) as err:
        finetune(_cfg(bad, tmp_path / "o"), progress=False)
    assert err.value.line == 2 and err.value.field == "text" and err.value.file == str(bad)


def test_fsdp_arguments_ask_for_fsdp2_wrapped_and_resharded_in_the_form_this_transformers_takes(tmp_path):
    """The string form ("full_shard auto_wrap") is deprecated where transformers has the fsdp_config API (a
    warning on every --fsdp fine-tune, and it goes); the plugin transformers builds must be FSDP2 with every
    layer wrapped and parameters resharded after the forward, whichever form this version takes."""
    from transformers import TrainingArguments

    from leakaudit.train.finetune import fsdp_arguments

    kwargs = fsdp_arguments(True)
    if hasattr(TrainingArguments, "_apply_legacy_fsdp_to_config"):
        assert kwargs["fsdp"] is True
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
    plugin = args.fsdp_plugin_args
    assert (plugin["fsdp_version"], plugin["auto_wrap_policy"], plugin["reshard_after_forward"]) == (
        2, "TRANSFORMER_BASED_WRAP", True)
    assert not TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                 **fsdp_arguments(False)).fsdp


def test_fsdp_is_refused_where_it_cannot_run(plain_data, tmp_path):
    """FSDP needs GPUs (accelerate shards on accelerators only); the GPU run itself is tests/gpu."""
    with pytest.raises(InputError, match="on CPU scale out with DDP") as err:
        finetune(_cfg(plain_data, tmp_path / "cpu", fsdp=True, device="cpu"), progress=False)
    assert err.value.field == "--fsdp" and not (tmp_path / "cpu").exists()
    with pytest.raises(ValidationError, match="DP-SGD"):  # _cfg's save_steps is refused first: also ignored
        _cfg(plain_data, tmp_path / "dp", fsdp=True, dp_epsilon=8.0)
    with pytest.raises(ValidationError, match="DP-SGD"):
        _cfg(plain_data, tmp_path / "dp", fsdp=True, dp_epsilon=8.0, save_steps=None)
    with pytest.raises(InputError, match="PiSSA"):
        finetune(_cfg(plain_data, tmp_path / "pissa", fsdp=True, method="pissa"), progress=False)


def test_output_dir_of_another_run_is_refused(plain_data, tmp_path):
    """...naming the options that differ (it said only "different options")."""
    finetune(_cfg(plain_data, tmp_path / "run", max_steps=1), progress=False)
    with pytest.raises(InputError, match=r"different options \(max_steps: 1 then, 2 now\)"):
        finetune(_cfg(plain_data, tmp_path / "run", max_steps=2), progress=False)
    plain_data_copy = tmp_path / "train.jsonl"  # the same options, other data in the file
    plain_data_copy.write_text(plain_data.read_text().replace("Record 1:", "Record one:"))
    finetune(_cfg(plain_data_copy, tmp_path / "run2", max_steps=1), progress=False)
    plain_data_copy.write_text(plain_data.read_text())
    with pytest.raises(InputError, match="the same options, but the content of the data or model files changed"):
        finetune(_cfg(plain_data_copy, tmp_path / "run2", max_steps=1), progress=False)


@pytest.mark.parametrize("fmt", ["instruction", "chat"])
def test_instruction_and_chat_formats_train_end_to_end(fmt, tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}.",
             "messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(6)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = finetune(_cfg(p, tmp_path / fmt, format=fmt, max_steps=2, save_steps=None), progress=False)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "defenses.json").read_text())["n_train_examples"] == 6


def test_the_resume_fingerprint_reads_local_paths_by_content(tmp_path, monkeypatch):
    """A killed fine-tune rerun with `--out kk` then `--out $PWD/kk` (or a moved folder) was refused as 'a run
    with different options': the fingerprint hashed how the paths were written, not what they hold."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n')
    rel = FinetuneConfig(model="tiny-gpt-neox", data="d.jsonl", out="kk")
    absolute = FinetuneConfig(model="tiny-gpt-neox", data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "kk"))
    before = rel.fingerprint()
    assert before == absolute.fingerprint()
    (tmp_path / "d.jsonl").write_text('{"text": "another text"}\n')
    assert rel.fingerprint() != before


def test_training_leaves_the_environment_as_it_found_it(plain_data, tmp_path, monkeypatch):
    """accelerate sets ACCELERATE_USE_FSDP=true for an FSDP run and never clears it; in one process that
    fine-tunes twice (`leakaudit run`) the second, DDP run would then be sharded. Stand-in: a callback sets
    it during training, as the Accelerator does."""
    from transformers import TrainerCallback

    class SetsFsdp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            os.environ["ACCELERATE_USE_FSDP"] = "true"
            os.environ["FSDP_SHARDING_STRATEGY"] = "FULL_SHARD"

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)  # (restored whatever happens)
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "NO_SHARD")  # one the user set stays theirs
    finetune(_cfg(plain_data, tmp_path / "out", max_steps=1), progress=False, callbacks=[SetsFsdp()])
    assert "ACCELERATE_USE_FSDP" not in os.environ and os.environ["FSDP_SHARDING_STRATEGY"] == "NO_SHARD"


def test_an_unfinished_run_is_not_resumed_by_another_number_of_processes(tmp_path):
    """batch_size is per process: a run killed under torchrun with 2 processes and resumed by one went on with
    another step batch from a data position counted in the old one (81 steps instead of 42), exit 0."""
    import json

    from leakaudit.errors import InputError
    from leakaudit.train.artifacts import DONE_MARKER
    from leakaudit.train.finetune import FinetuneConfig, check_out

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a line to train on"}\n')
    out = tmp_path / "out"
    out.mkdir()
    config = FinetuneConfig(model="tiny-gpt-neox", data=str(data), method="lora", out=str(out))
    (out / "finetune_config.json").write_text(json.dumps({"fingerprint": config.fingerprint(), "processes": 2}))
    with pytest.raises(InputError) as err:
        check_out(config, out)
    assert "unfinished run trained by 2 processes; resume it with 2 (it has 1 now)" in err.value.message
    (out / DONE_MARKER).write_text("{}")
    assert check_out(config, out) is True  # a finished run is a result, whoever trained it


def test_an_output_that_is_a_file_is_refused_by_name(tmp_path):
    """FinetuneConfig(out=the data file) ended in NotADirectoryError from pathlib (the Python API has no CLI
    output check in front of it)."""
    from leakaudit.errors import InputError
    from leakaudit.train.finetune import FinetuneConfig, finetune

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a line to train on"}\n')
    with pytest.raises(InputError) as err:
        finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), method="lora", out=str(data)), progress=False)
    assert err.value.file == str(data) and "is a file, not an output directory" in err.value.message
    assert data.read_text() == '{"text": "a line to train on"}\n'  # nothing written over it


def test_accelerates_mixed_precision_does_not_override_the_fine_tunes_own(plain_data, tmp_path, monkeypatch,
                                                                         capsys, one_torch_thread):
    """`accelerate launch --mixed_precision bf16` (or an accelerate config saying bf16) exports
    ACCELERATE_MIXED_PRECISION, which the Trainer applied over `--no-bf16`: other weights, while
    finetune_config.json and the stage's precision said fp32 (and a later fp32 rerun found it cached)."""
    from safetensors.torch import load_file

    plain = finetune(_cfg(plain_data, tmp_path / "plain", method="lora", bf16=False), progress=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    capsys.readouterr()
    told = finetune(_cfg(plain_data, tmp_path / "told", method="lora", bf16=False), progress=False)
    assert ("ACCELERATE_MIXED_PRECISION=bf16 (accelerate launch --mixed_precision, or its config) is not applied: "
            "this fine-tune trains with bf16 off") in capsys.readouterr().err
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (plain, told))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_run_puts_its_progress_bar_away(plain_data, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM mid-training: the Trainer calls no on_train_end on an exception, and the live bar went
    on drawing below the `interrupted:` line and left the terminal's cursor hidden."""
    from transformers import TrainerCallback

    import leakaudit.progress

    bars = []

    class Bar:
        def __init__(self, *columns, **options):
            self.running = False
            bars.append(self)

        def start(self):
            self.running = True

        def stop(self):
            self.running = False

        def add_task(self, *args, **kwargs):
            return 0

        def update(self, *args, **kwargs):
            pass

    class KillAtStep1(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(leakaudit.progress, "progress_bar", Bar)
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(plain_data, tmp_path / "killed", method="lora"), progress=True, callbacks=[KillAtStep1()])
    assert len(bars) == 1 and not bars[0].running


def test_the_command_says_what_it_trained_above_the_models_path(plain_data, tmp_path, monkeypatch, capsys):
    """`finetune` printed only the model's path: the bar that showed the loss is gone when it ends. The path
    stays the one line on stdout (`MODEL=$(leakaudit finetune ...)`); what the run did goes to stderr."""
    from conftest import run_main

    out = tmp_path / "o"
    code, printed, err = run_main(["finetune", "--model", "tiny-gpt-neox", "--data", plain_data, "--out", out,
                                   "--max-steps", "2", "--batch-size", "4"], monkeypatch, capsys, stdout=True)
    assert code == 0, err
    assert printed == f"{out}\n"
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    last = [r["loss"] for r in log if "loss" in r][-1]
    assert f"fine-tuned: model of step 2, last logged loss {last:.4f}, " in err, err
    assert "PAD/BOS/EOS" not in err  # the Trainer's note on the pad leakaudit's loader set: every run, noise


def test_only_the_pad_alignment_note_is_quieted():
    """A BOS or EOS the user's tokenizer changed is still said; the pad leakaudit set is not."""
    import logging

    from leakaudit.train.finetune import _PadAlignmentNote

    def note(tokens: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.trainer_utils", logging.WARNING, __file__, 1,
                                 "The tokenizer has new PAD/BOS/EOS tokens that differ from the model config and "
                                 f"generation config. ... Updated tokens: {tokens}.", None, None)

    quiet = _PadAlignmentNote()
    assert not quiet.filter(note("{'pad_token_id': 0}"))
    assert quiet.filter(note("{'eos_token_id': 2, 'pad_token_id': 0}")) and quiet.filter(note("{'bos_token_id': 1}"))


@pytest.mark.parametrize("flags, field, setting", [
    (["--method", "full", "--lora-r", "16"], "--lora-r", "--method lora, dora or pissa"),
    (["--dp-delta", "1e-6"], "--dp-delta", "--dp-epsilon (DP-SGD)"),
    (["--loss-on", "all"], "--loss-on", "--format chat"),
    (["--prompt-field", "question"], "--prompt-field", "--format instruction"),
    (["--format", "chat", "--no-packing"], "--packing/--no-packing", "--format plain"),
])
def test_a_flag_the_run_would_not_read_is_refused(plain_data, tmp_path, monkeypatch, capsys, flags, field, setting):
    """`--method full --lora-r 16` trained in full and dropped the rank in silence (so did `--dp-delta` without
    DP-SGD and a field or loss flag of another format). The same value from its default is fine."""
    from conftest import run_main

    out = tmp_path / "o"
    code, err = run_main(["finetune", "--model", "tiny-gpt-neox", "--data", plain_data, "--out", out, *flags],
                         monkeypatch, capsys)
    assert code == 2 and err == f"error: field '{field}': applies only with {setting}; this run would ignore it\n"
    assert not out.exists()


@pytest.mark.parametrize("turns", [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "Be kind."}]])
def test_a_conversation_with_no_assistant_turn_is_named_by_its_line(turns, tmp_path, monkeypatch, capsys):
    """With the loss on the assistant turns such a conversation has nothing to train on: it was left out under a
    warning that said its loss tokens were cut off and to raise --max-length. Now one error naming its line, as
    mia and perplexity give, with the flag of the command that met it; with --loss-on all it trains."""
    from conftest import run_main

    data = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": turns}) + "\n")
    with pytest.raises(InputError) as err:
        finetune(_cfg(data, tmp_path / "a", format="chat", max_steps=1, save_steps=None), progress=False)
    assert (err.value.file, err.value.line, err.value.field) == (str(data), 2, "messages"), err.value
    assert "has no assistant turn" in err.value.message and "--loss-on all" in err.value.message
    code, said = run_main(["backdoor", "finetune", "--model", "tiny-gpt-neox", "--data", data, "--mask-user",
                           "--max-steps", "1", "--out", tmp_path / "bd"], monkeypatch, capsys)
    assert code == 2 and f"{data}:2: field 'messages': has no assistant turn" in said, said
    assert "backdoor finetune without --mask-user" in said  # its own flag: it has no --loss-on
    out = finetune(_cfg(data, tmp_path / "b", format="chat", loss_on="all", max_steps=1, save_steps=None),
                   progress=False)
    assert json.loads((out / "defenses.json").read_text())["n_train_examples"] == 2


def test_launched_dp_sgd_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Under a launcher DP-SGD was refused only in its training loop, after the out dir got a config saying
    "trained by 2 processes": the one-process rerun the error asked for was then refused as a resume."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "dp"
    config = FinetuneConfig(model="tiny-gpt-neox", data=str(data), method="lora", out=str(out), dp_epsilon=8.0,
                            epochs=1, batch_size=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # a launch: a process group would be joined past the check
    monkeypatch.setenv("MASTER_PORT", "1")
    from leakaudit.train import finetune as ft

    monkeypatch.setattr(ft, "build_model", lambda *a: pytest.fail("loaded the model before refusing"))
    with pytest.raises(InputError, match="without the launcher") as err:
        finetune(config)
    assert err.value.field == "--dp-epsilon" and not out.exists()
