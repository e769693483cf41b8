"""Defenses: per-user cap and dedup change the data as specified; PII scrubbing; DP-SGD trains and reports epsilon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leakaudit.errors import InputError
from leakaudit.models import load_model
from leakaudit.perplexity import perplexity
from leakaudit.train.defenses import dedup_and_cap
from leakaudit.train.finetune import FinetuneConfig, finetune, load_examples


@pytest.fixture(scope="module", autouse=True)
def _one_noise_search_per_setting():
    """Opacus' search for the noise multiplier that spends a target epsilon is a pure function of its
    arguments and takes 2-3 s of RDP accounting per call on the 2-core machine: the file's DP runs searched 9
    times for 5 settings. Each setting is searched for once, for real, and its answer reused (the resume test,
    which counts searches, wraps this function and still counts every call)."""
    import opacus.privacy_engine

    real, found = opacus.privacy_engine.get_noise_multiplier, {}

    def search_once(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in found:
            found[key] = real(**kwargs)
        return found[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(opacus.privacy_engine, "get_noise_multiplier", search_once)
        yield


def test_dedup_then_cap_keeps_first_samples_per_user_in_file_order():
    rows = [("a", "x"), ("a", "x"), ("b", "x"), ("a", "y"), ("a", "z"), ("b", "y"), ("a", "w")]
    keep, report = dedup_and_cap(rows, dedup_within_user=True, max_samples_per_user=2)
    assert keep == [0, 2, 3, 5]  # a: x (dup dropped), y; b: x, y; a's z and w are over the cap
    assert (report.dropped_duplicates, report.dropped_over_cap, report.n_out) == (1, 2, 4)
    assert report.per_user_out == {"a": 2, "b": 2}
    keep, _ = dedup_and_cap(rows, dedup_within_user=False, max_samples_per_user=None)
    assert keep == list(range(len(rows)))
    keep, _ = dedup_and_cap(rows, dedup_within_user=True)  # the same text from two users is kept for both
    assert keep == [0, 2, 3, 4, 5, 6]


def test_cli_user_defenses_need_a_user_field(tmp_path):
    from typer.testing import CliRunner

    from leakaudit.cli import app
    from leakaudit.errors import InputError

    res = CliRunner().invoke(app, ["finetune", "--model", "tiny-gpt-neox", "--data", str(tmp_path / "d.jsonl"),
                                   "--out", str(tmp_path / "o"), "--dedup-within-user"])
    assert isinstance(res.exception, InputError) and res.exception.field == "--dedup-within-user"
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    p = tmp_path_factory.mktemp("users") / "train.jsonl"
    rows = [{"text": f"Note {i} from user {u}: contact me at person{i}@example.com", "user": u}
            for i, u in enumerate(["a", "a", "a", "b", "b", "c"])]
    rows.append(dict(rows[0]))  # a duplicate of user a's first text
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_finetune_applies_user_defenses_and_scrubbing(user_data, tmp_path, tiny_neox):
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(user_data), out=str(tmp_path / "o"), user_field="user",
                         max_samples_per_user=2, dedup_within_user=True, scrub_pii=True, max_length=64)
    train, held, report = load_examples(cfg, tiny_neox.tokenizer)
    texts = [tiny_neox.tokenizer.decode(e.input_ids) for e in train]
    assert len(train) == 5 and not held  # a: 2 of 3 (+1 duplicate dropped), b: 2, c: 1
    assert report.dropped_duplicates == 1 and report.dropped_over_cap == 1 and report.pii_replaced == 5
    assert not any(f"person{i}@example.com" in t for t in texts for i in range(7))
    assert all("@" in t for t in texts)  # consistent fake addresses from the PII replacer
    assert not any(t.startswith("Note 2 ") for t in texts)  # user a's third sample is over the cap


def test_early_stopping_holds_out_rows_and_stops(user_data, tmp_path):
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(user_data), out=str(tmp_path / "es"), method="full",
                         epochs=8, batch_size=4, gradient_accumulation=1, learning_rate=0.5,
                         early_stopping_patience=1, eval_fraction=0.3, max_grad_norm=None)
    out = finetune(cfg, progress=False)
    report = json.loads((out / "defenses.json").read_text())
    # 30% of 7 rows is 2, one of them user a's repeated text, whose copy is held out with it
    assert report["n_heldout_examples"] == 3 and report["n_train_examples"] == 4
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(evals) >= 2
    # stopped as soon as the held-out loss failed to improve, well before the 8 epochs
    assert len(evals) < 8 and evals[-1] >= min(evals[:-1])


def test_early_stopping_on_a_few_rows_holds_out_one_and_on_one_row_is_refused(tmp_path):
    """10% of 4 rows rounds to none: early stopping then silently never evaluated."""
    from leakaudit.errors import InputError

    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"text": f"Row {i} of a tiny set."}) + "\n" for i in range(4)))
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "o"), method="full", epochs=2,
                         batch_size=2, early_stopping_patience=1)
    out = finetune(cfg, progress=False)
    assert json.loads((out / "defenses.json").read_text())["n_heldout_examples"] == 1
    assert any("eval_loss" in json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines())
    data.write_text(json.dumps({"text": "One row only."}) + "\n")
    with pytest.raises(InputError) as err:
        finetune(cfg.model_copy(update={"out": str(tmp_path / "o1")}), progress=False)
    assert err.value.field == "--eval-fraction"


def test_early_stopping_holds_out_every_copy_of_a_held_out_text(tmp_path, tiny_neox):
    """Rows were held out one by one, so a repeated text could be both held out and trained on: the eval
    loss early stopping watches then scored trained text (3 of 25 held-out messages in study 3, seed 0)."""
    data = tmp_path / "dups.jsonl"
    rows = [{"text": f"Message {i % 4} from a sender.", "user": "u"} for i in range(12)]  # 4 texts, 3 copies each
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "o"), user_field="user",
                         early_stopping_patience=1, eval_fraction=0.25, max_length=64)
    train, held, report = load_examples(cfg, tiny_neox.tokenizer)
    trained = {tuple(e.input_ids) for e in train}
    assert held and train and not any(tuple(e.input_ids) in trained for e in held)
    assert report.per_user_out == {"u": len(train)}  # the rows the user trains on (it counted the held-out too)
    assert len(train) + len(held) == 12 and len(held) % 3 == 0  # whole texts, each with its copies
    # a run killed under the row-by-row split is not resumed on this one: the held-out rule is in its fingerprint
    plain = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "o"), user_field="user")
    assert "heldout" in json.dumps(_fingerprint_parts(cfg)) and "heldout" not in json.dumps(_fingerprint_parts(plain))


def test_a_run_of_the_row_by_row_split_is_refused_naming_the_split(tmp_path):
    """A finished early-stopping run of the release before the split fix has another fingerprint: its rerun
    is refused, and the reason said was "the content of the data or model files changed", which they had not."""
    from leakaudit.train.finetune import DONE_MARKER, check_out

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a row"}) + "\n")
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "o"), early_stopping_patience=2)
    out = tmp_path / "o"
    out.mkdir()
    (out / "finetune_config.json").write_text(json.dumps({"fingerprint": "0" * 16, **cfg.model_dump()}))  # as then
    (out / DONE_MARKER).write_text(json.dumps({"fingerprint": "0" * 16, "step": 3}))
    with pytest.raises(InputError, match="the held-out split: rows one by one then") as err:
        check_out(cfg, out)
    assert "files changed" not in str(err.value)


def _fingerprint_parts(cfg: FinetuneConfig) -> dict:
    """What `fingerprint` hashes, read back by patching its hash."""
    import hashlib
    from unittest import mock

    seen = {}
    real = hashlib.sha256

    def spy(data=b""):
        if data.startswith(b"{"):  # the options' JSON; file hashes on the way start empty
            seen["parts"] = json.loads(data.decode())
        return real(data)

    with mock.patch("leakaudit.train.finetune.hashlib.sha256", spy):
        cfg.fingerprint()
    return seen["parts"]


def test_the_fine_tune_reads_users_as_user_inference_does(tmp_path, tiny_neox, capsys):
    """The per-user defenses read users by their own rule: 3.0 and 3 were two users (two caps), a NaN was the
    user "nan", and ids in two Unicode forms split a person's cap in silence. One rule now (data.io.user_value),
    and the look-alike warning."""
    from leakaudit import warn

    data = tmp_path / "u.jsonl"
    users = [3, 3.0, 3, "Jos\u00e9", "Jose\u0301", "Jos\u00e9"]
    data.write_text("".join(json.dumps({"text": f"row {i}", "user": u}) + "\n" for i, u in enumerate(users)))
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "o"), user_field="user",
                         max_samples_per_user=1, max_grad_norm=None)
    warn._WARNED.clear()
    _, _, report = load_examples(cfg, tiny_neox.tokenizer)
    assert report.dropped_over_cap == 3  # user 3 keeps 1 of 3, José (one form) 1 of 2, José (the other) its 1
    assert "1 user id(s) are written in more than one Unicode form" in capsys.readouterr().err
    data.write_text(json.dumps({"text": "row", "user": float("nan")}) + "\n")  # NaN: JSON as Python writes it
    with pytest.raises(InputError, match="user is empty"):
        load_examples(cfg, tiny_neox.tokenizer)


def test_mitigation_numbers_are_not_booleans():
    """pydantic reads true as 1: `dp_epsilon=True` trained at epsilon 1, `max_samples_per_user=True` kept one
    row per user."""
    from pydantic import ValidationError

    base = {"model": "tiny-gpt-neox", "data": "d.jsonl", "out": "o", "user_field": "user"}
    for key in ("dp_epsilon", "max_samples_per_user", "early_stopping_patience", "max_grad_norm", "epochs"):
        with pytest.raises(ValidationError, match="must be a number, not true") as err:
            FinetuneConfig(**base, **{key: True})
        assert err.value.errors()[0]["loc"] == (key,)
    with pytest.raises(ValidationError) as err:  # named at its key, not at no field (`--option`)
        FinetuneConfig(**base, dp_epsilon=8.0, max_grad_norm=0.5)
    assert err.value.errors()[0]["loc"] == ("max_grad_norm",)


def test_early_stopping_resumes_to_the_straight_run_and_keeps_the_best_checkpoint(user_data, tmp_path, monkeypatch):
    """Killed after any checkpoint, an early-stopped full fine-tune resumes to the straight run's steps and
    weights (the patience counter and the stop decision survive the kill), and its final model is the best
    checkpoint's, every weight of it (GPT-NeoX's output layer is saved as `embed_out`; the Trainer's own
    loading skipped it). The held-out losses are scripted by step: the real ones of 3 rows at learning rate 0.5
    wander with the CPU and precision (in bf16 on one Xeon they never stopped the run)."""
    import transformers
    from transformers import TrainerCallback

    scripted = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.6}  # best at step 4, two evaluations without gain: stop at 8

    class ScriptedEarlyStopping(transformers.EarlyStoppingCallback):
        def on_evaluate(self, args, state, control, metrics, **kwargs):
            metrics["eval_loss"] = scripted.get(state.global_step, 9.0)  # the Trainer picks its best from these
            return super().on_evaluate(args, state, control, metrics, **kwargs)

    # transformers' lazy module copies a submodule's names onto itself on first use: patch both places
    monkeypatch.setattr(transformers.trainer_callback, "EarlyStoppingCallback", ScriptedEarlyStopping)
    monkeypatch.setattr(transformers, "EarlyStoppingCallback", ScriptedEarlyStopping)

    class Kill(Exception):
        pass

    class KillAfterSave(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                raise Kill

    def cfg(name):
        return FinetuneConfig(model="tiny-gpt-neox", data=str(user_data), out=str(tmp_path / name), method="full",
                              epochs=8, batch_size=2, gradient_accumulation=1, learning_rate=0.5,
                              early_stopping_patience=2, eval_fraction=0.3, max_grad_norm=None)  # 4 rows trained

    def steps(out):
        return [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()
                if "loss" in json.loads(x)]

    straight = finetune(cfg("straight"), progress=False)
    final = load_file(str(straight / "model.safetensors"))
    state = json.loads((straight / f"checkpoint-{steps(straight)[-1]}" / "trainer_state.json").read_text())
    best = load_file(str(Path(state["best_model_checkpoint"]) / "model.safetensors"))
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-4" and steps(straight)[-1] == 8
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    best_step = int(Path(state["best_model_checkpoint"]).name.split("-")[-1])
    assert json.loads((straight / "finetune_done.json").read_text())["step"] == best_step  # not the last step
    for step in [s for s in steps(straight) if s % 2 == 0]:  # two steps per epoch, a checkpoint per epoch
        with pytest.raises(Kill):
            finetune(cfg(f"killed{step}"), progress=False, callbacks=[KillAfterSave(step)])
        out = finetune(cfg(f"killed{step}"), progress=False)
        assert steps(out) == steps(straight), step
        resumed = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(resumed[k], final[k]) for k in final), step
        assert json.loads((out / "finetune_done.json").read_text())["step"] == best_step, step


def test_dp_sgd_shows_its_progress_without_library_noise(tmp_path, monkeypatch, capsys):
    """DP-SGD runs its own loop, which drew no bar (a log got nothing for a whole run), and every run printed
    Opacus's secure-RNG note and torch's backward-hook warning with their source lines."""
    import warnings

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Row {i} says alpha bravo."}) + "\n" for i in range(16)))
    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "0.000001")  # a line at every step, into the captured log
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "dp"), method="lora", epochs=1,
                         batch_size=4, gradient_accumulation=1, dp_epsilon=8.0)  # 4 steps
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        finetune(cfg, progress=True)
    assert not [str(w.message) for w in said if "Secure RNG" in str(w.message) or "backward hook" in str(w.message)]
    assert "fine-tuning (DP-SGD): " in capsys.readouterr().err
    privacy = json.loads((tmp_path / "dp" / "privacy.json").read_text())
    assert privacy["max_rows_per_user"] is None and privacy["rows_per_user_cap"] is None  # no users named


def test_dp_sgd_lora_changes_adapter_lowers_loss_and_reports_epsilon(tmp_path, tiny_neox):
    data = tmp_path / "d.jsonl"
    texts = [f"The secret code of row {i} is alpha bravo charlie." for i in range(16)]
    data.write_text("".join(json.dumps({"text": t, "user": "ab"[i % 5 == 0]}) + "\n" for i, t in enumerate(texts)))
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "dp"), method="lora",
                         epochs=3, batch_size=4, gradient_accumulation=2, learning_rate=3e-2, lora_dropout=0.0,
                         dp_epsilon=8.0, user_field="user", max_samples_per_user=13)
    out = finetune(cfg, progress=False)
    privacy = json.loads((out / "privacy.json").read_text())
    assert 0 < privacy["epsilon"] <= 8.0 + 1e-6 and privacy["noise_multiplier"] > 0.5
    assert privacy["delta"] == pytest.approx(1e-5)
    # what the bound is for: one training row; the group a user is: the most rows one user trained on (user
    # a: 12 of the 16; it said the cap, 13 here and null uncapped, as if the cap were what a user trained on)
    assert privacy["unit"].startswith("training row") and privacy["n_rows"] == 16
    assert privacy["max_rows_per_user"] == 12 and privacy["rows_per_user_cap"] == 13
    assert privacy["dp_max_grad_norm"] == 1.0
    assert json.loads((out / "finetune_done.json").read_text())["step"] == privacy["steps"] > 0
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)  # B starts at zero: it must have moved
    trained = load_model(str(out), dtype="fp32")
    after = perplexity(trained, texts, progress=False).nll_per_token
    assert after < perplexity(tiny_neox, texts, progress=False).nll_per_token - 0.02  # nats per token


def test_dp_resume_loads_every_weight_of_a_full_checkpoint(tmp_path, tiny_neox):
    """DP-SGD's resume of a full fine-tune restores all weights, GPT-NeoX's output layer too (saved under its
    original name `embed_out`, which a plain load_state_dict skipped)."""
    from transformers import AutoModelForCausalLM

    from leakaudit.train.dp import _load_trainable

    trained = AutoModelForCausalLM.from_config(tiny_neox.model.config)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    trained.save_pretrained(str(tmp_path / "checkpoint-1"))
    assert "embed_out.weight" in load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    fresh = AutoModelForCausalLM.from_config(tiny_neox.model.config)
    _load_trainable(fresh, tmp_path / "checkpoint-1", "full")
    want = trained.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())


def test_dp_sgd_on_layers_opacus_cannot_handle_is_a_clear_error(tmp_path):
    """OPT's full fine-tune: Opacus fails inside its hooks (position embeddings take the attention mask,
    fc1/fc2 see batch and sequence flattened); the first step turns that into one line naming the option."""
    from leakaudit.errors import InputError

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Private row {i} says hello."}) + "\n" for i in range(8)))
    cfg = FinetuneConfig(model="tiny-opt", data=str(data), out=str(tmp_path / "o"), method="full", epochs=1,
                         batch_size=4, gradient_accumulation=1, dp_epsilon=8.0)
    with pytest.raises(InputError) as err:
        finetune(cfg, progress=False)
    assert err.value.field == "--method" and "per-example gradients" in str(err.value)
    assert not list((tmp_path / "o").glob("checkpoint-*"))


class _EpochKill(Exception):
    pass


def _kill_after_first_epoch(real_write):
    """DP-SGD's write_json, raising once the first epoch's state is saved: a kill at that moment."""
    def write(path, obj):
        real_write(path, obj)
        if str(path).endswith("dp_state.json"):
            raise _EpochKill
    return write


def test_dp_sgd_resumes_after_a_kill_with_the_same_privacy_spent(tmp_path, monkeypatch, capsys):
    from leakaudit.train import dp

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Private row {i} says hello."}) + "\n" for i in range(8)))

    def cfg(name):
        return FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / name), method="lora",
                              epochs=2, batch_size=4, gradient_accumulation=1, learning_rate=1e-2, dp_epsilon=4.0)

    real_write = dp.write_json
    kill_after_first_epoch = _kill_after_first_epoch(real_write)

    import opacus.privacy_engine

    searches = []
    real_search = opacus.privacy_engine.get_noise_multiplier

    def counted_search(**kwargs):
        searches.append(kwargs)
        return real_search(**kwargs)

    monkeypatch.setattr(opacus.privacy_engine, "get_noise_multiplier", counted_search)
    monkeypatch.setattr(dp, "write_json", kill_after_first_epoch)
    with pytest.raises(_EpochKill):
        finetune(cfg("resumed"), progress=False)
    noise = json.loads((tmp_path / "resumed" / "dp_state.json").read_text())["noise_multiplier"]
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*/dp_optimizer.pt")]  # kept to resume
    monkeypatch.setattr(dp, "write_json", real_write)
    capsys.readouterr()
    import warnings

    with warnings.catch_warnings(record=True) as seen:  # torch warned the fast-forward of the schedule skipped
        warnings.simplefilter("always")  # a learning rate: a false alarm on every resume
        resumed = finetune(cfg("resumed"), progress=True)
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in seen]
    assert "resuming from checkpoint-2 (a killed run's last checkpoint in " in capsys.readouterr().err
    assert not list(resumed.glob("checkpoint-*/dp_optimizer.pt")) and list(resumed.glob("checkpoint-*/adapter_*"))
    privacy = json.loads((resumed / "privacy.json").read_text())
    # the resumed run reuses the saved noise instead of searching for it again (seconds of RDP accounting)
    assert len(searches) == 1 and privacy["noise_multiplier"] == noise
    # the privacy spent counts the steps before and after the kill: recompute it from scratch for all steps
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"])]
    assert privacy["steps"] == 4  # 2 epochs x 8 rows / expected batch 4
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(privacy["delta"]), rel=1e-6)
    assert privacy["epsilon"] <= 4.0 + 1e-6
    log = [json.loads(x) for x in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "epsilon" in r] == [1, 2]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps)) and steps[0] == 1
    # the resumed run drew what an uninterrupted one draws: the same Poisson batches, learning rates, losses and
    # weights (it replayed epoch 1's batches, and stepped its schedule once per empty batch too)
    straight = finetune(cfg("straight"), progress=False)
    assert (straight / "train_log.jsonl").read_text() == (resumed / "train_log.jsonl").read_text()
    from safetensors.torch import load_file

    a, b = (load_file(next(d.glob("adapter_model.safetensors"))) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dp_sgd_resumes_past_a_log_line_a_kill_cut_short(tmp_path, monkeypatch):
    """The log is appended a row per step: a kill mid-write left half a line, and the resume died on it with a
    JSONDecodeError traceback; a damaged checkpoint stopped it with torch's EOFError."""
    from leakaudit.errors import InputError
    from leakaudit.train import dp

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Private row {i} says hello."}) + "\n" for i in range(8)))
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "o"), method="lora", epochs=2,
                         batch_size=4, gradient_accumulation=1, learning_rate=1e-2, dp_epsilon=4.0)
    real_write = dp.write_json
    kill_after_first_epoch = _kill_after_first_epoch(real_write)

    monkeypatch.setattr(dp, "write_json", kill_after_first_epoch)
    with pytest.raises(_EpochKill):
        finetune(cfg, progress=False)
    log = tmp_path / "o" / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "epoch": 2, "lo')  # the next step's row, cut short
    monkeypatch.setattr(dp, "write_json", real_write)
    state = json.loads((tmp_path / "o" / "dp_state.json").read_text())
    optimizer = tmp_path / "o" / state["checkpoint"] / "dp_optimizer.pt"
    kept = optimizer.read_bytes()
    optimizer.write_bytes(b"")  # a damaged checkpoint: one line naming it, not torch's EOFError
    with pytest.raises(InputError, match="dp_optimizer.pt cannot be read"):
        finetune(cfg, progress=False)
    optimizer.write_bytes(kept)
    out = finetune(cfg, progress=False)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "epsilon" in r] == [1, 2]


