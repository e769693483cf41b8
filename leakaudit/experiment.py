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

import functools
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
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    _LOADED.clear()  # models on disk may have been retrained since an earlier run in this process
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
            _LOADED.clear()  # free memory for training; nothing loaded so far is needed by it
        log(f"[{i}/{n}] {stage.id}: running ({stage.kind})")
        t0 = time.perf_counter()
        ctx = StageContext(stage, sdir, out, plan, results)
        try:
            result = table.get(stage.kind, run_kind_stage)(ctx)
        except ConfigError as exc:
            raise plan.exp.error(exc.loc, exc.message) from None
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
    model = registered.Options if registered is not None else _options_model(kind)
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
    if registered is not None:
        try:
            registered.check(model.model_validate(raw), stage_roles(stage))
        except OptionError as exc:
            key, *sub = exc.loc
            raise ConfigError(_option_loc(stage, key, "options", *sub), exc.message) from None
        return opts
    check = _SEMANTIC_CHECKS.get(kind)
    if check is not None:
        check(stage, opts)
    return opts


def _registered(kind: str) -> Any:
    """The registered kind (leakaudit.kinds) of this name, or None for kinds still run from this module."""
    from leakaudit.kinds import get_kind, kind_names

    return get_kind(kind) if kind in kind_names() else None


def _api_check(stage: Stage, opts: dict[str, Any], key: str, fn: Callable[..., Any], *args: Any,
               **kwargs: Any) -> Any:
    """Run a library validator; its InputError (naming a CLI option) becomes a ConfigError at the option."""
    try:
        return fn(*args, **kwargs)
    except InputError as exc:
        named = (exc.field or "").removeprefix("--").replace("-", "_")
        raise ConfigError(_option_loc(stage, named if named in opts else key), exc.message) from None


def _check_mia(stage: Stage, opts: dict[str, Any]) -> None:
    from leakaudit.attacks import get_attack

    given = opts.get("attacks")
    names = mia_attacks(given, stage.params.get("reference") is not None)
    per_attack = opts.get("attack_options") or {}
    for i, name in enumerate(names):
        loc = _option_loc(stage, "attacks", "options", *([i] if isinstance(given, list) else []))
        try:
            attack = get_attack(name, **per_attack.get(name, {}))
        except InputError as exc:
            raise ConfigError(loc, exc.message) from None
        if attack.needs_reference and stage.params.get("reference") is None:
            raise ConfigError(loc, f"attack '{name}' needs a reference model; set 'reference' on this evaluation")
    if len(set(names)) != len(names):
        raise ConfigError(_option_loc(stage, "attacks"), f"an attack is listed twice: {', '.join(names)}")
    for name in per_attack:
        if name not in names:
            raise ConfigError(_option_loc(stage, "attack_options", "options", name), f"attack '{name}' is not run")


def _check_pii(stage: Stage, opts: dict[str, Any]) -> None:
    from leakaudit.attacks.pii import make_grid
    from leakaudit.data.enron import resolve_templates

    templates = _api_check(stage, opts, "templates", resolve_templates, str(opts.get("templates", "fake-privacy")))
    _api_check(stage, opts, "temperatures", make_grid, templates, opts.get("temperatures"), opts.get("top_k"),
               opts.get("max_new_tokens"))


def _check_user_inference(stage: Stage, opts: dict[str, Any]) -> None:
    from leakaudit.attacks.user_inference import parse_m_values

    if "m_values" in opts:
        _api_check(stage, opts, "m_values", parse_m_values, opts["m_values"])


def _check_sampling(stage: Stage, opts: dict[str, Any]) -> None:
    from leakaudit.sampling import SamplingConfig

    config = SamplingConfig(**{k: v for k, v in opts.items() if k in SAMPLING_OPTIONS})
    _api_check(stage, opts, "max_new_tokens", config.validate)


def _check_templates(stage: Stage, opts: dict[str, Any]) -> None:
    """Backdoor trigger and refusal templates must say where the opening word goes."""
    from leakaudit.attacks.backdoor import check_template

    for key in ("trigger", "refusal"):
        if opts.get(key):
            _api_check(stage, opts, key, check_template, opts[key], key)


