"""Stage keys see every input byte that changes a stage's outputs: the local base of an adapter (weights
rewritten in place, same size, old mtime restored), and every file of a saved Hugging Face dataset dir (a row
edited and saved again, or the .arrow edited in place). Keys of every other spec stay as they were, so no
existing run reruns for nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from leakaudit.config import parse_experiment
from leakaudit.experiment import Plan, file_identity, model_identity
from leakaudit.models import dir_fingerprint, file_sha256, tiny_model_dir


def _old_file_identity(path) -> str:
    """file_identity as it was before dirs other than models were hashed whole: the reference for keys that
    must not change."""
    p = Path(path).expanduser()
    return dir_fingerprint(p) if p.is_dir() else file_sha256(p)


def _old_model_identity(spec: str) -> str:
    p = Path(spec).expanduser()
    return f"{spec}#{_old_file_identity(p)}" if p.exists() else spec


def _rewrite_same_size(f: Path) -> None:
    """Different bytes, same size, the old mtime restored (what `touch -r`, `cp -p` or `rsync -a` leave)."""
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # the last byte: inside the tensor data, past the safetensors/arrow header
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == len(data) and f.stat().st_mtime_ns == st.st_mtime_ns


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny GPT-NeoX saved as a plain local model dir (safetensors, config, tokenizer)."""
    d = tmp_path_factory.mktemp("base") / "base"
    shutil.copytree(tiny_model_dir("tiny-gpt-neox"), d)
    return d


def _adapter(base_spec: str, where: Path) -> Path:
    """A LoRA adapter of the tiny model saved by PEFT, its adapter_config.json naming `base_spec`."""
    from peft import LoraConfig, get_peft_model

    from leakaudit.models import load_model

    model = load_model("tiny-gpt-neox", dtype="fp32").model
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["query_key_value"]))
    peft_model.save_pretrained(str(where))
    cfg_file = where / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = base_spec
    cfg_file.write_text(json.dumps(cfg))
    return where


# ------------------------------------------------------------------------------------- A: adapter bases
def test_adapter_identity_holds_its_local_base(tmp_path, base_dir):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    adapter = _adapter(str(base), tmp_path / "adapter")
    before = model_identity(str(adapter))
    assert model_identity(str(adapter)) == before  # stable
    assert before.startswith(_old_model_identity(str(adapter)))  # the adapter's own part, as it was
    _rewrite_same_size(base / "model.safetensors")
    after = model_identity(str(adapter))
    assert after != before
    # the stage that reads the adapter gets another key
    text = (f"name: a\nmodels: {{ad: {adapter}}}\ndatasets:\n  d: {{builtin: enron-synthetic, limit: 4}}\n"
            "evaluate:\n  ppl: {kind: perplexity, targets: [ad], data: d}\n")
    key = Plan(parse_experiment(text)).stages["evaluate/ppl/ad"].key
    _rewrite_same_size(base / "model.safetensors")
    assert Plan(parse_experiment(text)).stages["evaluate/ppl/ad"].key != key


def test_adapter_base_chain_and_cycle(tmp_path, base_dir):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    inner = _adapter(str(base), tmp_path / "inner")
    outer = tmp_path / "outer"
    shutil.copytree(inner, outer)
    cfg = json.loads((outer / "adapter_config.json").read_text())
    (outer / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(inner)}))
    before = model_identity(str(outer))
    _rewrite_same_size(base / "model.safetensors")  # two links down
    assert model_identity(str(outer)) != before
    # a cycle (inner's base is outer, outer's is inner) ends: each dir counted once
    (inner / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(outer)}))
    assert model_identity(str(outer)) == model_identity(str(outer))
    (inner / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(inner)}))
    assert model_identity(str(inner)) == model_identity(str(inner))  # its own base


# ------------------------------------------------------------------------------- B: saved HF datasets
def _rows(n: int, edited: int | None = None) -> dict[str, list[str]]:
    return {"text": [f"row {i} of the dataset" + (" (edited)" if i == edited else "") for i in range(n)]}


def _dataset(rows: dict[str, list[str]]):
    """A dataset whose fingerprint its pipeline set (`map(..., new_fingerprint=...)`, the constructor's
    `fingerprint`): saved again after an edit, its state.json and dataset_info.json are byte for byte the same,
    and only the .arrow files differ."""
    import datasets
    import pyarrow as pa

    return datasets.Dataset(pa.Table.from_pydict(rows), fingerprint="pinned")


