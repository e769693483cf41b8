"""Offline LiRA (`lira`): its score against one computed by hand from each model's unbatched float64 pass, in
both variance modes; σ = 0; batched = unbatched; too few references; the CLI and experiment routes agree; an
edited reference folder reruns the stage; and on models that could fail it, members score higher."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import run_main, torch_threads
from test_attacks import TEXTS, _seed_instructions, hand

from leakaudit.attacks import ScoringContext, get_attack
from leakaudit.attacks.lira import SIGMA_FLOOR, lira_scores
from leakaudit.attacks.mia import run_mia
from leakaudit.errors import InputError
from leakaudit.models import LoadedModel, load_model

NO_CACHE = {"cache": False, "progress": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def _train(base: LoadedModel, texts: list[str], seed: int, steps: int = 60) -> torch.nn.Module:
    """A copy of `base` fitted to `texts` (batches of 8, AdamW): hard enough that a tiny model memorises them."""
    model = copy.deepcopy(base.model)
    tok = base.tokenizer
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = [texts[i] for i in rng.choice(len(texts), min(8, len(texts)), replace=False)]
        enc = tok(batch, return_tensors="pt", padding=True)
        loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def study(tiny_neox, tmp_path_factory):
    """Members and non-members drawn at random from one pool; a target fitted to the members; three reference
    folders, each fitted to its own texts of the same pool, disjoint from both sets (OUT models)."""
    texts = _seed_instructions(96)
    order = np.random.default_rng(0).permutation(len(texts))
    members, nonmembers = [texts[i] for i in order[:16]], [texts[i] for i in order[16:32]]
    target = LoadedModel(_train(tiny_neox, members, 0), tiny_neox.tokenizer, "tuned", "test-lira-target",
                         tiny_neox.device, tiny_neox.dtype)
    folders = []
    for j in range(3):
        where = tmp_path_factory.mktemp("lira") / f"ref{j}"
        _train(tiny_neox, [texts[i] for i in order[32 + 16 * j:48 + 16 * j]], j + 1).save_pretrained(where)
        tiny_neox.tokenizer.save_pretrained(where)
        folders.append(str(where))
    return target, members, nonmembers, folders


def test_score_by_hand_in_both_variance_modes(tiny_neox, study):
    """(μ - NLL_target) / σ from each model's own unbatched float64 pass: σ per text (ddof 1), or pooled over all
    residuals (ddof = the number of texts). One reference is a spec of another architecture, not a folder."""
    target, _, _, folders = study
    specs = [*folders[:2], "tiny-opt"]
    nll_t = [-hand(target, t)["logp"].mean() for t in TEXTS]
    nll_r = [[-hand(load_model(s, dtype="fp32"), t)["logp"].mean() for t in TEXTS] for s in specs]
    n, m = len(specs), len(TEXTS)
    mu = [sum(nll_r[j][i] for j in range(n)) / n for i in range(m)]
    ss = [sum((nll_r[j][i] - mu[i]) ** 2 for j in range(n)) for i in range(m)]
    pooled = math.sqrt(sum(ss) / (n * m - m))
    want = {"per_text": [(mu[i] - nll_t[i]) / math.sqrt(ss[i] / (n - 1)) for i in range(m)],
            "global": [(mu[i] - nll_t[i]) / pooled for i in range(m)]}
    assert not np.allclose(want["per_text"], want["global"], rtol=1e-2)  # the two modes are told apart
    for variance, expected in want.items():
        ctx = ScoringContext(target, list(TEXTS), score_options=NO_CACHE)
        got = get_attack("lira", references=specs, variance=variance).score(ctx)
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-5), (variance, got, expected)


def test_members_score_higher_against_references_trained_on_other_texts(tiny_neox, study):
    """The sanity check that could fail: a target fitted to the members, references fitted to disjoint texts."""
    target, members, nonmembers, folders = study
    report = run_mia(target, members, nonmembers, ["lira"], n_bootstrap=200,
                     attack_options={"lira": {"references": folders}}, **NO_CACHE)
    lo, _ = report.metrics["lira"].auc_ci
    assert lo > 0.6, report.metrics["lira"]
    assert report.options["lira"] == {"references": folders, "variance": "global"}
    # the control: the model the target was fitted from never saw the members, and lira finds nothing in it
    base = run_mia(tiny_neox, members, nonmembers, ["lira"], n_bootstrap=200,
                   attack_options={"lira": {"references": folders}}, **NO_CACHE)
    lo, hi = base.metrics["lira"].auc_ci
    assert lo < 0.5 < hi, base.metrics["lira"]


def test_batched_and_unbatched_agree(study):
    target, members, nonmembers, folders = study
    runs = [run_mia(target, members[:5], nonmembers[:5], ["lira"], n_bootstrap=0, batch_size=b,
                    attack_options={"lira": {"references": folders, "variance": "per_text"}}, **NO_CACHE)
            for b in (1, 3, "auto")]
    for other in runs[1:]:
        assert np.allclose(runs[0].scores["lira"], other.scores["lira"], rtol=1e-5, atol=1e-5)


def test_sigma_zero_is_floored_not_divided_by():
    """References that agree exactly on a text: σ floored (and counted), the score finite, its sign kept."""
    nll_t = np.array([1.0, 2.0, 3.0])
    refs = np.array([[1.5, 2.0, 2.5], [1.5, 2.4, 2.9]])  # text 0: σ 0 per text
    per_text, floored = lira_scores(nll_t, refs, "per_text")
    assert floored == 1 and np.isfinite(per_text).all()
    assert per_text[0] == pytest.approx(0.5 / SIGMA_FLOOR) and per_text[2] < 0
    same, floored = lira_scores(nll_t, np.array([[1.5, 2.2, 2.7]] * 2), "global")  # σ 0 everywhere
    assert floored == 3 and np.isfinite(same).all() and list(np.argsort(same)) == [2, 1, 0]


def test_a_reference_copied_twice_warns_of_its_floored_sigma(tiny_neox, study, tmp_path, capsys):
    _, _, _, folders = study
    twin = tmp_path / "twin"
    shutil.copytree(folders[0], twin)
    ctx = ScoringContext(tiny_neox, list(TEXTS), score_options=NO_CACHE)
    got = get_attack("lira", references=[folders[0], str(twin)], variance="per_text").score(ctx)
    assert np.isfinite(got).all()
    assert f"lira: the reference models agree exactly on {len(TEXTS)} of {len(TEXTS)} texts" in capsys.readouterr().err


def test_a_reference_that_is_the_target_or_a_copy_of_another_is_said(study, tmp_path, capsys):
    """The target among its own references (its loss in μ and σ), or a copied reference folder (counted twice):
    both scored without a word before."""
    _, _, _, folders = study
    twin = tmp_path / "twin"
    shutil.copytree(folders[1], twin)
    ctx = ScoringContext(load_model(folders[0], dtype="fp32"), list(TEXTS), score_options=NO_CACHE)
    get_attack("lira", references=[folders[0], folders[1], str(twin)]).score(ctx)
    err = capsys.readouterr().err
    assert f"lira: references[0] '{folders[0]}' is the target itself" in err, err
    assert f"lira: references[2] '{twin}' is a copy of references[1] '{folders[1]}'" in err, err
    ctx = ScoringContext(load_model(folders[2], dtype="fp32"), list(TEXTS), score_options=NO_CACHE)
    get_attack("lira", references=folders[:2]).score(ctx)
    assert "lira: references" not in capsys.readouterr().err  # other models: nothing said


def test_a_text_one_token_long_under_a_references_tokenizer_names_that_model(tiny_neox, default_model):
    """'Thanks' is 3 tokens to the tiny models and 1 to the default model's tokenizer: as a reference there it
    said 'has fewer than 2 tokens', false of the text under the target (whose `loss` scored it)."""
    from leakaudit.attacks.mia import TooShortError

    members, nonmembers = ["Give three tips for staying healthy.", "Thanks"], ["Sort these words.", "List fruits."]
    with pytest.raises(TooShortError) as err:
        run_mia(tiny_neox, members, nonmembers, ["loss", "ref"], default_model, n_bootstrap=0, **NO_CACHE)
    assert str(err.value).startswith("members[1] has fewer than 2 tokens under the tokenizer of the reference "
                                     "default (under the target's it has more)"), str(err.value)
    with pytest.raises(TooShortError) as err:
        run_mia(tiny_neox, members, nonmembers, ["lira"], n_bootstrap=0,
                attack_options={"lira": {"references": ["tiny-opt", "default"]}}, **NO_CACHE)
    assert "under the tokenizer of lira's references[1] default" in str(err.value), str(err.value)


def test_too_few_repeated_or_missing_references_are_one_line_naming_the_field(study, tmp_path):
    _, _, _, folders = study
    for references, says in (([], "got 0"), ([folders[0]], "got 1"), ([folders[0], folders[0]], "listed twice"),
                             ([folders[0], str(tmp_path / "missing")], "references[1]")):
        with pytest.raises(InputError) as err:
            get_attack("lira", references=references)
        assert err.value.field == "references" and says in err.value.format(), err.value.format()
        assert "\n" not in err.value.format()
    with pytest.raises(InputError):
        get_attack("lira", references=folders[:2], variance="local")


def test_one_folder_spelt_twice_is_refused_as_a_spec_listed_twice(study, tmp_path, monkeypatch):
    """'ref', 'ref/' and './ref' are one model: listed as two references it counted twice in μ and σ, unsaid."""
    _, _, _, folders = study
    monkeypatch.chdir(folders[0] + "/..")
    name = folders[0].rsplit("/", 1)[1]
    for twice in (folders[0] + "/", f"./{name}", name):
        with pytest.raises(InputError) as err:
            get_attack("lira", references=[folders[0], folders[1], twice])
        said = err.value.format()
        assert err.value.field == "references" and "references[2]" in said and "listed twice" in said, said
    with pytest.raises(InputError, match="listed twice"):  # a tiny model's name and its folder
        from leakaudit.models import resolve_spec

        get_attack("lira", references=["tiny-opt", str(resolve_spec("tiny-opt")[1])])


def test_the_cli_takes_repeated_references_and_refuses_them_without_lira(study, tmp_path, monkeypatch, capsys):
    _, members, nonmembers, folders = study
    m, n = tmp_path / "m.jsonl", tmp_path / "n.jsonl"
    m.write_text("".join(json.dumps({"text": t}) + "\n" for t in members[:4]))
    n.write_text("".join(json.dumps({"text": t}) + "\n" for t in nonmembers[:4]))
    base = ["mia", "--model", "tiny-gpt-neox", "--members", m, "--nonmembers", n, "--n-bootstrap", "0", "--no-cache"]
    code, err = run_main([*base, "--out", tmp_path / "a", "--lira-reference", folders[0]], monkeypatch, capsys)
    assert code == 2 and "field '--lira-reference': no attack that runs takes it" in err, err
    code, err = run_main([*base, "--out", tmp_path / "a", "--attacks", "lira", "--lira-reference", folders[0]],
                         monkeypatch, capsys)
    assert code == 2 and err.startswith("error: field '--lira-reference': ") and "at least 2" in err, err
    assert len(err.strip().splitlines()) == 1
    code, err = run_main([*base, "--out", tmp_path / "b", "--attacks", "loss,lira",
                          *(x for f in folders for x in ("--lira-reference", f))], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "b" / "mia.json").read_text())
    assert res["attacks"]["lira"]["options"] == {"references": folders, "variance": "global"}


def _experiment(references: list[str]) -> str:
    refs = ", ".join(f"'{r}'" for r in references)
    return ("name: l\nmodels: {t: tiny-gpt-neox}\ndatasets:\n  d: {builtin: enron-synthetic, limit: 8, "
            "max_chars: 120, split: {members: 0.5, nonmembers: 0.5}}\nevaluate:\n  m:\n    kind: mia\n"
            "    targets: [t]\n    members: d.members\n    nonmembers: d.nonmembers\n"
            f"    options: {{attacks: [loss, lira], n_bootstrap: 0, attack_options: {{lira: {{references: [{refs}]}}}}}}\n")


def test_the_experiment_and_the_cli_give_the_same_scores(study, tmp_path, monkeypatch, capsys):
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan, run_experiment
    from leakaudit.experiment.checks import check_plan

    _, _, _, folders = study
    with pytest.raises(InputError) as err:
        check_plan(Plan(parse_experiment(_experiment(folders[:1]), tmp_path / "bad.yaml")), (tmp_path / "o", None))
    said = err.value.format()
    assert "bad.yaml:" in said and "attack_options.lira.references" in said and "at least 2" in said, said
    run_experiment(parse_experiment(_experiment(folders), tmp_path / "l.yaml"), tmp_path / "out", log=lambda m: None,
                   report=False)
    stage = tmp_path / "out" / "evaluate" / "m" / "t"
    data = tmp_path / "out" / "data" / "d"
    code, err = run_main(["mia", "--model", "tiny-gpt-neox", "--members", data / "members.jsonl", "--nonmembers",
                          data / "nonmembers.jsonl", "--id-field", "id", "--n-bootstrap", "0", "--attacks",
                          "loss,lira", "--out", tmp_path / "cli", *(x for f in folders for x in ("--lira-reference", f))],
                         monkeypatch, capsys)
    assert code == 0, err
    rows = [{(r["label"], r["id"]): r["lira"] for r in map(json.loads, (d / "scores.jsonl").read_text().splitlines())}
            for d in (stage, tmp_path / "cli")]
    assert len(rows[0]) == 8 and rows[0] == pytest.approx(rows[1], rel=1e-6)


def test_one_reference_is_held_at_a_time(study):
    """Each reference is loaded for its pass and released before the next loads: n models never sit in memory
    together (a weak reference to each must be dead when the next is asked for)."""
    import weakref

    target, _, _, folders = study
    held: list[weakref.ref] = []

    def load(spec: str) -> LoadedModel:
        assert all(r() is None for r in held), "an earlier reference is still in memory"
        lm = load_model(spec, dtype="fp32")
        held.append(weakref.ref(lm.model))
        return lm

    ctx = ScoringContext(target, list(TEXTS), score_options=NO_CACHE, load=load)
    get_attack("lira", references=folders).score(ctx)
    assert len(held) == len(folders) and all(r() is None for r in held)


def test_an_experiment_names_its_own_fine_tunes_and_models_as_references(tmp_path):
    """`references: [ra, base]`: a fine-tune of the same file (its folder, once trained; the stage waits for it and
    reruns when it changes) and a `models:` entry (its spec). A grid of fine-tunes is one error at its line."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan, run_experiment
    from leakaudit.experiment.checks import check_plan

    def study(references: str, learning_rate: float = 0.001, grid: str = "") -> str:
        return ("name: l\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  d: {builtin: enron-synthetic, limit: 24, "
                "max_chars: 120, split: {members: 0.25, nonmembers: 0.25, a: 0.25, b: 0.25}}\nfinetune:\n"
                f"  ra: {{model: base, data: d.a, options: {{epochs: 1, learning_rate: {learning_rate}, batch_size: 4, "
                f"max_length: 48}}{grid}}}\n"
                "evaluate:\n  m:\n    kind: mia\n    targets: [base]\n    members: d.members\n"
                "    nonmembers: d.nonmembers\n"
                f"    options: {{attacks: [lira], n_bootstrap: 0, attack_options: {{lira: {{references: {references}}}}}}}\n")

    plan = Plan(parse_experiment(study("[ra, base]"), tmp_path / "l.yaml"))
    stage = plan.stages["evaluate/m/base"]
    assert "finetune/ra" in stage.deps and stage.params["named_models"]["attack_options.lira.references.0"] == {
        "stage": "finetune/ra"}
    check_plan(plan, (tmp_path / "out", None))
    other = Plan(parse_experiment(study("[ra, base]", learning_rate=0.002), tmp_path / "l.yaml"))
    assert other.stages["evaluate/m/base"].key != stage.key  # a reference trained otherwise reruns the attack
    with pytest.raises(InputError) as err:
        Plan(parse_experiment(study("[ra, base]", grid=", grid: {learning_rate: [0.001, 0.002]}"), tmp_path / "g.yaml"))
    assert "g.yaml:" in err.value.format() and "a grid of 2 variants" in err.value.format(), err.value.format()
    run_experiment(parse_experiment(study("[ra, base]"), tmp_path / "l.yaml"), tmp_path / "out", log=lambda m: None,
                   report=False)
    res = json.loads((tmp_path / "out" / "evaluate" / "m" / "base" / "mia.json").read_text())
    ra = json.loads((tmp_path / "out" / "run.json").read_text())
    model_dir = next(s["result"]["model_dir"] for s in ra["stages"] if s["id"] == "finetune/ra")
    assert res["attacks"]["lira"]["options"]["references"] == [
        str(tmp_path / "out" / "finetune" / "ra" / model_dir), "tiny-gpt-neox"]
