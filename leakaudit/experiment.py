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
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leakaudit.config import Experiment, expand_grid
from leakaudit.data.io import load_records, write_json, write_jsonl
from leakaudit.errors import InputError

STAGE_VERSION = 1


@dataclass
class Stage:
    """One unit of cached work."""

    id: str
    kind: str
    params: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    key: str = ""

    @property
    def folder(self) -> str:
        return "/".join(_slug(p) for p in self.id.split("/"))


def _slug(part: str) -> str:
    """A file-system-safe folder name for a stage id part (grid labels contain brackets, commas...)."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", part).strip("_") or "_"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path: str | Path) -> str:
    """Content hash of an input file or model dir, so an edited file reruns what reads it."""
    from leakaudit.models import _file_sha256, dir_fingerprint

    p = Path(path)
    if p.is_dir():
        return dir_fingerprint(p)
    return _file_sha256(p)


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
            self._add(Stage(f"data/{name}", "dataset", params))
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
            self._add(Stage(f"generate/{name}", "generate", params, deps + mdeps))
        for name, f in exp.finetune.items():
            self.finetune_variants[name] = []
            for label, overrides in expand_grid(name, f.grid):
                options = {**f.options, **{k: v for k, v in overrides.items() if k != "method"}}
                sid, fname = self.data_stage(f.data)
                params = {"model": {"spec": model_identity(exp.models[f.model])},
                          "method": overrides.get("method", f.method), "options": options,
                          "defenses": f.defenses, "data": [sid, fname]}
                stage = Stage(f"finetune/{label}", "finetune", params, [sid])
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
                                      deps + ([tsid] if tsid else []))
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

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.stage.params.get("options") or {})

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
             stop_after: str | None = None) -> dict[str, str]:
    """Run every stage not already finished with its current key. Returns stage id → 'ran' | 'cached'."""
    out.mkdir(parents=True, exist_ok=True)
    table = RUNNERS
    status: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    n = len(plan.stages)
    for i, stage in enumerate(plan.stages.values(), start=1):
        sdir = out / stage.folder
        done = is_done(sdir, stage.key)
        if done is not None:
            results[stage.id] = done["result"]
            status[stage.id] = "cached"
            log(f"[{i}/{n}] {stage.id}: cached")
            continue
        keyfile = sdir / ".key"
        if sdir.exists() and (not keyfile.exists() or keyfile.read_text().strip() != stage.key):
            shutil.rmtree(sdir)  # outputs of an older version of this stage: start clean
        sdir.mkdir(parents=True, exist_ok=True)
        keyfile.write_text(stage.key)
        log(f"[{i}/{n}] {stage.id}: running ({stage.kind})")
        t0 = time.perf_counter()
        ctx = StageContext(stage, sdir, out, plan, results)
        try:
            result = table[stage.kind](ctx)
        except InputError as exc:  # say which stage, and map an API's --option to the experiment's key
            if exc.file is not None:
                raise
            field = exc.field[2:].replace("-", "_") if exc.field and exc.field.startswith("--") else exc.field
            raise InputError(f"stage {stage.id}: {exc.message}", field=field) from None
        seconds = round(time.perf_counter() - t0, 2)
        write_json(sdir / "stage.json", {"id": stage.id, "kind": stage.kind, "key": stage.key,
                                          "params": stage.params, "deps": stage.deps, "seconds": seconds,
                                          "result": result})
        results[stage.id] = result
        status[stage.id] = "ran"
        log(f"[{i}/{n}] {stage.id}: done in {seconds:.1f}s")
        if stop_after == stage.id:
            break
    return status


def write_run_record(plan: Plan, out: Path, config_text: str, status: dict[str, str]) -> Path:
    """`run.json`: the exact configuration, versions and every stage's result (what the report reads)."""
    stages = []
    for stage in plan.stages.values():
        done = is_done(out / stage.folder, stage.key)
        stages.append({"id": stage.id, "kind": stage.kind, "folder": stage.folder, "key": stage.key,
                       "params": stage.params, "status": status.get(stage.id, "missing"),
                       "seconds": done["seconds"] if done else None,
                       "result": done["result"] if done else None})
    record = {"experiment": plan.exp.model_dump(mode="json"), "config_text": config_text,
              "versions": versions(), "stages": stages}
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
    """Plan, run (resuming), record and report an experiment."""
    out = Path(out)
    plan = Plan(exp)
    check_plan(plan)
    status = run_plan(plan, out, log=log)
    write_run_record(plan, out, config_text, status)
    if report:
        from leakaudit.report.html import write_report

        path = write_report(out)
        log(f"report: {path}")
    return status


def check_plan(plan: Plan) -> None:
    """Fail before any work if a stage kind is not available or an option is unknown to its API."""
    for stage in plan.stages.values():
        CHECKS.get(stage.kind, lambda s: None)(stage)