def _save(path: Path, rows: dict[str, list[str]], as_dict: bool) -> None:
    import datasets

    ds = datasets.DatasetDict({"train": _dataset(rows), "test": _dataset(_rows(4))}) if as_dict else _dataset(rows)
    ds.save_to_disk(str(path))


def _json_files(d: Path) -> dict[str, bytes]:
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*.json"))}


@pytest.mark.parametrize("as_dict", [False, True], ids=["flat", "dataset_dict"])
def test_saved_dataset_dir_identity_sees_every_file(tmp_path, as_dict):
    d = tmp_path / "hf"
    _save(d, _rows(8), as_dict)
    assert (d / ("dataset_dict.json" if as_dict else "dataset_info.json")).is_file()
    before, json_before = file_identity(d), _json_files(d)
    assert file_identity(d) == before  # stable
    _save(d, _rows(8, edited=3), as_dict)  # one row edited, saved again
    assert _json_files(d) == json_before  # only the .arrow changed
    edited = file_identity(d)
    assert edited != before
    arrow = sorted(d.rglob("*.arrow"))[0]
    _rewrite_same_size(arrow)  # edited in place, mtime restored
    assert file_identity(d) != edited


def test_data_stage_key_follows_a_saved_dataset_dir(tmp_path):
    d = tmp_path / "hf"
    _save(d, _rows(8), as_dict=False)
    text = f"name: f\nmodels: {{base: tiny-gpt-neox}}\ndatasets:\n  d: {{path: {d}, split: {{a: 0.5, b: 0.5}}}}\n"
    first = Plan(parse_experiment(text)).stages["data/d"].key
    assert Plan(parse_experiment(text)).stages["data/d"].key == first
    _save(d, _rows(8, edited=5), as_dict=False)
    assert Plan(parse_experiment(text)).stages["data/d"].key != first


def test_a_data_stage_reruns_after_its_dataset_dir_is_saved_again(tmp_path):
    from leakaudit.experiment import run_experiment

    d = tmp_path / "hf"
    _save(d, _rows(8), as_dict=True)
    text = f"name: f\nmodels: {{base: tiny-gpt-neox}}\ndatasets:\n  d: {{path: {d}}}\n"
    out = tmp_path / "out"
    run = {"log": lambda _msg: None, "report": False}
    assert run_experiment(parse_experiment(text), out, **run)["data/d"] == "ran"
    assert run_experiment(parse_experiment(text), out, **run)["data/d"] == "cached"
    _save(d, _rows(8, edited=2), as_dict=True)
    assert run_experiment(parse_experiment(text), out, **run)["data/d"] == "ran"
    rows = [json.loads(line) for line in (out / "data" / "d" / "all.jsonl").read_text().splitlines()]
    assert any("(edited)" in r["text"] for r in rows)


# ------------------------------------------------------------------------------------- unchanged keys
def test_keys_of_other_specs_are_unchanged(tmp_path, base_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a plain model dir, a tiny-* name, a hub-like name, a missing path, a file
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"text": "one line"}) + "\n")
    for spec in (str(base_dir), "tiny-gpt-neox", "EleutherAI/pythia-70m", str(tmp_path / "missing"), str(data)):
        assert model_identity(spec) == _old_model_identity(spec), spec
    for path in (base_dir, data):
        assert file_identity(path) == _old_file_identity(path)
    # a model dir keeps dir_fingerprint: a fine-tune output's checkpoints and logs do not enter its key
    ft = tmp_path / "ft"
    shutil.copytree(base_dir, ft)
    (ft / "checkpoint-1").mkdir()
    (ft / "checkpoint-1" / "optimizer.pt").write_bytes(b"x")
    (ft / "train_log.jsonl").write_text("{}\n")
    before = file_identity(ft)
    assert before == dir_fingerprint(ft) == model_identity(str(ft)).split("#", 1)[1]
    (ft / "checkpoint-1" / "optimizer.pt").write_bytes(b"y")
    (ft / "train_log.jsonl").write_text("{}\n{}\n")
    assert file_identity(ft) == before
    # an adapter whose base is a name (not a local path): as it was
    named = _adapter("tiny-gpt-neox", tmp_path / "named")
    assert model_identity(str(named)) == _old_model_identity(str(named))
    # a dir of top-level text/json files keeps its old key too (the whole-tree hash has dir_fingerprint's format)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("a")
    (texts / "b.json").write_text("{}")
    assert file_identity(texts) == _old_file_identity(texts)
    # whole plans: every stage's key as the old identities give it
    cfg = f"""\
name: keys
models: {{base: {base_dir}, named: {named}, tiny: tiny-gpt-neox}}
datasets:
  emails: {{builtin: enron-synthetic, limit: 8, split: {{members: 0.5, nonmembers: 0.5}}}}
  local: {{path: {data}}}
  texts: {{path: {texts}}}
finetune:
  real:
    model: base
    data: emails.members
    options: {{epochs: 1, batch_size: 4, max_length: 32}}
evaluate:
  mia:
    kind: mia
    targets: [real, named, tiny]
    reference: base
    members: emails.members
    nonmembers: emails.nonmembers
    options: {{attacks: [loss], n_bootstrap: 20}}
  ppl: {{kind: perplexity, targets: [base, named], data: local}}
  ppl2: {{kind: perplexity, targets: [tiny], data: texts}}
"""
    new = {s.id: s.key for s in Plan(parse_experiment(cfg)).stages.values()}
    import leakaudit.experiment.plan as plan

    monkeypatch.setattr(plan, "model_identity", _old_model_identity)
    monkeypatch.setattr(plan, "file_identity", _old_file_identity)
    assert {s.id: s.key for s in Plan(parse_experiment(cfg)).stages.values()} == new


