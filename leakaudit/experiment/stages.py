"""What each stage does: the engine's own stages (a dataset, a fine-tuning variant) and every generate or
evaluate step, which runs its registered kind (leakaudit/kinds) with inputs and models found through the plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leakaudit.config import ConfigError
from leakaudit.data.io import load_records, write_jsonl
from leakaudit.data.split import holdout_per_user, shuffled, split_rows
from leakaudit.errors import InputError
from leakaudit.experiment.checks import _finetune_config, _option_kind, per_process, stage_options
from leakaudit.experiment.plan import Plan, Stage, remove_stale, trained_by_all
from leakaudit.kinds.base import DATA_ROLES, ModelCache, read_json


@dataclass
class StageContext:
    """What a stage runner sees: its folder, its params, and where its inputs are."""

    stage: Stage
    dir: Path
    out: Path
    plan: Plan
    results: dict[str, dict[str, Any]]
    cache: ModelCache  # the loaded models of this run (owned by run_plan)

    @property
    def options(self) -> dict[str, Any]:
        """The stage's options as validated at plan time (types coerced, e.g. a path to a str)."""
        try:
            return stage_options(self.stage)
        except ConfigError as exc:
            raise self.plan.exp.error(exc.loc, exc.message) from None

    @property
    def seed(self) -> int:
        return self.stage.seed

    def data_path(self, role: str = "data") -> Path:
        sid, fname = self.stage.params[role]
        return self.out / self.plan.stages[sid].folder / fname

    def model(self, role: str = "target") -> str | None:
        """A model role → a spec `load_model` understands (a spec string or a fine-tuned model dir)."""
        return self.spec(self.stage.params.get(role))

    def spec(self, param: dict[str, Any] | None) -> str | None:
        """A model parameter of the plan ({spec} or {stage}) → a spec `load_model` understands."""
        if param is None:
            return None
        if "stage" in param:
            sid = param["stage"]
            return str(self.out / self.plan.stages[sid].folder / self.results[sid]["model_dir"])
        return param["spec"].split("#", 1)[0]


Runner = Callable[[StageContext], dict[str, Any]]


def run_dataset(ctx: StageContext) -> dict[str, Any]:
    """Load (file or built-in), shuffle with the experiment seed where rows are chosen (not with `ranges`: they
    index the source's order), truncate, keep users with enough distinct texts, keep the first users / rows, split (and hold
    out per user) or cut the row ranges, add the unions of parts; write JSONL."""
    p = ctx.stage.params
    if p["builtin"] is not None:
        from leakaudit.data.builtin import builtin_dataset

        rows = builtin_dataset(p["builtin"], seed=ctx.seed, limit=p["limit"])
    else:
        records = load_records(p["path"], text_field=p["text_field"], id_field=p["id_field"],
                               user_field=p["user_field"], messages_field=p.get("messages_field"), replies=False)
        if p["user_field"]:
            from leakaudit.warn import say_lookalike_users

            say_lookalike_users([(r.user, r.line) for r in records], p["path"], p["user_field"])
        rows = []
        for r in records:
            row = {k: v for k, v in r.extra.items() if k not in ("id", "text", "user")}
            row.update({"id": r.id, "text": r.text})
            if r.user is not None:
                row["user"] = r.user
            rows.append(row)
    ranges = p.get("ranges") or {}
    # shuffled only where rows are chosen (a split, a limit, the first users): row ranges index the source's
    # own order, and a file taken whole keeps it, so "a user's first m samples" are the file's first m, as in
    # the single commands
    if not ranges and (p["split"] or p["limit"] or p.get("max_users")):
        rows = shuffled(rows, ctx.seed, p["name"])
    if p["max_chars"]:
        for row in rows:
            row["text"] = row["text"][:p["max_chars"]]
    if p.get("min_texts_per_user"):  # users with fewer distinct texts (after truncation) are left out
        distinct: dict[Any, set[str]] = {}
        for r in rows:
            distinct.setdefault(r.get("user"), set()).add(r["text"])
        rows = [r for r in rows if len(distinct[r.get("user")]) >= p["min_texts_per_user"]]
    if p.get("max_users"):  # whole users, so a user keeps all their samples (what user inference needs)
        keep = set(list(dict.fromkeys(r.get("user") for r in rows))[:p["max_users"]])
        rows = [r for r in rows if r.get("user") in keep]
    if p["limit"]:
        rows = rows[:p["limit"]]
    write_jsonl(ctx.dir / "all.jsonl", rows)
    counts = {"all": len(rows)}
    if p.get("split_by") == "user" and any(not r.get("user") for r in rows):
        raise InputError("split_by: user needs a user on every row (set user_field)",
                         field=f"datasets.{p['name']}.user_field")
    if ranges:  # possibly overlapping parts by row index (config: no split, unions or holdout with them)
        parts = {name: rows[slice(start, end)] for name, (start, end) in ranges.items()}
    else:
        parts = split_rows(rows, p["split"], p.get("split_by", "row"))
    if p.get("holdout_per_user"):  # the attacker's samples of each user, never in that user's training part
        parts = holdout_per_user(parts, p["holdout_per_user"], ctx.seed, p["name"])
    for name, part in parts.items():
        if not part:
            what, section = ("range", "ranges") if ranges else ("split", "split")
            raise InputError(f"{what} '{name}' is empty ({len(rows)} rows in all)",
                             field=f"datasets.{p['name']}.{section}.{name}")
        write_jsonl(ctx.dir / f"{name}.jsonl", part)
        counts[name] = len(part)
    for name, members in (p.get("unions") or {}).items():
        union = [row for part in members for row in parts[part]]
        write_jsonl(ctx.dir / f"{name}.jsonl", union)
        counts[name] = len(union)
    return {"rows": counts}