# ----------------------------------------------------------------------------------------- datasets
def shuffled(rows: list[Any], seed: int, salt: str) -> list[Any]:
    rng = random.Random(f"{seed}:{salt}")
    rows = list(rows)
    rng.shuffle(rows)
    return rows


def split_rows(rows: list[dict[str, Any]], split: dict[str, float]) -> dict[str, list[dict[str, Any]]]:
    """Disjoint consecutive slices by fraction (rows are shuffled before)."""
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
        from leakaudit.demo import builtin_dataset

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
    for name, part in split_rows(rows, p["split"]).items():
        if not part:
            raise InputError(f"split '{name}' is empty ({len(rows)} rows in all)",
                             field=f"datasets.{p['name']}.split.{name}")
        write_jsonl(ctx.dir / f"{name}.jsonl", part)
        counts[name] = len(part)
    return {"rows": counts}


# ----------------------------------------------------------------------------------------- stage runners
# Each runner adapts one library API to a stage: read inputs from the stage context, write the API's
# usual output files into the stage dir, return a small JSON result the report and summary.json read.

def _api(module: str, name: str, kind: str) -> Any:
    """The library function behind a stage kind, or a clear error when this version lacks it."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise InputError(f"stage kind '{kind}' is not available in this version (needs {module}.{name})") from None


_LOADED: dict[str, Any] = {}


def _load(spec: str | None) -> Any:
    """Load a model for inference, keeping the two most recent in memory (reference models repeat)."""
    if spec is None:
        return None
    from leakaudit.models import load_model

    if spec not in _LOADED:
        while len(_LOADED) >= 2:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[spec] = load_model(spec)
    return _LOADED[spec]


def _records(path: Path) -> list[Any]:
    return load_records(path, id_field="id")


def _signature_options(fn: Callable[..., Any], exclude: set[str]) -> set[str]:
    import inspect

    return {n for n, p in inspect.signature(fn).parameters.items()
            if n not in exclude and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _check_options(stage: Stage, allowed: set[str], section: str) -> None:
    for key in stage.params.get("options") or {}:
        if key not in allowed:
            name = stage.params.get("evaluation") or stage.id.split("/", 1)[1]
            raise InputError(f"unknown option '{key}' for {stage.kind}; valid: {', '.join(sorted(allowed))}",
                             field=f"{section}.{name}.options.{key}")


MIA_DEFAULT_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")


def _mia_options() -> set[str]:
    run_mia = _api("leakaudit.attacks.mia", "run_mia", "mia")
    return _signature_options(run_mia, {"target", "members", "nonmembers", "reference", "progress"}) | {"attacks"}


def run_mia_stage(ctx: StageContext) -> dict[str, Any]:
    """Membership inference: scores.jsonl (one row per sample), mia.json (AUC with CI, TPR@FPR per attack)."""
    run_mia = _api("leakaudit.attacks.mia", "run_mia", "mia")
    opts = ctx.options
    reference_spec = ctx.model("reference")
    attacks = opts.pop("attacks", None) or list(MIA_DEFAULT_ATTACKS) + (["ref"] if reference_spec else [])
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    opts.setdefault("seed", ctx.seed)
    members, nonmembers = _records(ctx.data_path("members")), _records(ctx.data_path("nonmembers"))
    target = _load(ctx.model("target"))
    reference = _load(reference_spec)
    report = run_mia(target, [r.text for r in members], [r.text for r in nonmembers], attacks,
                     reference=reference, **opts)
    write_jsonl(ctx.dir / "scores.jsonl", report.rows([r.id for r in members], [r.id for r in nonmembers]))
    result = report.to_json()
    write_json(ctx.dir / "mia.json", result)
    return {**result, "scores_file": "scores.jsonl"}


def _pii_options() -> set[str]:
    run_pii = _api("leakaudit.attacks.pii", "run_pii", "pii")
    return ({"templates", "temperatures", "top_k", "max_new_tokens", "n_targets", "pairs"}
            | _signature_options(run_pii, {"model", "targets", "cells", "out", "baseline", "show_pii", "progress",
                                           "log", "load_options"}))


def run_pii_stage(ctx: StageContext) -> dict[str, Any]:
    """PII extraction (results_purified.jsonl, pii.json, masked extractions.jsonl) with baseline subtraction."""
    run_pii = _api("leakaudit.attacks.pii", "run_pii", "pii")
    from leakaudit.attacks.pii import make_grid
    from leakaudit.data.enron import load_targets, resolve_templates

    opts = ctx.options
    temps = opts.pop("temperatures", None)
    cells = make_grid(resolve_templates(str(opts.pop("templates", "fake-privacy"))),
                      [float(t) for t in temps] if temps is not None else None,
                      opts.pop("top_k", None), opts.pop("max_new_tokens", None))
    targets = load_targets(opts.pop("pairs", None), opts.pop("n_targets", None))
    opts.setdefault("seed", ctx.seed)
    show_pii = ctx.plan.exp.report.show_pii
    summary = run_pii(_load(ctx.model("target")), targets, cells, ctx.dir, baseline=_load(ctx.model("baseline")),
                      show_pii=show_pii, log=lambda m: None, **opts)
    rows = [json.loads(line) for line in (ctx.dir / "results_purified.jsonl").read_text().splitlines() if line]
    model_rows = [r for r in rows if r.get("role", "model") == "model"]
    result: dict[str, Any] = {"rows": model_rows, "baseline_rows": [r for r in rows if r.get("role") == "baseline"]}
    part = next(iter(summary["protocols"].values()))
    result["match_rate"] = part["grid_mean"]["hit_rate"]
    result["match_rate_ci"] = part["grid_mean"]["hit_rate_ci"]
    result["best_cell"] = {k: part["best_cell"][k] for k in ("template", "temperature", "hit_rate", "hit_rate_ci")}
    if "baseline_subtraction" in part:
        change = part["baseline_subtraction"]["grid_mean"]
        result["match_rate_minus_baseline"] = change["change"]
        result["match_rate_minus_baseline_ci"] = change["change_ci"]
    return result


def _finetune_options() -> set[str]:
    config_cls = _api("leakaudit.train.finetune", "FinetuneConfig", "finetune")
    fields = getattr(config_cls, "model_fields", None) or getattr(config_cls, "__dataclass_fields__", {})
    return set(fields) - {"model", "data", "method", "out", "output_dir"}


def run_finetune_stage(ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the base model on the data with the variant's method and options; resumes from checkpoints."""
    config_cls = _api("leakaudit.train.finetune", "FinetuneConfig", "finetune")
    finetune = _api("leakaudit.train.finetune", "finetune", "finetune")
    p = ctx.stage.params
    kwargs = {"model": p["model"]["spec"].split("#", 1)[0], "data": str(ctx.data_path()), "method": p["method"],
              "out": str(ctx.dir / "model"), **ctx.options}
    if p["defenses"]:
        kwargs["defenses"] = p["defenses"]
    kwargs.setdefault("seed", ctx.seed)
    fields = _finetune_options() | {"model", "data", "method", "out", "output_dir", "defenses"}
    if "out" not in fields:
        kwargs["output_dir"] = kwargs.pop("out")
    model_dir = Path(finetune(config_cls(**kwargs)))
    checkpoints = sorted(str(c.relative_to(ctx.dir)) for c in model_dir.glob("checkpoint*") if c.is_dir())
    return {"model_dir": str(model_dir.relative_to(ctx.dir)), "checkpoints": checkpoints}