def test_dp_sgd_refuses_options_its_loop_would_ignore():
    """DP-SGD trains in its own Opacus loop; options it has no use for were silently ignored (a held-out split
    never used, no warmup, checkpoints only per epoch, half an epoch trained as a whole one)."""
    from pydantic import ValidationError

    base = {"model": "tiny-gpt-neox", "data": "d.jsonl", "out": "o", "dp_epsilon": 8.0}
    for extra, word in (({"early_stopping_patience": 1}, "early_stopping_patience"),
                        ({"eval_fraction": 0.2}, "eval_fraction"), ({"warmup_steps": 5}, "warmup_steps"),
                        ({"lr_scheduler": "cosine"}, "lr_scheduler"), ({"epochs": 0.5}, "whole epochs"),
                        ({"save_steps": 1}, "checkpoints each epoch"), ({"method": "dora"}, "lora or full")):
        with pytest.raises(ValidationError, match=word):
            FinetuneConfig(**base, **extra)
    FinetuneConfig(**base, epochs=2.0, lr_scheduler="linear")  # what the loop does is accepted
    with pytest.raises(ValidationError, match="linear"):  # a bad name is a one-line error, not a traceback later
        FinetuneConfig(**{**base, "dp_epsilon": None}, lr_scheduler="bogus")
    assert FinetuneConfig(**{**base, "dp_epsilon": None}, max_grad_norm=0).max_grad_norm is None  # 0 = off