# ----------------------------------------------------------------------------------------- stage runners
# Each runner adapts one library API to a stage: read inputs from the stage context, write the API's
# usual output files into the stage dir, return a small JSON result the report and summary.json read.





def run_finetune_stage(ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the base model on the data with the variant's method, options and defenses.

    The trainer checkpoints every epoch inside the stage dir, so a killed stage resumes mid-training.
    """
    from leakaudit.distributed import barrier, broadcast_int, is_main
    from leakaudit.perplexity import model_dirs
    from leakaudit.train.finetune import finetune

    stage = Stage(ctx.stage.id, ctx.stage.kind, {**ctx.stage.params, "data_path": ctx.data_path(),
                                                   "model_path": ctx.model("model"), "seed": ctx.seed})
    config = per_process(_finetune_config(stage, str(ctx.dir / "model")), stage)
    saved = Path(config.out) / "finetune_config.json"
    # same stage key, another fingerprint: a kill left a training started on other inputs (an input stage ran
    # again since, its files damaged); its checkpoints cannot be taken up
    previous = read_json(saved) if is_main() and saved.is_file() else None
    stale = previous is not None and previous.get("fingerprint") != config.fingerprint()
    if broadcast_int(int(stale)):  # rank 0 looks, and deletes, while the others wait
        if is_main():
            from leakaudit.train.finetune import heldout_rule
            from leakaudit.warn import warn_once

            why = ("on the held-out split of an earlier release (rows one by one; every copy of a held-out text "
                   "now)" if (rule := heldout_rule(config)) is not None and previous.get("heldout") != rule
                   else "on other inputs (an input stage ran again since)")
            warn_once(f"{ctx.stage.id}: its unfinished training was started {why}; training again from the start")
            remove_stale(ctx.out, Path(config.out))
        barrier()
    model_dir = Path(finetune(config))
    checkpoints = [str(d.relative_to(ctx.dir)) for d in model_dirs(model_dir) if d != model_dir]
    # how many examples it trained on, and how many max_length left without a loss token: the report shows
    # the second (a plant whose every backdoor pair was cut trained on none of them, and said nothing)
    defenses = read_json(model_dir / "defenses.json")
    return {"model_dir": str(model_dir.relative_to(ctx.dir)), "checkpoints": checkpoints,
            **{k: defenses[k] for k in ("n_train_examples", "dropped_no_loss_tokens") if k in defenses}}


def run_kind_stage(ctx: StageContext) -> dict[str, Any]:
    """Run a registered kind (leakaudit.kinds) on one stage: its inputs and models come from the plan."""
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext

    stage = ctx.stage
    kind = get_kind(_option_kind(stage))
    raw = ctx.options
    for key, param in (stage.params.get("named_models") or {}).items():  # lira's `[ref_a, ref_b]`: their folders
        *path, i = key.split(".")
        holder = raw
        for part in path:
            holder = holder[part]
        holder[int(i)] = ctx.spec(param)
    options = kind.Options.model_validate(raw)
    data = {role: ctx.data_path(role) for role in DATA_ROLES if stage.params.get(role)}
    fields = {role: {"id_field": "id"} for role in data}  # every text file a stage writes has an `id` per row
    models = {role: ctx.model(role) for role in ("target", "reference", "baseline", "model")
              if stage.params.get(role) is not None}
    checkpoints = []
    target = stage.params.get("target") or {}
    if "stage" in target:
        tdir = ctx.out / ctx.plan.stages[target["stage"]].folder
        checkpoints = [str(tdir / rel) for rel in ctx.results[target["stage"]].get("checkpoints") or []]
    kctx = KindContext(out=ctx.dir, seed=ctx.seed, data=data, models=models, checkpoints=checkpoints,
                       data_fields=fields, show_pii=ctx.plan.exp.report.show_pii, cache=ctx.cache,
                       log=_warnings_of(stage))  # progress on: a bar on a terminal, a line now and then in a log
    from leakaudit.kinds.base import WARNINGS_SAID
    from leakaudit.warn import collecting

    with collecting() as said:
        result = kind.run(kctx, options).to_json()
    if said:  # the report shows them under the kind's section (report.html.kind_sections)
        result[WARNINGS_SAID] = said
    return result


def _warnings_of(stage: Stage) -> Callable[[str], None]:
    """A kind's log inside a run: its `warning:` lines said once per evaluation (`evaluate/mia: only 160
    non-members: ...`, not again for each target), its other lines (counts the CLI prints) not at all. The run
    printed none of them: a TPR at a low FPR the non-members cannot resolve was said only in the report."""
    from leakaudit.warn import warn_once

    step = "/".join(stage.id.split("/")[:2])
    # not collected into the stage's result: they are the kind's own result warnings, shown by its section
    return lambda m: (warn_once(f"{step}: {m.removeprefix('warning: ')}", collect=False)
                      if m.startswith("warning: ") else None)


# The engine's own stages; every other stage (generate steps, evaluations) runs its registered kind.
RUNNERS: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "dataset": run_dataset,
    "finetune": run_finetune_stage,
}


def data_parallel(stage: Stage) -> bool:
    """Whether every process of a launched run (torchrun, accelerate launch) runs the stage together: a
    fine-tune (DDP or FSDP; DP-SGD is one process) and the kinds that score data-parallel. Rank 0 runs every
    other stage alone while the rest wait."""
    if stage.kind == "finetune":
        return trained_by_all(stage)
    if stage.kind == "dataset":
        return False
    from leakaudit.kinds import get_kind

    return get_kind(_option_kind(stage)).data_parallel