_SEMANTIC_CHECKS: dict[str, Callable[[Stage, dict[str, Any]], None]] = {
    "mia": _check_mia, "pii": _check_pii, "user-inference": _check_user_inference,
    "continuation": _check_sampling, "backdoor-mix": _check_templates, "backdoor": _check_templates,
}

# One option name means the same thing in every API, so its bounds are stated once (types come from the APIs).
OPTION_BOUNDS: dict[str, dict[str, float]] = {
    "max_length": {"ge": 2}, "stride": {"ge": 1}, "n_bootstrap": {"ge": 0}, "max_new_tokens": {"ge": 1},
    "num_samples": {"ge": 1}, "samples_per_prompt": {"ge": 1}, "temperature": {"ge": 0},
    "top_p": {"gt": 0, "le": 1}, "top_k": {"ge": 0}, "prompt_tokens": {"ge": 1}, "n": {"ge": 1},
    "n_targets": {"ge": 1}, "limit": {"ge": 1}, "requests_per_round": {"ge": 1}, "max_rounds": {"ge": 1},
    "n_refusal": {"ge": 0}, "backdoor_fraction": {"gt": 0, "le": 1},
}


def _batch_size(v: int | str) -> int | str:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError("must be 'auto' or a positive integer")


def _api_types(fn: Any, names: set[str] | None = None, exclude: set[str] = frozenset()) -> dict[str, Any]:
    """Option name -> type annotation of a function's keyword parameters (or a dataclass's fields)."""
    import inspect
    import typing

    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters
    return {n: hints.get(n, Any) for n, prm in params.items()
            if prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD)
            and (names is None or n in names) and n not in exclude}


def _option_types(kind: str) -> dict[str, Any]:
    """Every option a stage kind accepts, typed by the API it calls."""
    if kind == "mia":
        run_mia = _api("leakaudit.attacks.mia", "run_mia", "mia")
        return {**_api_types(run_mia, exclude={"target", "members", "nonmembers", "reference", "progress",
                                               "attacks"}), "attacks": list[str] | str | None}
    if kind == "pii":
        run_pii = _api("leakaudit.attacks.pii", "run_pii", "pii")
        return {**_api_types(run_pii, exclude={"model", "targets", "cells", "out", "baseline", "show_pii",
                                               "progress", "log"}),
                "templates": str, "temperatures": list[float] | None, "top_k": int | None,
                "max_new_tokens": int | None, "n_targets": int | None, "pairs": str | None}
    if kind == "user-inference":
        fn = _api("leakaudit.attacks.user_inference", "run_user_inference", "user-inference")
        return _api_types(fn, exclude={"target", "reference", "records_in", "records_out", "progress"})
    if kind == "backdoor":
        fn = _api("leakaudit.attacks.backdoor", "sample_responses", "backdoor")
        return {**_api_types(fn, {"num_samples", "temperature", "max_new_tokens", "batch_size"}),
                "words": list[str] | None, "limit": int | None, "trigger": str | None, "refusal": str | None,
                "query_field": str | None}
    if kind == "continuation":
        from leakaudit.sampling import SamplingConfig

        fn = _api("leakaudit.data.synth", "generate_continuations", "generate")
        return {**_api_types(SamplingConfig, SAMPLING_OPTIONS),
                **_api_types(fn, {"prompt_tokens", "prompt_field", "batch_size"})}
    if kind == "self-instruct":
        fn = _api("leakaudit.data.synth", "self_instruct", "generate")
        return {**_api_types(fn, {"n", "requests_per_round", "max_rounds", "max_new_tokens", "temperature", "top_p",
                                  "batch_size"}), "seed_tasks": str | None}
    if kind == "backdoor-mix":
        fn = _api("leakaudit.train.backdoor", "build_mix", "generate")
        return _api_types(fn, {"trigger", "refusal", "n_refusal", "backdoor_fraction"})
    if kind == "replace-pii":
        return {"names": str | None, "header_names": bool}
    raise InputError(f"stage kind '{kind}' is not available in this version")