def run_perplexity_stage(ctx: StageContext) -> dict[str, Any]:
    """Perplexity of the target on the data, and on each saved checkpoint of a fine-tuned target."""
    perplexity = _api("leakaudit.perplexity", "perplexity", "perplexity")
    from leakaudit.models import load_model

    texts = [r.text for r in _records(ctx.data_path())]
    value = _perplexity_value(perplexity(_load(ctx.model("target")), texts, **ctx.options))
    checkpoints = []
    target = ctx.stage.params["target"]
    if "stage" in target:
        sdir = ctx.out / ctx.plan.stages[target["stage"]].folder
        for i, rel in enumerate(ctx.results[target["stage"]].get("checkpoints") or [], start=1):
            lm = load_model(str(sdir / rel))
            checkpoints.append({"name": Path(rel).name, "step": i,
                                "perplexity": _perplexity_value(perplexity(lm, texts, **ctx.options))})
            del lm
    result = {"perplexity": value, "n_texts": len(texts), "checkpoints": checkpoints}
    write_json(ctx.dir / "perplexity.json", result)
    return result


def _perplexity_value(x: Any) -> float:
    if isinstance(x, dict):
        return float(x["perplexity"])
    return float(getattr(x, "perplexity", x))


def _not_yet(module: str, name: str, kind: str) -> Callable[[StageContext], dict[str, Any]]:
    def runner(ctx: StageContext) -> dict[str, Any]:
        _api(module, name, kind)
        raise InputError(f"stage kind '{kind}' is not wired in this version")

    return runner


RUNNERS: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "generate": _not_yet("leakaudit.data.synth", "continuation", "generate"),
    "user-inference": _not_yet("leakaudit.attacks.user_inference", "run_user_inference", "user-inference"),
    "backdoor": _not_yet("leakaudit.attacks.backdoor", "run_backdoor", "backdoor"),
    "dataset": run_dataset,
    "finetune": run_finetune_stage,
    "mia": run_mia_stage,
    "pii": run_pii_stage,
    "perplexity": run_perplexity_stage,
}

CHECKS: dict[str, Callable[[Stage], None]] = {
    "mia": lambda s: _check_options(s, _mia_options(), "evaluate"),
    "pii": lambda s: _check_options(s, _pii_options(), "evaluate"),
    "finetune": lambda s: _check_options(s, _finetune_options(), "finetune"),
    "perplexity": lambda s: _api("leakaudit.perplexity", "perplexity", "perplexity"),
}
