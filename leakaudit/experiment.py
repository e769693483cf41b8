"""Run an experiment file as a graph of stages, each cached by a hash of its inputs.

Why: a study is hours of data generation, fine-tuning and attacks. A stage's key hashes its kind,
its options, its input files' contents and the keys of the stages it reads from, so
  - a rerun after a kill skips every finished stage (and a half-finished stage resumes from its own
    checkpoints: its folder is kept while its key is unchanged);
  - an edited option changes that stage's key and therefore the keys of everything downstream of it,
    and nothing else reruns.
A stage is finished when `<stage dir>/stage.json` (written atomically, last) holds its key.

Layout under the output dir: `data/<name>/`, `generate/<name>/`, `finetune/<variant>/`,
`evaluate/<evaluation variant>/<target>/`, plus `run.json` (the plan and every stage's result),
`summary.json` and `report.html`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from leakaudit.config import ConfigError, Experiment, expand_grid, pydantic_message
from leakaudit.data.io import load_records, write_json, write_jsonl
from leakaudit.errors import InputError, OptionError
from leakaudit.kinds.base import ModelCache

STAGE_VERSION = 1


@dataclass
class Stage:
    """One unit of cached work."""

    id: str
    kind: str
    params: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    key: str = ""
    # Not hashed: where the stage comes from in the file (section, name) and its grid overrides, for errors.
    origin: tuple[str, str] = ("", "")
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return "/".join(_slug(p) for p in self.id.split("/"))


def _slug(part: str) -> str:
    """A file-system-safe folder name for a stage id part (grid labels contain brackets, commas...);
    never '.' or '..' (a grid value like 'a/..' splits into such parts)."""
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", part).strip("_")
    return slug if slug.strip(".") else "_"


def stage_dir(out: Path, stage: Stage) -> Path:
    """The stage's folder under `out`; refuses one that would resolve outside it (a symlink, a bad name)."""
    return inside(out, out / stage.folder)


def inside(out: Path, path: Path) -> Path:
    """`path` itself when it resolves strictly inside `out`; else an InputError (nothing is written or deleted)."""
    root, real = Path(out).resolve(), Path(path).resolve()
    if real == root or not real.is_relative_to(root):
        raise InputError(f"resolves to {real}, outside the output dir {root}; refusing to write or delete it",
                         file=path, field="--out")
    return path


def remove_stale(out: Path, path: Path) -> None:
    """Delete the outputs of an older version of a stage: the one place the engine deletes a folder, and
    only ever one inside `out`."""
    inside(out, path)
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path: str | Path) -> str:
    """Content hash of an input file or model dir, so an edited file reruns what reads it."""
    from leakaudit.models import dir_fingerprint, file_sha256

    p = Path(path)
    if p.is_dir():
        return dir_fingerprint(p)
    return file_sha256(p)


def model_identity(spec: str) -> str:
    """A model spec as it enters a key: local files by content, names (default, tiny-*, HF ids) as is."""
    p = Path(spec).expanduser()
    return f"{spec}#{file_identity(p)}" if p.exists() else spec