def test_dp_sgd_refuses_layers_it_would_clip_per_token(tmp_path):
    """OPT flattens batch and tokens before fc1/fc2: Opacus gives one gradient per token there and clipped
    tokens, not examples, while privacy.json reported the epsilon. The first step refuses it."""
    from leakaudit.errors import InputError

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Private row {i} says hello."}) + "\n" for i in range(8)))
    for modules in ("fc1", "fc2"):
        cfg = FinetuneConfig(model="tiny-opt", data=str(data), out=str(tmp_path / modules), method="lora",
                             target_modules=modules, epochs=1, batch_size=4, gradient_accumulation=1,
                             max_length=64, dp_epsilon=8.0)
        with pytest.raises(InputError, match="clip per token, not per example, for " + modules) as err:
            finetune(cfg, progress=False)
        assert err.value.field == "--target-modules" and not (tmp_path / modules / "privacy.json").exists()


def test_dp_privacy_report_gives_the_rate_opacus_accounts_at(tmp_path):
    """n 10, batch 4: Opacus samples each example with probability 1/3 (1 / batches per epoch), not 0.4;
    privacy.json gives that rate, and Opacus' accountant fed the report's own numbers gives its epsilon."""
    from opacus.accountants import RDPAccountant

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"Row {i} of the private set."}) + "\n" for i in range(10)))
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "dp"), method="lora",
                         epochs=2, batch_size=4, gradient_accumulation=1, learning_rate=1e-2, dp_epsilon=8.0)
    report = json.loads((finetune(cfg, progress=False) / "privacy.json").read_text())
    assert report["sample_rate"] == pytest.approx(1 / 3) and report["expected_batch_size"] == pytest.approx(10 / 3)
    accountant = RDPAccountant()
    accountant.history = [(report["noise_multiplier"], report["sample_rate"], report["steps"])]
    assert accountant.get_epsilon(report["delta"]) == pytest.approx(report["epsilon"], rel=1e-9)