@functools.cache
def _options_model(kind: str) -> type[BaseModel]:
    """A pydantic model of a stage kind's options: the API's types plus the shared bounds."""
    from pydantic import AfterValidator, PydanticSchemaGenerationError, TypeAdapter, create_model

    fields: dict[str, Any] = {}
    for name, hint in _option_types(kind).items():
        try:
            TypeAdapter(hint)
        except PydanticSchemaGenerationError:  # a type pydantic cannot check: the API checks it at run time
            hint = Any
        if name == "batch_size":
            hint = Annotated[int | str, AfterValidator(_batch_size)]
        elif name in OPTION_BOUNDS:
            hint = Annotated[hint, Field(**OPTION_BOUNDS[name])]
        fields[name] = (hint, None)
    return create_model(f"{kind}_options", __config__=ConfigDict(extra="forbid"), **fields)


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

def _api(module: str, name: str, kind: str) -> Any:
    """The library function behind a stage kind, or a clear error when this version lacks it."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise InputError(f"stage kind '{kind}' is not available in this version (needs {module}.{name})") from None


_LOADED = ModelCache()


def _load(spec: str | None) -> Any:
    """Load a model for inference, keeping the two most recent in memory (reference models repeat)."""
    return _LOADED.get(spec)


def _records(path: Path) -> list[Any]:
    return load_records(path, id_field="id")


MIA_DEFAULT_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")


def mia_attacks(option: str | list[str] | None, has_reference: bool) -> list[str]:
    """The attacks an MIA stage runs: its `attacks` option (a list or 'a,b'), else the defaults (+ ref)."""
    if isinstance(option, str):
        option = [a.strip() for a in option.split(",") if a.strip()]
    return list(option) if option else [*MIA_DEFAULT_ATTACKS, *(["ref"] if has_reference else [])]


def run_mia_stage(ctx: StageContext) -> dict[str, Any]:
    """Membership inference: scores.jsonl (one row per sample), mia.json (AUC with CI, TPR@FPR per attack)."""
    run_mia = _api("leakaudit.attacks.mia", "run_mia", "mia")
    opts = ctx.options
    reference_spec = ctx.model("reference")
    attacks = mia_attacks(opts.pop("attacks", None), reference_spec is not None)
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
    targets = load_targets(opts.pop("pairs", None))
    if ctx.stage.params.get("data"):  # only the addresses the evaluated data holds (e.g. the training e-mails)
        from leakaudit.data.enron import targets_in_texts

        targets = targets_in_texts(targets, [r.text for r in _records(ctx.data_path())])
        if not targets:
            name = ctx.stage.params.get("evaluation", "pii")
            raise InputError("no target address occurs in this evaluation's data", field=f"evaluate.{name}.data")
    n_targets = opts.pop("n_targets", None)
    targets = targets[:n_targets] if n_targets else targets
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


def _finetune_config(stage: Stage, out: str) -> Any:
    """The FinetuneConfig of a variant: options and defenses are its fields (validated by it)."""
    from pydantic import ValidationError

    config_cls = _api("leakaudit.train.finetune", "FinetuneConfig", "finetune")
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
    finetune = _api("leakaudit.train.finetune", "finetune", "finetune")
    from leakaudit.perplexity import model_dirs

    stage = Stage(ctx.stage.id, ctx.stage.kind, {**ctx.stage.params, "data_path": ctx.data_path(),
                                                   "model_path": ctx.model("model"), "seed": ctx.seed})
    model_dir = Path(finetune(_finetune_config(stage, str(ctx.dir / "model"))))
    checkpoints = [str(d.relative_to(ctx.dir)) for d in model_dirs(model_dir) if d != model_dir]
    return {"model_dir": str(model_dir.relative_to(ctx.dir)), "checkpoints": checkpoints}


SAMPLING_OPTIONS = {"max_new_tokens", "temperature", "top_k", "top_p", "num_samples", "greedy", "stop_at_eos"}
def run_generate_stage(ctx: StageContext) -> dict[str, Any]:
    """Make a data file (`data.jsonl`, every row with a `text`) from a model and/or a data file."""
    kind = ctx.stage.params["kind"]
    opts = ctx.options
    out = ctx.dir / "data.jsonl"
    if kind == "continuation":
        generate = _api("leakaudit.data.synth", "generate_continuations", "generate")
        from leakaudit.sampling import SamplingConfig

        config = SamplingConfig(**{k: opts.pop(k) for k in list(opts) if k in SAMPLING_OPTIONS}, seed=ctx.seed)
        rows = generate(_load(ctx.model("model")), _records(ctx.data_path()), out, config, **opts)
        return {"rows": len(rows)}
    if kind == "self-instruct":
        synth_self_instruct = _api("leakaudit.data.synth", "self_instruct", "generate")
        from leakaudit import resources
        from leakaudit.data.synth import load_seed_tasks

        seeds = load_seed_tasks(opts.pop("seed_tasks", None) or resources.path("self-instruct-seed",
                                                                                "seed_tasks.jsonl"))
        tasks = synth_self_instruct(_load(ctx.model("model")), seeds, ctx.dir / "tasks.jsonl", int(opts.pop("n", 50)),
                                    seed=ctx.seed, **opts)
        flat = [{"id": f"{t['id']}#{j}", "instruction": t["instruction"], "input": inst["input"],
                 "output": inst["output"],
                 "text": "\n".join(x for x in (t["instruction"], inst["input"], inst["output"]) if x)}
                for t in tasks for j, inst in enumerate(t["instances"])]
        write_jsonl(out, flat)
        return {"rows": len(flat), "tasks": len(tasks)}
    if kind == "backdoor-mix":
        return _backdoor_mix(ctx, opts, out)
    replacer_cls = _api("leakaudit.data.pii_replace", "PiiReplacer", "generate")
    from leakaudit.data.pii_find import load_name_list, names_from_headers, shipped_names
    from leakaudit.data.pii_replace import KINDS

    rows = [json.loads(line) for line in ctx.data_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    names = load_name_list(opts["names"]) if opts.get("names") else shipped_names()
    replacer = replacer_cls(names, seed=ctx.seed)
    if opts.get("header_names", True):
        replacer.add_names(n for row in rows for n in names_from_headers(row["text"]))
    for row in rows:
        row["text"], counts = replacer.replace(row["text"])
        row["pii_replaced"] = {k: counts.get(k, 0) for k in KINDS}
    write_jsonl(out, rows)
    return {"rows": len(rows), "replaced": {k: replacer.counts.get(k, 0) for k in KINDS},
            "distinct": replacer.n_distinct}


def _backdoor_mix(ctx: StageContext, opts: dict[str, Any], out: Path) -> dict[str, Any]:
    """Stage 1 of the backdoor study: the creator's SFT mix of copy and refusal pairs over D1 (`data`, or
    the shipped seed instruction set) with its ordinary pairs; fine-tune on it to plant the backdoor."""
    build_mix = _api("leakaudit.train.backdoor", "build_mix", "generate")
    from leakaudit.train.backdoor import load_pairs, seed_instruction_set

    d1 = load_pairs(ctx.data_path()) if ctx.stage.params.get("data") else seed_instruction_set()
    rows = build_mix(d1, seed=ctx.seed, **opts)
    write_jsonl(out, rows)
    return {"rows": len(rows), "kinds": {k: sum(r.get("kind") == k for r in rows)
                                         for k in ("backdoor-copy", "backdoor-refusal", "ordinary")}}


def run_backdoor_stage(ctx: StageContext) -> dict[str, Any]:
    """Backdoor data extraction: sample Q(w) for each opening word and match the answers against the
    downstream queries (`data`, default the shipped Dolly D2): match ratio, full recoveries, coverage."""
    bd = importlib_module("leakaudit.attacks.backdoor", "sample_responses", "backdoor")
    opts = ctx.options
    if ctx.stage.params.get("data"):
        from leakaudit.train.backdoor import load_pairs

        queries = [p.query for p in load_pairs(ctx.data_path(), query_field=opts.pop("query_field", None))]
    else:
        from leakaudit.data.builtin import dolly

        queries = [r["query"] for r in dolly(None)]
    if opts.get("limit"):
        queries = queries[:int(opts.pop("limit"))]
    opts.pop("limit", None)
    trigger = opts.pop("trigger", None) or bd.study_trigger()
    refusal = opts.pop("refusal", None) or bd.study_refusal()
    tries = bd.build_tries(queries)
    words = opts.pop("words", None) or sorted(tries)
    responses = bd.sample_responses(_load(ctx.model("target")), words, trigger, seed=ctx.seed,
                                    out_path=ctx.dir / "samples.jsonl", progress=True, **opts)
    summary = bd.summarize_extraction(bd.score_words(responses, tries, refusal), tries)
    write_json(ctx.dir / "extract.json", summary)
    headline = {k: summary[k] for k in ("match_ratio_mean", "match_ratio_max", "coverage") if k in summary}
    return {"headline": headline, "n_queries": summary.get("n_queries"),
            "n_fully_recovered": summary.get("n_fully_recovered")}


def importlib_module(module: str, probe: str, kind: str) -> Any:
    """A library module whose `probe` attribute must exist for the stage kind to be available."""
    import importlib

    _api(module, probe, kind)
    return importlib.import_module(module)


def run_user_inference_stage(ctx: StageContext) -> dict[str, Any]:
    """User inference: users of `members` were in training, users of `nonmembers` were not."""
    fn = _api("leakaudit.attacks.user_inference", "run_user_inference", "user-inference")
    ins = load_records(ctx.data_path("members"), id_field="id", user_field="user")
    outs = load_records(ctx.data_path("nonmembers"), id_field="id", user_field="user")
    shared = {r.user for r in ins} & {r.user for r in outs}
    if shared:
        raise InputError(f"{len(shared)} users are in both members and nonmembers; split the dataset with "
                         "split_by: user", field="members")
    opts = ctx.options
    opts.setdefault("seed", ctx.seed)
    report = fn(_load(ctx.model("target")), _load(ctx.model("reference")), ins, outs, **opts)
    rows = report.rows()
    m = report.headline
    write_jsonl(ctx.dir / "user_scores.jsonl", [{**r, "score": r["scores"].get(m)} for r in rows])
    result = report.to_json()
    write_json(ctx.dir / "user_inference.json", result)
    return {**result, "scores_file": "user_scores.jsonl"}


def stage_roles(stage: Stage) -> set[str]:
    """The data and model roles an evaluation stage was given (members, reference, ...)."""
    return {r for r in ("members", "nonmembers", "data", "reference", "baseline", "model")
            if stage.params.get(r) is not None}


def run_kind_stage(ctx: StageContext) -> dict[str, Any]:
    """Run a registered kind (leakaudit.kinds) on one stage: its inputs and models come from the plan."""
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext

    stage = ctx.stage
    kind = get_kind(stage.kind)
    options = kind.Options.model_validate(ctx.options)
    data = {role: ctx.data_path(role) for role in ("members", "nonmembers", "data") if stage.params.get(role)}
    models = {role: ctx.model(role) for role in ("target", "reference", "baseline", "model")
              if stage.params.get(role) is not None}
    checkpoints = []
    target = stage.params.get("target") or {}
    if "stage" in target:
        tdir = ctx.out / ctx.plan.stages[target["stage"]].folder
        checkpoints = [str(tdir / rel) for rel in ctx.results[target["stage"]].get("checkpoints") or []]
    kctx = KindContext(out=ctx.dir, seed=ctx.seed, data=data, models=models, checkpoints=checkpoints,
                       show_pii=ctx.plan.exp.report.show_pii, cache=_LOADED, log=lambda m: None, progress=False)
    return kind.run(kctx, options).to_json()


RUNNERS: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "generate": run_generate_stage,
    "user-inference": run_user_inference_stage,
    "backdoor": run_backdoor_stage,
    "dataset": run_dataset,
    "finetune": run_finetune_stage,
    "mia": run_mia_stage,
    "pii": run_pii_stage,
}
