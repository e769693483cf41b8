"""The reference docs list what the code accepts: every evaluation kind and each of its options in
docs/experiments.md, every attack in docs/attacks.md's definitions table (a new option or attack without its
line there fails here, instead of drifting); every flag the README and docs give a command is one it takes;
and mia.json's and user_inference.json's documented fields name every field the code writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import leakaudit.attacks  # noqa: F401  (fills the attack registry)
import leakaudit.kinds  # noqa: F401  (fills the kind registry)
from leakaudit.attacks.base import ATTACKS
from leakaudit.kinds.registry import get_kind, kind_names

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _table_row(text: str, first_cell: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, f"no table row starting with {first_cell}"
    return rows[0]


@pytest.mark.parametrize("name", kind_names("evaluate"))
def test_every_evaluation_kind_and_option_is_in_the_experiments_doc(name):
    text = (DOCS / "experiments.md").read_text()
    kinds_row = _table_row(text, "`evaluate`")
    assert f"`{name}`" in kinds_row
    options_row = _table_row(text, f"`{name}`")
    documented = set(re.findall(r"`([a-z_]+)`", options_row))
    missing = sorted(set(get_kind(name).Options.model_fields) - documented)
    assert not missing, f"docs/experiments.md's `{name}` row does not name {missing}"


def test_every_attack_has_a_definition_row():
    text = (DOCS / "attacks.md").read_text()
    for name in ATTACKS:
        _table_row(text, f"`{name}`")


# ----------------------------------------------------------------------------------------- command-line flags
def _commands():
    from typer.main import get_command

    from leakaudit.cli import app

    return get_command(app)


def _flags(command) -> set[str]:
    return {o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}


def _resolve(root, words: list[str]):
    """The command `words` name (a group's subcommand too) and how many words it took; (None, 0) if none."""
    command, used = root, 0
    for word in words[:2]:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        command, used = sub, used + 1
    return (command, used) if used and not hasattr(command, "commands") else (None, 0)


def _documented_flags():
    """(file, line, command words, flag) for every `--flag` the README and docs give a leakaudit command: on a
    `leakaudit CMD ...` command line (backslash continuations joined), and in prose under a heading that names
    `leakaudit CMD` (its option lists)."""
    root = _commands()
    for path in [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        section = None
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            if line.startswith("#"):
                m = re.search(r"`leakaudit ([a-z-]+(?: [a-z-]+)?)`", line)
                section = _resolve(root, m.group(1).split()) if m else None
                section = (m.group(1).split()[:section[1]], section[0]) if section and section[0] else None
            else:
                for m in re.finditer(r"leakaudit ((?:[a-z][a-z-]* ?){1,2})([^`|#\n]*)", line):
                    words = m.group(1).split()
                    command, used = _resolve(root, words)
                    if command is None:
                        continue
                    rest = " ".join(words[used:]) + " " + m.group(2)
                    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                        yield path.name, start + 1, words[:used], command, flag
                if section:
                    for flag in re.findall(r"`(--[a-z][a-z0-9-]*)", line):
                        yield path.name, start + 1, section[0], section[1], flag
            i += 1


def test_documented_flags_exist_on_their_command():
    """A flag the docs give a command is one that command takes: a renamed or misplaced flag in a doc is a
    failed command for whoever copies it."""
    seen, wrong = 0, []
    for name, line, words, command, flag in _documented_flags():
        seen += 1
        if flag not in _flags(command) | {"--help"}:
            wrong.append(f"{name}:{line}: leakaudit {' '.join(words)} has no {flag}")
    assert seen > 100  # the scan found the docs' command lines
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------------------- output fields
def _roc():
    from leakaudit.metrics import roc_metrics

    return roc_metrics([0.9, 0.8, 0.3, 0.2, 0.7, 0.1], [1, 1, 0, 0, 1, 0], n_bootstrap=20)


def test_mia_json_fields_are_documented():
    import numpy as np

    from leakaudit.attacks.mia import MiaReport

    text = (DOCS / "attacks.md").read_text(encoding="utf-8")
    row = _table_row(text, "`mia.json`")
    documented = set(re.findall(r"\"([a-z_]+)\"", row))
    roc = _roc()
    report = MiaReport(metrics={"loss": roc}, scores={}, labels=np.array([]), member_index=[], nonmember_index=[])
    # what the mia kind adds beside the report (leakaudit/kinds/mia.py)
    written = set(roc.to_json()) | set(report.to_json()) | {"target", "reference", "members", "nonmembers", "seed",
                                                            "scores_file"}
    assert not written - documented, f"mia.json fields not in docs/attacks.md: {sorted(written - documented)}"


def test_user_inference_json_fields_are_documented():
    from leakaudit.attacks.user_inference import UserInferenceReport

    report = UserInferenceReport(per_m={"1": _roc()}, users=[], labels={}, n_samples={}, user_scores={})
    text = (DOCS / "attacks.md").read_text(encoding="utf-8")
    part = text[text.index("Writes `user_inference.json`"):]
    documented = set(re.findall(r"`([a-z_]+)`", part[:part.index("`user_scores.jsonl`")]))
    missing = sorted(set(report.to_json()) - documented)
    assert not missing, f"user_inference.json fields not in docs/attacks.md: {missing}"


def test_study_3_power_paragraph_gives_its_tables_half_widths():
    """docs/studies.md tells what study 3's users can detect from the half-widths h of its paired Δ AUC
    intervals; it said 0.02–0.19 where its own table's intervals run from 0.015 (clipping, seed 1) to 0.200
    (DP-SGD, seed 2). The range now comes from the table, checked here."""
    section = (DOCS / "studies.md").read_text().split("## Study 3")[1].split("## Study 2")[0]
    table = section.split("Paired difference in user AUC")[1].split("Over the three seeds")[0]
    halves = [(float(hi) - float(lo)) / 2 for lo, hi in re.findall(r"\[(-?\d\.\d+), (-?\d\.\d+)\]", table)]
    stated = re.search(r"half-widths h of (\d\.\d+)–(\d\.\d+)", section)
    assert len(halves) == 18 and stated is not None
    assert (float(stated[1]), float(stated[2])) == (round(min(halves), 3), round(max(halves), 3))


def test_every_model_spec_list_in_help_names_random_specs():
    """A `--model` help that lists the spec forms lists `random:` too (README "Model specs"): the lists named
    default, HF ids, dirs, adapters, .gguf and tiny-* but not the random: specs added beside them."""
    def walk(command, words):
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*words, name])
        if not hasattr(command, "commands"):
            for p in command.params:
                if "--model" in getattr(p, "opts", ()) and ".gguf" in (p.help or ""):
                    yield " ".join(words), p.help

    listed = list(walk(_commands(), []))
    assert len(listed) >= 10  # score, model-info, finetune, pii, pii-logprob, generate, backdoor
    stale = [f"{words}: {text}" for words, text in listed if "random:" not in text]
    assert not stale, "\n".join(stale)


def test_readme_names_every_command_a_launch_runs_on_rank_0_alone():
    """README's "Scaling out" lists the commands rank 0 runs alone under a launcher; `seeds` was left out."""
    from leakaudit.cli import ONE_PROCESS

    text = (DOCS.parent / "README.md").read_text()
    section = text[text.index("## Scaling out"):]
    section = " ".join(section[:section.index("\n## ")].split())
    for command in ONE_PROCESS:
        first, _, sub = command.partition(" ")
        named = f"`{command}`" in section or (sub and re.search(rf"`{first} [a-z|]*\b{sub}\b[a-z|]*`", section))
        assert named, f"README's Scaling out does not name `{command}` among the commands rank 0 runs alone"