def test_dp_sgd_refuses_rows_it_would_split_and_a_batch_clip_it_would_ignore(tmp_path):
    """A plain row longer than max_length was split into several examples, which DP-SGD samples, clips and
    accounts one by one: one 300-word row became 63 of 70 examples while privacy.json said epsilon 8 (for the
    row, only a group bound holds). And max_grad_norm was accepted with DP and ignored (DP clips each example at
    dp_max_grad_norm), while privacy.json showed the DP clip under its name."""
    from leakaudit.errors import InputError

    data = tmp_path / "d.jsonl"
    rows = [{"text": f"short row {i}"} for i in range(6)]
    rows.insert(3, {"text": " ".join(["word"] * 300)})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "dp"), method="lora", epochs=1,
                         batch_size=2, max_length=32, dp_epsilon=8.0)
    with pytest.raises(InputError) as err:
        finetune(cfg, progress=False)
    assert err.value.line == 4 and err.value.field == "--dp-epsilon"
    assert "1 row is longer than 32 tokens and would be split" in str(err.value)
    assert not (tmp_path / "dp" / "privacy.json").exists()
    for given in (0.01, 1.0):  # the default's value given explicitly is unused as well
        with pytest.raises(ValueError, match="max_grad_norm .* is not used by DP-SGD"):
            FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "x"), dp_epsilon=8.0,
                           max_grad_norm=given)
    for off in (0, None):  # off asks for nothing DP-SGD does not do
        FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "x"), dp_epsilon=8.0,
                       max_grad_norm=off)
    assert FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "x")).max_grad_norm == 1.0