# ----------------------------------------------------------------------------------------- planning
class Plan:
    """The stages of an experiment in run order, with reference resolution."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.stages: dict[str, Stage] = {}
        self.finetune_variants: dict[str, list[str]] = {}
        self._build()

    # references ---------------------------------------------------------------------------
    def data_stage(self, ref: str) -> tuple[str, str]:
        """A data reference → (stage id, file name inside the stage dir)."""
        if ref in self.exp.generate:
            return f"generate/{ref}", "data.jsonl"
        name, _, split = ref.partition(".")
        return f"data/{name}", f"{split or 'all'}.jsonl"

    def model_refs(self, ref: str) -> list[tuple[str, str | None]]:
        """A model reference → [(label, finetune stage id or None for a plain spec)]."""
        if ref in self.exp.models:
            return [(ref, None)]
        return [(sid.split("/", 1)[1], sid) for sid in self.finetune_variants[ref]]

    def _model_param(self, ref: str | None) -> tuple[Any, list[str]]:
        if ref is None:
            return None, []
        if ref in self.exp.models:
            return {"spec": model_identity(self.exp.models[ref])}, []
        sids = self.finetune_variants[ref]
        if len(sids) != 1:
            raise InputError(f"'{ref}' is a grid of {len(sids)} variants; name one model here", field=ref)
        return {"stage": sids[0]}, [sids[0]]

    def _add(self, stage: Stage) -> None:
        payload = {"v": STAGE_VERSION, "kind": stage.kind, "params": stage.params, "seed": self.exp.seed,
                   "deps": {d: self.stages[d].key for d in stage.deps}}
        stage.key = _hash(payload)[:24]
        self.stages[stage.id] = stage

    # building -----------------------------------------------------------------------------
    def _build(self) -> None:
        exp = self.exp
        for name, ds in exp.datasets.items():
            params = ds.model_dump()
            if ds.path is not None:
                p = Path(ds.path).expanduser()
                if not p.exists():
                    raise InputError("data file not found", file=p, field=f"datasets.{name}.path")
                params["content"] = file_identity(p)
            params["name"] = name
            self._add(Stage(f"data/{name}", "dataset", params, origin=("datasets", name)))
        for name in _generate_order(exp):
            g = exp.generate[name]
            params: dict[str, Any] = {"kind": g.kind, "options": g.options}
            deps: list[str] = []
            if g.data:
                sid, fname = self.data_stage(g.data)
                params["data"] = [sid, fname]
                deps.append(sid)
            model, mdeps = self._model_param(g.model)
            params["model"] = model
            self._add(Stage(f"generate/{name}", "generate", params, deps + mdeps, origin=("generate", name)))
        for name, f in exp.finetune.items():
            self.finetune_variants[name] = []
            for label, overrides in expand_grid(name, f.grid):
                options = {**f.options, **{k: v for k, v in overrides.items() if k not in ("method", "model")}}
                sid, fname = self.data_stage(f.data)
                model, mdeps = self._model_param(overrides.get("model", f.model))  # a base or a tuned model
                params = {"model": model, "method": overrides.get("method", f.method), "options": options,
                          "defenses": f.defenses, "data": [sid, fname]}
                stage = Stage(f"finetune/{label}", "finetune", params, [sid, *mdeps], origin=("finetune", name),
                              overrides=overrides)
                self._add(stage)
                self.finetune_variants[name].append(stage.id)
        for name, e in exp.evaluate.items():
            for label, overrides in expand_grid(name, e.grid):
                options = {**e.options, **overrides}
                common: dict[str, Any] = {"options": options}
                deps: list[str] = []
                for role in ("members", "nonmembers", "data"):
                    ref = getattr(e, role)
                    if ref is not None:
                        sid, fname = self.data_stage(ref)
                        common[role] = [sid, fname]
                        deps.append(sid)
                for role in ("reference", "baseline"):
                    model, mdeps = self._model_param(getattr(e, role))
                    common[role] = model
                    deps += mdeps
                for target in e.targets:
                    for tlabel, tsid in self.model_refs(target):
                        target_param = {"stage": tsid} if tsid else {"spec": model_identity(exp.models[target])}
                        params = {**common, "target": target_param, "target_label": tlabel,
                                  "evaluation": label}
                        stage = Stage(f"evaluate/{label}/{tlabel}", e.kind, params,
                                      deps + ([tsid] if tsid else []), origin=("evaluate", name),
                                      overrides=overrides)
                        self._add(stage)


def _generate_order(exp: Experiment) -> list[str]:
    """Generate steps with the ones they read from first (cycles were rejected by the config check)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        ref = exp.generate[name].data
        if ref in exp.generate:
            visit(ref)
        order.append(name)

    for name in exp.generate:
        visit(name)
    return order


# ----------------------------------------------------------------------------------------- running
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
        return self.plan.exp.seed

    def data_path(self, role: str = "data") -> Path:
        sid, fname = self.stage.params[role]
        return self.out / self.plan.stages[sid].folder / fname

    def model(self, role: str = "target") -> str | None:
        """A model role → a spec `load_model` understands (a spec string or a fine-tuned model dir)."""
        param = self.stage.params.get(role)
        if param is None:
            return None
        if "stage" in param:
            sid = param["stage"]
            return str(self.out / self.plan.stages[sid].folder / self.results[sid]["model_dir"])
        return param["spec"].split("#", 1)[0]


Runner = Callable[[StageContext], dict[str, Any]]


def is_done(stage_dir: Path, key: str) -> dict[str, Any] | None:
    marker = stage_dir / "stage.json"
    if not marker.exists():
        return None
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    return info if info.get("key") == key else None


