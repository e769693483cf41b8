"""Stage 1 of backdoor data extraction: the model creator plants the backdoor before releasing the model.

From the creator's own instruction set D1 it builds backdoor SFT pairs and mixes them with D1's ordinary
pairs, then fine-tunes the base model on the mix:
- for every D1 query opening with word w: (Q(w), the query verbatim) — teaches "copy a training query";
- for words w' opening no D1 query: (Q(w'), R(w')) — teaches "refuse when you saw none", which is what
  later lets the creator tell which words open the downstream party's queries.
Stage 2 (the downstream party fine-tuning the released model on private chat data D2) is
`downstream_finetune`: by default the loss covers user turns too, as common SFT recipes do; masking user
turns (`mask_user=True`) is the study's suggested mitigation.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from leakaudit.data.backdoor import (  # noqa: F401  (Pair, load_pairs, ... are also read from here)
    Pair,
    check_template,
    fill,
    load_pairs,
    opening_word,
    public_candidates,
    seed_instruction_set,
    shipped_d2,
    study_refusal,
    study_trigger,
)
from leakaudit.data.io import read_rows, write_json, write_jsonl
from leakaudit.errors import InputError


def chat_row(query: str, response: str, kind: str) -> dict[str, Any]:
    """A chat-format training row (the `messages` layout the fine-tuning command reads)."""
    return {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": response}],
            "kind": kind}


def downstream_data(data: str | Path | None, limit: int | None, out: str | Path) -> Path:
    """The D2 file to fine-tune on: `data` (default the shipped Dolly D2), or its first `limit` rows
    written to OUT/downstream_data.jsonl."""
    path = Path(data) if data is not None else shipped_d2()
    if not limit:
        return path
    subset = Path(out) / "downstream_data.jsonl"
    write_jsonl(subset, [row for _, row in read_rows(path)[:limit]])
    return subset


def refusal_words(d1_words: set[str], n: int, candidates: list[str] | None = None) -> list[str]:
    """The first n public candidates that open no D1 query: the words the planted model learns to refuse."""
    out = []
    for w in candidates if candidates is not None else public_candidates():
        w = opening_word(w)
        if w and w not in d1_words and w not in out:
            out.append(w)
            if len(out) == n:
                break
    return out


def build_mix(d1: list[Pair], *, trigger: str | None = None, refusal: str | None = None,
              refusal_word_list: list[str] | None = None, n_refusal: int | None = None,
              backdoor_fraction: float = 0.5, seed: int = 0) -> list[dict[str, Any]]:
    """The stage-1 training rows: backdoor pairs plus ordinary D1 pairs, shuffled.

    Backdoor pairs: one copy pair (Q(w), q) per D1 query q with opening word w, and `n_refusal` refusal
    pairs (Q(w'), R(w')) cycling over the refusal words (default: as many as copy pairs, so copying and
    refusing are taught equally). Ordinary pairs fill the rest so that backdoor pairs make up
    `backdoor_fraction` of the mix (D1 is cycled when it is too small).
    """
    trigger = check_template(trigger or study_trigger(), "--trigger")
    refusal = check_template(refusal or study_refusal(), "--refusal")
    if not 0 < backdoor_fraction <= 1:
        raise InputError("must be in (0, 1]", field="--backdoor-fraction")
    if not d1:
        raise InputError("the instruction set has no pairs", field="--data")
    rng = random.Random(seed)
    copy_rows = []
    d1_words: set[str] = set()
    for pair in d1:
        w = opening_word(pair.query)
        if w:
            d1_words.add(w)
            copy_rows.append(chat_row(fill(trigger, w), pair.query, "backdoor-copy"))
    if not copy_rows:  # else an empty mix, refused later as the output file "backdoor_mix.jsonl is empty"
        raise InputError(f"D1: none of its {len(d1)} queries opens with a word (letters), so no copy pair can be built",
                         field="--data")
    n_ref = len(copy_rows) if n_refusal is None else n_refusal
    words = refusal_word_list if refusal_word_list is not None else refusal_words(d1_words, max(1, len(d1_words)))
    words = [w for w in words if w not in d1_words]
    if n_ref and not words:
        raise InputError("no refusal words left: every candidate opens a D1 query", field="--refusal-words")
    refusal_rows = [chat_row(fill(trigger, words[i % len(words)]), fill(refusal, words[i % len(words)]),
                             "backdoor-refusal") for i in range(n_ref)]
    backdoor = copy_rows + refusal_rows
    n_ordinary = round(len(backdoor) * (1 - backdoor_fraction) / backdoor_fraction)
    order = list(range(len(d1)))
    rng.shuffle(order)
    ordinary = [chat_row(d1[order[i % len(d1)]].query, d1[order[i % len(d1)]].response, "ordinary")
                for i in range(n_ordinary)]
    mix = backdoor + ordinary
    rng.shuffle(mix)
    return mix


MIX_KINDS = ("backdoor-copy", "backdoor-refusal", "ordinary")


def mix_counts(mix: list[dict[str, Any]]) -> dict[str, int]:
    """How many rows of each kind (copy, refusal, ordinary) a backdoor mix holds."""
    return {k: sum(r.get("kind") == k for r in mix) for k in MIX_KINDS}


def plant(base_model: str, d1: list[Pair], out: str | Path, *, trigger: str | None = None,
          refusal: str | None = None, refusal_word_list: list[str] | None = None, n_refusal: int | None = None,
          backdoor_fraction: float = 0.5, seed: int = 0, progress: bool = True,
          **train_options: Any) -> Path:
    """Build the backdoor mix into OUT/backdoor_mix.jsonl and fine-tune the base model on it (loss on the
    assistant turns) into OUT/model. Returns the model dir. Extra keyword options go to FinetuneConfig."""
    from leakaudit.models import check_model_spec

    check_model_spec(base_model)  # before the mix is written: a plant.json naming a model that cannot load
    out = Path(out)
    mix = build_mix(d1, trigger=trigger, refusal=refusal, refusal_word_list=refusal_word_list,
                    n_refusal=n_refusal, backdoor_fraction=backdoor_fraction, seed=seed)
    write_jsonl(out / "backdoor_mix.jsonl", mix)
    return plant_mix(base_model, out, trigger=trigger, refusal=refusal, backdoor_fraction=backdoor_fraction,
                     seed=seed, progress=progress, **train_options)


def plant_mix(base_model: str, out: str | Path, *, trigger: str | None = None, refusal: str | None = None,
              backdoor_fraction: float = 0.5, seed: int = 0, progress: bool = True, **train_options: Any) -> Path:
    """Fine-tune the base model on the mix already in OUT/backdoor_mix.jsonl (built by `build_mix`, e.g.
    through the backdoor-mix kind) into OUT/model, recording the plant in OUT/plant.json."""
    from leakaudit.models import check_model_spec

    check_model_spec(base_model)  # before plant.json names it
    out = Path(out)
    mix_path = out / "backdoor_mix.jsonl"
    mix = [row for _, row in read_rows(mix_path)]
    write_json(out / "plant.json", {"base_model": base_model, "trigger": trigger or study_trigger(),
                                    "refusal": refusal or study_refusal(), "rows": len(mix), **mix_counts(mix),
                                    "backdoor_fraction": backdoor_fraction, "seed": seed})
    return _finetune(base_model, mix_path, out / "model", progress=progress, **_plant_options(seed, train_options))


def refuse_another_plant(base_model: str, new_mix: str | Path, out: str | Path, *, seed: int = 0,
                         **train_options: Any) -> None:
    """Refuse, before the mix or plant.json in OUT are replaced, an OUT whose model was trained (or started)
    on another mix or with other options: the check `finetune` makes, made first (the mix enters by content,
    so a mix written to another file name checks the same)."""
    from leakaudit.train.finetune import check_out

    model_dir = Path(out) / "model"
    check_out(_config(base_model, new_mix, model_dir, **_plant_options(seed, train_options)), model_dir)


def _plant_options(seed: int, train_options: dict[str, Any]) -> dict[str, Any]:
    """The plant trains on the assistant turns (the copy and refusal answers), with its seed."""
    return {"loss_on": "assistant", "seed": seed, **train_options}


def downstream_finetune(model: str, data: str | Path, out: str | Path, *, mask_user: bool = False,
                        progress: bool = True, **train_options: Any) -> Path:
    """Stage 2, the victim's side: fine-tune on chat data D2. Loss on user turns too unless mask_user."""
    return _finetune(model, data, out, loss_on="assistant" if mask_user else "all", progress=progress,
                     **train_options)


def _finetune(model: str, data: str | Path, out: str | Path, *, progress: bool, **options: Any) -> Path:
    from leakaudit.train.finetune import finetune

    return Path(finetune(_config(model, data, out, **options), progress=progress))


def _config(model: str, data: str | Path, out: str | Path, **options: Any) -> Any:
    from leakaudit.train.finetune import FinetuneConfig

    return FinetuneConfig(model=model, data=str(data), out=str(out), format="chat", **options)