def test_rows_without_a_user_field_are_no_user_in_the_report():
    """defenses.json listed rows read without a user field under a user called "None"."""
    from leakaudit.train.defenses import dedup_and_cap

    keep, report = dedup_and_cap([(None, "a"), (None, "b")])
    assert keep == [0, 1] and report.per_user_out == {}
    assert dedup_and_cap([("1", "a"), ("u", "b"), ("u", "c")])[1].per_user_out == {"1": 1, "u": 2}


def test_opacus_empty_first_batch_line_is_kept_off_stderr(caplog):
    """A Poisson draw of no row as a loader's first batch (a resumed run's first epoch) had Opacus print its raw
    "First batch is empty ... may cause issues" on stderr; the loop accounts an empty batch and skips it."""
    import logging

    from opacus.data_loader import CollateFnWithEmpty
    from torch.utils.data import default_collate

    from leakaudit.train.dp import quiet_empty_batches

    with caplog.at_level(logging.WARNING, logger="opacus.data_loader"):
        CollateFnWithEmpty(default_collate)([])
        assert any("First batch is empty" in r.getMessage() for r in caplog.records)  # Opacus says it
        caplog.clear()
        with quiet_empty_batches():
            CollateFnWithEmpty(default_collate)([])
        assert not caplog.records
        CollateFnWithEmpty(default_collate)([])
        assert caplog.records  # only inside the loop