def test_an_option_naming_a_saved_dataset_folder_enters_the_key(tmp_path):
    """pii-logprob's `pairs:` may be a saved dataset folder; only files entered the key, so a re-saved folder
    left the stage cached with the old pairs. Other folders an option names by chance stay out."""
    from leakaudit.experiment.plan import _names_a_file

    saved = tmp_path / "pairs"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    other = tmp_path / "other"
    other.mkdir()
    assert _names_a_file(str(saved)) and not _names_a_file(str(other)) and not _names_a_file("A")


def test_an_option_naming_a_model_folder_by_chance_stays_out_of_the_key(tmp_path, monkeypatch, base_dir):
    """Only the neighbourhood attack's masked LM is hashed as a model folder: `compare_to: base` names a target,
    and a model folder ./base beside the run (the target's own spec) made the stage hash it, so every such
    stage of an earlier release ran again."""
    from leakaudit.experiment.plan import _names_a_file

    monkeypatch.chdir(tmp_path)
    shutil.copytree(base_dir, tmp_path / "base")
    cfg = ("name: k\nmodels: {base: base, tiny: tiny-opt}\ndatasets:\n  d: {builtin: enron-synthetic, limit: 8, "
           "split: {members: 0.5, nonmembers: 0.5}}\nevaluate:\n  m:\n    kind: mia\n    targets: [base, tiny]\n"
           "    members: d.members\n    nonmembers: d.nonmembers\n    options: {attacks: [loss], compare_to: base}\n")
    for stage in Plan(parse_experiment(cfg)).stages.values():
        assert "files" not in stage.params, (stage.id, stage.params.get("files"))
    assert not _names_a_file("base") and _names_a_file("base", model_folder=True)


def test_each_model_folder_in_a_list_enters_the_key_and_other_lists_stay_out(tmp_path, base_dir):
    """lira's `references` is a list: a file inside a list was not hashed, and an edited reference folder left
    the stage cached. Each local folder in it enters by content, a spec in it (tiny-opt) by name only; a model
    folder in the list of an option that names no model (recall's prefix texts) stays out."""
    refs = [str(shutil.copytree(base_dir, tmp_path / f"r{i}")) for i in range(2)]

    def stage(options: str):
        cfg = ("name: l\nmodels: {t: tiny-gpt-neox}\ndatasets:\n  d: {builtin: enron-synthetic, limit: 8, "
               "split: {members: 0.5, nonmembers: 0.5}}\nevaluate:\n  m:\n    kind: mia\n    targets: [t]\n"
               f"    members: d.members\n    nonmembers: d.nonmembers\n    options: {options}\n")
        return Plan(parse_experiment(cfg, tmp_path / "l.yaml")).stages["evaluate/m/t"]

    lira = f"{{attacks: [lira], attack_options: {{lira: {{references: ['{refs[0]}', '{refs[1]}', tiny-opt]}}}}}}"
    before = stage(lira)
    assert set(before.params["files"]) == {"attack_options.lira.references.0", "attack_options.lira.references.1"}
    assert stage(lira).key == before.key
    _rewrite_same_size(tmp_path / "r1" / "model.safetensors")
    assert stage(lira).key != before.key
    recall = f"{{attacks: [recall], attack_options: {{recall: {{prefix: ['{refs[0]}', 'Some text.']}}}}}}"
    assert "files" not in stage(recall).params