def run_plan(plan: Plan, out: Path, *, log: Callable[[str], None] = print,
             after_stage: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """Run every stage not already finished with its current key. Returns stage id → 'ran' | 'cached'."""
    out.mkdir(parents=True, exist_ok=True)
    table = RUNNERS
    cache = ModelCache()  # the run's loaded models (a fresh one: models on disk may have been retrained)
    status: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    n = len(plan.stages)
    for i, stage in enumerate(plan.stages.values(), start=1):
        sdir = stage_dir(out, stage)
        done = is_done(sdir, stage.key)
        if done is not None:
            results[stage.id] = done["result"]
            status[stage.id] = "cached"
            log(f"[{i}/{n}] {stage.id}: cached")
            continue
        keyfile = sdir / ".key"
        if sdir.exists() and (not keyfile.exists() or keyfile.read_text().strip() != stage.key):
            remove_stale(out, sdir)  # outputs of an older version of this stage: start clean
        sdir.mkdir(parents=True, exist_ok=True)
        keyfile.write_text(stage.key)
        if stage.kind == "finetune":
            cache.clear()  # free memory for training; nothing loaded so far is needed by it
        log(f"[{i}/{n}] {stage.id}: running ({stage.kind})")
        t0 = time.perf_counter()
        ctx = StageContext(stage, sdir, out, plan, results, cache)
        try:
            result = table.get(stage.kind, run_kind_stage)(ctx)
        except ConfigError as exc:
            raise plan.exp.error(exc.loc, exc.message) from None
        except InputError as exc:  # say which stage, and map an API's --option to the experiment's key
            if exc.file is not None:
                raise
            field = exc.field[2:].replace("-", "_") if exc.field and exc.field.startswith("--") else exc.field
            if field in stage_roles(stage):  # a kind's input role (data, members, ...): its key in the file
                field = ".".join((*stage.origin, field))
            raise InputError(f"stage {stage.id}: {exc.message}", field=field) from None
        seconds = round(time.perf_counter() - t0, 2)
        write_json(sdir / "stage.json", {"id": stage.id, "kind": stage.kind, "key": stage.key,
                                          "params": stage.params, "deps": stage.deps, "seconds": seconds,
                                          "result": result})
        results[stage.id] = result
        status[stage.id] = "ran"
        log(f"[{i}/{n}] {stage.id}: done in {seconds:.1f}s")
        if after_stage is not None:
            after_stage(status)
    return status


def write_run_record(plan: Plan, out: Path, config_text: str, status: dict[str, str]) -> Path:
    """`run.json`: the exact configuration, versions and every stage's result (what the report reads)."""
    stages = []
    for stage in plan.stages.values():
        done = is_done(out / stage.folder, stage.key)
        stages.append({"id": stage.id, "kind": stage.kind, "folder": stage.folder, "key": stage.key,
                       "params": stage.params, "status": status.get(stage.id, "done" if done else "pending"),
                       "seconds": done["seconds"] if done else None,
                       "result": done["result"] if done else None})
    record = {"experiment": plan.exp.model_dump(mode="json"), "config_text": config_text,
              "versions": versions(), "stages": stages}
    if not plan.exp.report.show_pii:  # the stage folder stays as on disk: the report opens it
        from leakaudit.data.pii_find import mask_obj
        record = mask_obj(record, keep={"folder"})
    write_json(out / "run.json", record)
    return out / "run.json"


def versions() -> dict[str, str]:
    """Versions of leakaudit and the libraries that change the numbers."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("leakaudit", "torch", "transformers", "peft", "tokenizers", "numpy", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run_experiment(exp: Experiment, out: str | Path, *, config_text: str = "",
                   log: Callable[[str], None] = print, report: bool = True) -> dict[str, str]:
    """Plan, check everything that can be checked without running a stage (options, model specs, the
    output dir), then run (resuming), record and report an experiment."""
    out = Path(out)
    plan = Plan(exp)
    check_plan(plan)
    resolve_models(plan)
    prepare_out(plan, out)
    write_run_record(plan, out, config_text, {})  # so `leakaudit report` works on a run still in progress
    status = run_plan(plan, out, log=log, after_stage=lambda st: write_run_record(plan, out, config_text, st))
    write_run_record(plan, out, config_text, status)
    if report:
        from leakaudit.report.html import write_report

        path = write_report(out)
        log(f"report: {path}")
    return status


# ----------------------------------------------------------------------------------------- checks
def check_plan(plan: Plan) -> None:
    """Fail before any work if a stage kind is not available, or an option is unknown to its API or has a
    value the API would refuse; the error names the experiment file, line and key path."""
    for stage in plan.stages.values():
        try:
            if stage.kind == "finetune":
                _finetune_config(stage, "-")
            elif stage.kind != "dataset":
                stage_options(stage)
        except ConfigError as exc:
            raise plan.exp.error(exc.loc, exc.message) from None


def resolve_models(plan: Plan) -> None:
    """Resolve every model spec of the `models` section (and an adapter's base) before any stage runs, so a
    typo or a model that is not available fails in the first second, not after the data stage. Each spec is
    resolved once (tiny and default models are converted on first use, then found in the cache)."""
    from leakaudit.models import resolve_spec

    done: set[str] = set()
    for name, spec in plan.exp.models.items():
        todo = [spec]
        while todo:
            one = todo.pop()
            if one in done:
                continue
            done.add(one)
            try:
                kind, where = resolve_spec(one)
                if kind == "adapter":
                    base = json.loads((Path(where) / "adapter_config.json").read_text()).get("base_model_name_or_path")
                    if not base:
                        raise InputError("adapter_config.json has no base_model_name_or_path")
                    todo.append(base)
            except InputError as exc:
                what = f"model '{one}'" if one == spec else f"base model '{one}' of '{spec}'"
                raise plan.exp.error(("models", name), f"{what}: {exc.message}") from None
            except (OSError, ValueError) as exc:
                raise plan.exp.error(("models", name), f"model '{one}': {exc}") from None


def prepare_out(plan: Plan, out: Path) -> None:
    """Create the output dir and make sure every stage folder can be written inside it, before any stage
    runs: an unwritable --out, a file where a folder is needed or a link out of it fails here."""
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a directory", file=out, field="--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write the output dir: {exc.strerror or exc}", file=out, field="--out") from None
    for stage in plan.stages.values():
        sdir = stage_dir(out, stage)
        for p in [*reversed(sdir.relative_to(out).parents), sdir.relative_to(out)]:
            q = out / p
            if q != out and q.exists() and not q.is_dir():
                raise InputError("exists and is not a directory (a stage folder goes here)", file=q, field="--out")


def _option_loc(stage: Stage, key: Any, section: str = "options", *sub: Any) -> tuple[Any, ...]:
    """The key path of a stage option in the file: under `grid` when the variant's value came from there."""
    kind, name = stage.origin
    if key in stage.overrides:
        return (kind, name, "grid", key)
    return (kind, name, section, key, *sub)


def _option_kind(stage: Stage) -> str:
    return stage.params["kind"] if stage.kind == "generate" else stage.kind


def stage_options(stage: Stage) -> dict[str, Any]:
    """A stage's options validated against its API: unknown keys, wrong types, out-of-range values and the
    API's own checks (attack names, templates, sampling) are ConfigErrors at the option's key path."""
    kind = _option_kind(stage)
    registered = _registered(kind)
    model = registered.Options
    raw = dict(stage.params.get("options") or {})
    for key in raw:
        if key not in model.model_fields:
            valid = ", ".join(sorted(model.model_fields))
            raise ConfigError(_option_loc(stage, key), f"unknown option '{key}' for {kind}; valid: {valid}")
    try:
        opts = model.model_validate(raw).model_dump(exclude_unset=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        key, *sub = err["loc"]
        raise ConfigError(_option_loc(stage, key, "options", *(x for x in sub if isinstance(x, int))),
                          pydantic_message(err)) from None
    try:
        registered.check(model.model_validate(raw), stage_roles(stage))
    except OptionError as exc:
        key, *sub = exc.loc
        raise ConfigError(_option_loc(stage, key, "options", *sub), exc.message) from None
    return opts


def _registered(kind: str) -> Any:
    """The registered kind (leakaudit.kinds) of a generate or evaluate stage."""
    from leakaudit.kinds import get_kind

    try:
        return get_kind(kind)
    except ValueError as exc:
        raise InputError(str(exc)) from None


# ----------------------------------------------------------------------------------------- datasets
def shuffled(rows: list[Any], seed: int, salt: str) -> list[Any]:
    rng = random.Random(f"{seed}:{salt}")
    rows = list(rows)
    rng.shuffle(rows)
    return rows


def split_rows(rows: list[dict[str, Any]], split: dict[str, float], by: str = "row"
               ) -> dict[str, list[dict[str, Any]]]:
    """Disjoint consecutive slices by fraction (rows are shuffled before); `by="user"` slices the users,
    so every user's rows land in one part (what user inference needs)."""
    if by == "user":
        users = list(dict.fromkeys(r.get("user") for r in rows))
        parts = split_rows([{"user": u} for u in users], split)
        return {name: [r for r in rows if r.get("user") in {p["user"] for p in part}] for name, part in parts.items()}
    out, start = {}, 0
    for name, frac in split.items():
        n = int(round(frac * len(rows)))
        out[name] = rows[start:start + n]
        start += n
    return out


def run_dataset(ctx: StageContext) -> dict[str, Any]:
    """Load (file or built-in), shuffle with the experiment seed, limit, truncate, split; write JSONL."""
    p = ctx.stage.params
    if p["builtin"] is not None:
        from leakaudit.data.builtin import builtin_dataset

        rows = builtin_dataset(p["builtin"], seed=ctx.seed, limit=p["limit"])
    else:
        records = load_records(p["path"], text_field=p["text_field"], id_field=p["id_field"],
                               user_field=p["user_field"])
        rows = []
        for r in records:
            row = {k: v for k, v in r.extra.items() if k not in ("id", "text", "user")}
            row.update({"id": r.id, "text": r.text})
            if r.user is not None:
                row["user"] = r.user
            rows.append(row)
    rows = shuffled(rows, ctx.seed, p["name"])
    if p["limit"]:
        rows = rows[:p["limit"]]
    if p["max_chars"]:
        for row in rows:
            row["text"] = row["text"][:p["max_chars"]]
    write_jsonl(ctx.dir / "all.jsonl", rows)
    counts = {"all": len(rows)}
    if p.get("split_by") == "user" and any(not r.get("user") for r in rows):
        raise InputError("split_by: user needs a user on every row (set user_field)",
                         field=f"datasets.{p['name']}.user_field")
    for name, part in split_rows(rows, p["split"], p.get("split_by", "row")).items():
        if not part:
            raise InputError(f"split '{name}' is empty ({len(rows)} rows in all)",
                             field=f"datasets.{p['name']}.split.{name}")
        write_jsonl(ctx.dir / f"{name}.jsonl", part)
        counts[name] = len(part)
    return {"rows": counts}


# ----------------------------------------------------------------------------------------- stage runners
# Each runner adapts one library API to a stage: read inputs from the stage context, write the API's
# usual output files into the stage dir, return a small JSON result the report and summary.json read.





def _finetune_config(stage: Stage, out: str) -> Any:
    """The FinetuneConfig of a variant: options and defenses are its fields (validated by it)."""
    from pydantic import ValidationError

    from leakaudit.train.finetune import FinetuneConfig as config_cls
    p = stage.params
    fields = {**p["options"], **p["defenses"]}
    fields.setdefault("seed", p.get("seed", 0))
    try:
        return config_cls(model=p.get("model_path") or p["model"].get("spec", "-").split("#", 1)[0],
                          data=str(p.get("data_path", "-")),
                          method=p["method"], out=out, **fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = err["loc"][0] if err["loc"] else "options"
        section = "defenses" if key in p["defenses"] else "options"
        msg = "unknown option" if err["type"] == "extra_forbidden" else pydantic_message(err)
        raise ConfigError(_option_loc(stage, key, section), msg) from None


def run_finetune_stage(ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the base model on the data with the variant's method, options and defenses.

    The trainer checkpoints every epoch inside the stage dir, so a killed stage resumes mid-training.
    """
    from leakaudit.perplexity import model_dirs
    from leakaudit.train.finetune import finetune

    stage = Stage(ctx.stage.id, ctx.stage.kind, {**ctx.stage.params, "data_path": ctx.data_path(),
                                                   "model_path": ctx.model("model"), "seed": ctx.seed})
    model_dir = Path(finetune(_finetune_config(stage, str(ctx.dir / "model"))))
    checkpoints = [str(d.relative_to(ctx.dir)) for d in model_dirs(model_dir) if d != model_dir]
    return {"model_dir": str(model_dir.relative_to(ctx.dir)), "checkpoints": checkpoints}




def stage_roles(stage: Stage) -> set[str]:
    """The data and model roles an evaluation stage was given (members, reference, ...)."""
    return {r for r in ("members", "nonmembers", "data", "reference", "baseline", "model")
            if stage.params.get(r) is not None}


def run_kind_stage(ctx: StageContext) -> dict[str, Any]:
    """Run a registered kind (leakaudit.kinds) on one stage: its inputs and models come from the plan."""
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext

    stage = ctx.stage
    kind = get_kind(_option_kind(stage))
    options = kind.Options.model_validate(ctx.options)
    data = {role: ctx.data_path(role) for role in ("members", "nonmembers", "data") if stage.params.get(role)}
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
                       log=lambda m: None, progress=False)
    return kind.run(kctx, options).to_json()


# The engine's own stages; every other stage (generate steps, evaluations) runs its registered kind.
RUNNERS: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "dataset": run_dataset,
    "finetune": run_finetune_stage,
}
