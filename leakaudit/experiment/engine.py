"""The engine: run every stage not finished with its current key (resuming the rest), record the run in
run.json, then write the report."""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from leakaudit import threads
from leakaudit.config import ConfigError, Experiment
from leakaudit.data.io import link_or_copy, open_lock, write_atomic, write_json
from leakaudit.errors import InputError, one_line
from leakaudit.experiment.checks import (
    check_plan,
    finetune_option_loc,
    option_key,
    prepare_out,
    resolve_models,
    stage_roles,
)
from leakaudit.experiment.manifest import (
    MARKERS,
    changed_output,
    drop_leftovers,
    is_done,
    older_split,
    output_manifest,
)
from leakaudit.experiment.plan import Plan, Stage, inside, remove_stale, stage_dir, stage_version
from leakaudit.experiment.stages import RUNNERS, StageContext, data_parallel, run_kind_stage
from leakaudit.kinds.base import ModelCache
from leakaudit.progress import say
from leakaudit.warn import warn_once

#: held by the run writing an output dir (engine.exclusive)
LOCK = ".lock"
#: top-level sections of an experiment file, whose key paths have a line in it
FILE_SECTIONS = ("models", "datasets", "generate", "finetune", "evaluate")


def reuse_stage(source: Path, stage_folder: str, key: str, out: Path, dest: Path) -> dict[str, Any] | None:
    """Copy a stage another run finished with the same key (a step with a fixed `seed`, shared by every seed's
    run) into `dest`; files are hard-linked where the file system allows. None when `source` lacks it."""
    src = source / stage_folder
    done = is_done(src, key)
    if done is None or src.resolve() == dest.resolve() or changed_output(src, done) is not None:
        return None
    if dest.exists() or dest.is_symlink():
        remove_stale(out, dest)  # the engine's one deleting path, which refuses anything outside --out
    # copied beside it, then renamed: a kill mid-copy never leaves a folder whose stage.json (often copied
    # first) says finished while its outputs are missing
    partial = inside(out, dest.with_name(dest.name + ".reusing"))
    if partial.exists() or partial.is_symlink():
        remove_stale(out, partial)
    # symbolic links are left out: leakaudit writes none, and one planted in the other run (pointing out of it)
    # was copied in as a link out of this run dir
    shutil.copytree(src, partial, copy_function=link_or_copy,
                    ignore=lambda folder, names: [n for n in names if (Path(folder) / n).is_symlink()])
    partial.rename(dest)
    return done


def _redone_input(deps: list[str], done: dict[str, Any], finished: dict[str, str | None]) -> str | None:
    """Why a finished stage is stale although its key is not: an input stage was run again with its key
    unchanged (its files were damaged) after this one read it, so this one read the old outputs. Each
    finish gets a `done_id`, and a stage records those of its inputs; stages from before either existed
    are not compared."""
    for d in deps:
        then, now = (done.get("inputs") or {}).get(d), finished.get(d)
        if then is not None and now is not None and then != now:
            return f"its input {d} was run again"
    return None


def run_plan(plan: Plan, out: Path, *, log: Callable[[str], None] = say,
             after_stage: Callable[[dict[str, str]], None] | None = None,
             reuse: Path | None = None, failures: dict[str, str] | None = None) -> dict[str, str]:
    """Run every stage not already finished with its current key (or finished with it in the run dir
    `reuse`, then copied). Returns stage id → 'ran' | 'cached' | 'reused'. A stage that fails is 'failed'
    (its one-line error in `failures`) for a last `after_stage` before the error goes on.

    Under a launcher (torchrun, accelerate launch) every process walks the plan: rank 0 alone decides what is
    cached, touches the stage folders and records each finish; fine-tunes and data-parallel kinds run on
    every process, every other stage on rank 0 alone (`distributed.alone`) while the others wait. The other
    processes read each stage's result from its stage.json, so the output dir must be one all of them see."""
    from leakaudit import distributed

    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    else:
        log = _quiet  # rank 0 tells the progress
    table = RUNNERS
    cache = ModelCache()  # the run's loaded models (a fresh one: models on disk may have been retrained)
    status: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    finished: dict[str, str | None] = {}  # stage id -> the done_id of the outputs this run uses
    n = len(plan.stages)
    for i, stage in enumerate(plan.stages.values(), start=1):
        sdir = stage_dir(out, stage)
        how = _settle(i, n, plan, stage, sdir, out, results, finished, status, log, after_stage, reuse) if main else ""
        if how in ("cached", "reused"):
            _rebase_adapters(plan, stage, sdir, out, results)
        if distributed.broadcast_int(int(how == "run")) == 0:  # cached or reused, as rank 0 found it
            if not main:
                results[stage.id] = _finished(sdir, stage)
            continue
        if (stage.kind, stage.params.get("kind")) != ("generate", "continuation"):
            from leakaudit.sampling import close_vllm_engines

            # a continuation stage's vLLM engine holds 90% of the GPU memory it found free; it is kept for the
            # next continuation stage only: every other stage (HF sampling, training, scoring) sizes its
            # batches to the memory that is free
            close_vllm_engines()
        if stage.kind == "finetune":
            cache.clear()  # free memory for training; nothing loaded so far is needed by it
        log(f"[{i}/{n}] {stage.id}: running ({stage.kind})")
        t0 = time.perf_counter()
        ctx = StageContext(stage, sdir, out, plan, results, cache)
        together = distributed.world()[1] == 1 or data_parallel(stage)
        if together or main:
            try:
                with nullcontext() if together else distributed.alone():
                    result = _run_stage(plan, stage, table, ctx)
            except Exception as exc:  # a kill (KeyboardInterrupt, SIGTERM) leaves it pending: it resumes
                if main and after_stage is not None:
                    status[stage.id] = "failed"  # not "pending": the record said so of a stage that had failed
                    if failures is not None:
                        failures[stage.id] = exc.format() if isinstance(exc, InputError) else one_line(exc)
                    after_stage(status)
                raise
        if main:
            seconds = round(time.perf_counter() - t0, 2)
            finished[stage.id] = uuid.uuid4().hex
            write_json(sdir / "stage.json", {"id": stage.id, "kind": stage.kind, "key": stage.key,
                                              "precision": default_precision(stage), "threads": threads.in_use(),
                                              "params": stage.params, "deps": stage.deps, "seconds": seconds,
                                              "result": result, "outputs": output_manifest(sdir),
                                              "done_id": finished[stage.id],
                                              "inputs": {d: finished.get(d) for d in stage.deps}})
            results[stage.id] = result
            status[stage.id] = "ran"
            log(f"[{i}/{n}] {stage.id}: done in {seconds:.1f}s")
            if after_stage is not None:
                after_stage(status)
        distributed.barrier()  # the others wait for rank 0's record (and for a stage it ran alone)
        if not main:
            results[stage.id] = _finished(sdir, stage)
    return status


def _rebase_adapters(plan: Plan, stage: Stage, sdir: Path, out: Path, results: dict[str, dict[str, Any]]) -> None:
    """Point a finished fine-tune of a fine-tune at this run's base. Its adapters name their base by absolute
    path (adapter_config.json, as PEFT reads it): copied from another run (`--reuse`), or in a run dir that was
    copied or moved, they named the other run's base, which may since have been retrained (scores then came
    from another model, silently) or deleted (every later run failed). Rewritten by replacing the file (a
    reused stage's files are hard links into the other run); the stage's record follows, so the stage stays
    cached."""
    import json

    from leakaudit.train.artifacts import base_reference

    base_sid = (stage.params.get("model") or {}).get("stage") if stage.kind == "finetune" else None
    if base_sid is None or "model_dir" not in results.get(base_sid, {}):
        return
    base = base_reference(str(out / plan.stages[base_sid].folder / results[base_sid]["model_dir"]))
    changed = False
    for cfg in sorted(sdir.rglob("adapter_config.json")):
        data = json.loads(cfg.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("base_model_name_or_path") not in (None, base):
            write_json(cfg, {**data, "base_model_name_or_path": base})
            changed = True
    record = is_done(sdir, stage.key) if changed else None  # the finish just settled: cached or reused
    if record is not None:
        write_json(sdir / "stage.json", {**record, "outputs": output_manifest(sdir)})


def _quiet(message: str) -> None:
    """The log of a process other than rank 0."""


def _settle(i: int, n: int, plan: Plan, stage: Stage, sdir: Path, out: Path, results: dict[str, dict[str, Any]],
            finished: dict[str, str | None], status: dict[str, str], log: Callable[[str], None],
            after_stage: Callable[[dict[str, str]], None] | None, reuse: Path | None) -> str:
    """'cached' (finished with its key, outputs intact, inputs the ones it read), 'reused' (copied from
    `reuse`) or 'run' (its folder made ready: an older version's or a damaged one's outputs removed)."""
    done = is_done(sdir, stage.key)
    if done is not None:
        stale = changed_output(sdir, done) or _redone_input(stage.deps, done, finished)
        stale = f"{stale} after the stage finished" if stale else (_other_precision(stage, done)
                                                                    or older_split(stage.kind, sdir))
        if stale is None:
            results[stage.id] = done["result"]
            finished[stage.id] = done.get("done_id")
            status[stage.id] = "cached"
            log(f"[{i}/{n}] {stage.id}: cached")
            return "cached"
        log(f"[{i}/{n}] {stage.id}: {stale}; running it again")
        remove_stale(out, sdir)
        if after_stage is not None:
            after_stage(status)  # run.json no longer lists its old result (the report must not read it)
    theirs = is_done(Path(reuse) / stage.folder, stage.key) if reuse is not None else None
    retold = None  # finished there under another compare_to: reused, then told this one's
    if reuse is not None and theirs is None:
        retold = _compare_to_record(plan, stage, Path(reuse) / stage.folder)
        theirs = retold
    if reuse is not None and theirs is None:
        _older_there(Path(reuse), stage)
    if (theirs is not None and _other_precision(stage, theirs) is None  # never a stage computed in another dtype
            and older_split(stage.kind, Path(reuse) / stage.folder) is None
            and _read_the_same(plan, stage, theirs, Path(reuse), out, finished)):
        done = reuse_stage(Path(reuse), stage.folder, stage.key if retold is None else retold["was"], out, sdir)
        if done is not None and retold is not None:
            done = _retell_compare_to(sdir, {k: v for k, v in retold.items() if k != "was"})
            write_json(sdir / "stage.json", done)  # replaced, not written through the hard link
            write_atomic(sdir / ".key", lambda fh, key=stage.key: fh.write(key))
        if done is not None:
            mine = {d: finished.get(d) for d in stage.deps}
            if (done.get("inputs") or {}) != mine and done.get("inputs") is not None:
                # this run's inputs, which hold what the other run's held: the next rerun finds it cached
                done = {**done, "inputs": mine}
                write_json(sdir / "stage.json", done)  # replaced, not written through the hard link
            results[stage.id] = done["result"]
            finished[stage.id] = done.get("done_id")
            status[stage.id] = "reused"
            log(f"[{i}/{n}] {stage.id}: reused from {reuse}")
            return "reused"
    keyfile = sdir / ".key"
    had = keyfile.read_text().strip() if sdir.exists() and keyfile.exists() else None  # the key it ran under
    if sdir.exists() and had != stage.key:
        if stage.older_key != stage.key and had == stage.older_key:
            log(f"[{i}/{n}] {stage.id}: {'finished' if is_done(sdir, stage.older_key) else 'started'} by an earlier "
                f"leakaudit, which may predate {stage.changed}; running it again")
        remove_stale(out, sdir)  # outputs of an older version of this stage: start clean
    sdir.mkdir(parents=True, exist_ok=True)
    drop_leftovers(sdir)  # a killed run's half-written files: they would be recorded as outputs
    keyfile.write_text(stage.key)
    return "run"


def _read_the_same(plan: Plan, stage: Stage, theirs: dict[str, Any], reuse: Path, out: Path,
                   finished: dict[str, str | None]) -> bool:
    """Whether the other run's stage read what this run's inputs hold: each input finished here as the one
    it read (the same finish, e.g. reused from there too), or finished on its own with the same outputs (a
    data step each run ran or cached). A reused stage recorded the other run's inputs, so the next plain rerun
    took them for redone inputs and ran it again."""
    for d in stage.deps:
        then, now = (theirs.get("inputs") or {}).get(d), finished.get(d)
        if then is None or now is None or then == now:
            continue
        dep = plan.stages[d]
        mine, other = is_done(out / dep.folder, dep.key), is_done(reuse / dep.folder, dep.key)
        if not (mine and other and mine.get("outputs") and mine.get("outputs") == other.get("outputs")):
            return False
    return True


def default_precision(stage: Stage) -> str | None:
    """The dtype a stage's models compute in by default (LEAKAUDIT_DTYPE, else what the hardware runs fast);
    None for a dataset step, which computes nothing. Recorded with each finish, not put in the keys: a
    machine's default would then rerun every run dir moved to another machine."""
    if stage.kind == "dataset":
        return None
    from leakaudit.models.dtype import resolve_device, resolve_dtype

    return str(resolve_dtype(None, resolve_device(None))).removeprefix("torch.")


def _other_precision(stage: Stage, done: dict[str, Any]) -> str | None:
    """Why a finished stage is stale: it computed in another precision than the one LEAKAUDIT_DTYPE asks this
    run for (a run asked for fp32 kept stages computed in bf16). Without LEAKAUDIT_DTYPE, this machine's
    default differing (a run dir moved from a CPU with fast bf16 to one without) keeps the stage, with a
    warning: the results are those of the machine that computed them. Records from before precision was
    recorded are not compared."""
    import os

    from leakaudit.models.dtype import DTYPE_ENV, _env_dtype

    then, now = done.get("precision"), default_precision(stage)
    if then is None or now is None or then == now:
        return None
    if _env_dtype() is None:
        warn_once(f"stages computed in {then} are kept, though this machine computes in {now} by default "
                  f"(set {DTYPE_ENV}={now.replace('bfloat16', 'bf16').replace('float32', 'fp32')} to recompute "
                  "them)")
        return None
    return f"it computed in {then} and {DTYPE_ENV}={os.environ.get(DTYPE_ENV)} asks for {now}"


def _finished(sdir: Path, stage: Stage) -> dict[str, Any]:
    """A stage's result as rank 0 recorded it (the other processes of a launched run read it here)."""
    done = is_done(sdir, stage.key)
    if done is None:
        raise InputError("rank 0 recorded no finish here; every process of a launched run must see the same "
                         "output dir (a shared file system)", file=sdir / "stage.json")
    return done["result"]


def _run_stage(plan: Plan, stage: Stage, table: dict[str, Callable[[StageContext], dict[str, Any]]],
               ctx: StageContext) -> dict[str, Any]:
    """Run one stage; an error names the stage and, where it can, the experiment file's key and line."""
    try:
        return table.get(stage.kind, run_kind_stage)(ctx)
    except ConfigError as exc:
        raise plan.exp.error(exc.loc, exc.message) from None
    except InputError as exc:  # say which stage, and map an API's --option to the experiment's key
        loc = finetune_option_loc(stage, exc.field) if stage.kind == "finetune" else None
        if loc is not None:  # a fine-tune's --option: its key and line in the file, and the data row it is about
            row = "" if exc.file is None else f" ({exc.file}" + ("" if exc.line is None else f":{exc.line}") + ")"
            raise plan.exp.error(loc, f"stage {stage.id}: {exc.message}{row}") from None
        if exc.file is not None:
            raise
        field = option_key(exc.field)
        if field in stage_roles(stage):  # a kind's input role (data, members, ...): its key in the file
            field = ".".join((*stage.origin, field))
        message = f"stage {stage.id}: {exc.message}"
        if field and field.split(".")[0] in FILE_SECTIONS:  # a key of the file: name its line too
            raise plan.exp.error(tuple(field.split(".")), message) from None
        raise InputError(message, file=plan.exp._file, field=field) from None


def _inside_out(obj: Any, out: Path, folders: tuple[str, ...] = ()) -> Any:
    """A stage result with the paths inside the run dir written relative to it (`finetune/none/model`): the
    record (and summary.json, made from it) then holds no machine's directory names and stays right when the
    run dir is moved or shared. A stage finished in another place — a run dir since moved or copied, or the
    run a `--reuse` took it from — recorded that place's paths: one into a copy of `folders` (the stage's and
    its inputs' folders) whose file this run dir holds is written as this run dir's (run.json named the other
    run's model and data as what this one's evaluation read, or a folder that no longer exists)."""
    prefix = f"{out}{os.sep}"
    if isinstance(obj, str):
        if obj.startswith(prefix):
            return obj[len(prefix):]
        return _moved(obj, out, folders) if folders and os.path.isabs(obj) else obj
    if isinstance(obj, dict):
        return {k: _inside_out(v, out, folders) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_inside_out(v, out, folders) for v in obj]
    return obj


def _moved(path: str, out: Path, folders: tuple[str, ...]) -> str:
    """`path`, another place's copy of one of this run's stage `folders` (`/old/run/finetune/real/model`), as
    the same file here (`finetune/real/model`) when this run dir holds it; else `path` itself."""
    posix = path.replace(os.sep, "/")
    for folder in folders:
        at = posix.find(f"/{folder}")
        while at >= 0:
            end = at + 1 + len(folder)
            if end == len(posix) or posix[end] == "/":
                rel = posix[at + 1:]
                if (out / rel).exists():
                    return rel
            at = posix.find(f"/{folder}", at + 1)
    return path


def write_run_record(plan: Plan, out: Path, config_text: str, status: dict[str, str],
                     failures: dict[str, str] | None = None) -> Path:
    """`run.json`: the exact configuration, versions and every stage's result (what the report reads), and
    the error of a stage that failed."""
    stages = []
    for stage in plan.stages.values():
        done = is_done(out / stage.folder, stage.key)
        version = stage_version(stage)[0]
        stages.append({"id": stage.id, "kind": stage.kind, "folder": stage.folder, "key": stage.key,
                       **({"version": version} if version > 1 else {}), "params": stage.params,
                       "status": status.get(stage.id, "done" if done else "pending"),
                       "seconds": done["seconds"] if done else None,
                       **({"precision": done["precision"]} if done and done.get("precision") else {}),
                       **({"threads": done["threads"]} if done and done.get("threads") else {}),
                       "result": _inside_out(done["result"], out, (stage.folder, *(
                           plan.stages[d].folder for d in stage.deps if d in plan.stages))) if done else None,
                       **({"error": _inside_out(failures[stage.id], out)} if failures and stage.id in failures else {})})
    record = {"experiment": plan.exp.model_dump(mode="json"), "config_text": config_text,
              "versions": versions(), "stages": stages}
    if not plan.exp.report.show_pii:  # the stage folder stays as on disk: the report opens it
        from leakaudit.data.pii_find import name_finder
        from leakaudit.data.pii_mask import grid_numbers, mask_labels, mask_obj, mask_yaml_text
        names = name_finder(plan.exp.report.mask_names)
        labels = mask_labels([x for st in plan.stages.values() for x in (
            st.id, st.params.get("target_label"), st.params.get("evaluation")) if isinstance(x, str)], names,
            grid_numbers(record["experiment"]))
        record = mask_obj({**record, "config_text": mask_yaml_text(config_text, names)}, names,
                          keep={"folder", "config_text", "mask_names"}, labels=labels)  # a path the report opens
    write_json(out / "run.json", record)
    return out / "run.json"


def versions() -> dict[str, str]:
    """Versions of leakaudit and the libraries that change the numbers, and of the package holding the model
    spec `default` (the report named a target "default" and nothing said which weights that was)."""
    import platform

    from leakaudit import package_version
    from leakaudit.models.gguf import DEFAULT_DISTRIBUTION

    out = {"python": platform.python_version()}
    for pkg in ("leakaudit", "torch", "transformers", "peft", "tokenizers", "numpy", "scikit-learn", "vllm",
                DEFAULT_DISTRIBUTION):
        out[pkg] = package_version(pkg)
    return out


def run_experiment(exp: Experiment, out: str | Path, *, config_text: str | None = None,
                   log: Callable[[str], None] = say, report: bool = True,
                   reuse: str | Path | None = None) -> dict[str, str]:
    """Plan, check everything that can be checked without running a stage (options, model specs, the
    output dir), then run (resuming), record and report an experiment. `exp` comes from
    `leakaudit.config.parse_experiment` (YAML text or a dict) or `load_experiment` (a file); `config_text`, the
    text run.json and the report quote, defaults to the text it was parsed from. Returns stage id -> 'ran',
    'cached' or 'reused'; the results are under `out` (`leakaudit.report.html.load_run`, summary.json)."""
    from leakaudit import distributed

    if not isinstance(exp, Experiment):  # YAML text or a path failed on "'str' object has no attribute ..."
        raise TypeError(f"exp: expected an Experiment (leakaudit.config.parse_experiment(text or dict), "
                        f"load_experiment(path)), got {type(exp).__name__}")
    if config_text is None:
        config_text = exp._text

    # absolute: a path a stage records does not depend on the directory the run was started from (run.json
    # writes those inside `out` relative to it)
    out = Path(os.path.abspath(out))
    main = distributed.is_main()
    plan = Plan(exp)
    distributed.join()  # before rank 0 checks: its failure then ends the others' wait at once
    if not main:  # under a launcher rank 0 checks first: one error line, and a model converted once
        distributed.barrier()
    check_plan(plan, (out, Path(reuse) if reuse is not None else None))
    resolve_models(plan)
    if reuse is not None and not (Path(reuse) / "run.json").is_file():
        raise InputError("not a run dir (no run.json)", file=reuse, field="--reuse")
    if main:
        prepare_out(plan, out)
    with exclusive(out) if main else nullcontext():
        if main:
            adopt_earlier_keys(plan, out)
            adopt_compare_to(plan, out, log)
            distributed.barrier()
            write_run_record(plan, out, config_text, {})  # so `leakaudit report` works on a run in progress
            for stale in ("summary.json", "report.html"):  # an earlier run's numbers: written again at the end
                (out / stale).unlink(missing_ok=True)
        failures: dict[str, str] = {}
        status = run_plan(plan, out, log=log,
                          after_stage=lambda st: write_run_record(plan, out, config_text, st, failures),
                          reuse=Path(reuse) if reuse is not None else None, failures=failures)
        if main:
            write_run_record(plan, out, config_text, status)
            if report:
                from leakaudit.report.html import write_report

                path = write_report(out)  # relative to the working directory when inside it, as --out is
                log(f"report: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return status


def adopt_earlier_keys(plan: Plan, out: Path) -> None:
    """Stages this run dir finished under the key they had before data files entered keys by name (plan's
    `earlier_key`) take the key they have now: the same inputs, so cached, not run again."""
    for stage in plan.stages.values():
        if stage.earlier_key == stage.key or stage.older_key != stage.key:  # not adopted where results changed since
            continue
        sdir = out / stage.folder
        record = is_done(sdir, stage.earlier_key) if is_done(sdir, stage.key) is None else None
        if record is not None:
            write_json(sdir / "stage.json", {**record, "key": stage.key})  # replaced, never written through a link
        keyfile = sdir / ".key"
        if keyfile.is_file() and keyfile.read_text().strip() == stage.earlier_key:  # also a stage in progress:
            write_atomic(keyfile, lambda fh, key=stage.key: fh.write(key))      # it resumes, not starts clean


def _compare_to_record(plan: Plan, stage: Stage, sdir: Path) -> dict[str, Any] | None:
    """The record of a stage finished in `sdir` under the key it has with another `compare_to`
    (plan.compare_to_keys), rewritten for this one: its key, parameters and result's `compare_to`, and the key
    it was finished under as `was`. None when there is none (or it is finished with its own key)."""
    import json

    marker = sdir / "stage.json"
    if not marker.is_file() or is_done(sdir, stage.key) is not None:
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    recorded = ((record.get("params") or {}).get("options") or {}) if isinstance(record.get("params"), dict) else {}
    keys = plan.compare_to_keys(stage, also=recorded.get("compare_to") if isinstance(recorded, dict) else None)
    if record.get("key") not in keys or changed_output(sdir, record) is not None:
        return None  # a stage whose files changed since is not taken over: it runs again
    now = (stage.params.get("options") or {}).get("compare_to")
    result = record.get("result")
    if isinstance(result, dict) and "compare_to" in result:  # user inference and backdoor keep it in theirs
        result = {**result, "compare_to": now}
    return {**record, "key": stage.key, "params": stage.params, "result": result, "was": record["key"]}


def _retell_compare_to(sdir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """A stage's own JSON files that name the `compare_to` it ran with (user_inference.json) say the one it is
    adopted under; its record's manifest follows. Files are replaced, never written through: a reused stage's
    are hard links into the other run."""
    import json

    now = (record.get("params", {}).get("options") or {}).get("compare_to")
    changed = False
    for f in sorted(sdir.glob("*.json")):
        if f.name in MARKERS:
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "compare_to" in data and data["compare_to"] != now:
            write_json(f, {**data, "compare_to": now})
            changed = True
    return {**record, "outputs": output_manifest(sdir)} if changed and record.get("outputs") is not None else record


def adopt_compare_to(plan: Plan, out: Path, log: Callable[[str], None] = say) -> None:
    """Evaluation stages finished (or started) here under another `compare_to` take this one's key: that option
    only picks the target the report compares the others with, so their samples and scores stand. Editing it
    sampled every PII target and scored every text again."""
    kept: dict[str, list[str]] = {}  # evaluation -> the stages kept, said in one line each
    for stage in plan.stages.values():
        sdir = out / stage.folder
        record = _compare_to_record(plan, stage, sdir)
        if record is not None:
            record.pop("was")
            write_json(sdir / "stage.json", _retell_compare_to(sdir, record))  # replaced, never through a link
            kept.setdefault(str(stage.params.get("evaluation")), []).append(stage.id)
        keyfile = sdir / ".key"
        if keyfile.is_file() and is_done(sdir, stage.key) is None:  # a stage in progress: it resumes
            had = keyfile.read_text().strip()
            if had != stage.key and had in plan.compare_to_keys(stage):
                write_atomic(keyfile, lambda fh, key=stage.key: fh.write(key))
        elif record is not None:
            write_atomic(keyfile, lambda fh, key=stage.key: fh.write(key))
    for evaluation, ids in kept.items():
        log(f"evaluate/{evaluation}: compare_to changed, which changes none of its results: {len(ids)} finished "
            f"stage(s) kept")


def _older_there(reuse: Path, stage: Stage) -> None:
    """Say why a --reuse dir finished by an earlier leakaudit offers nothing: its records hold the earlier keys
    until a plain run of it takes the current ones (every stage cached)."""
    if stage.older_key != stage.key and is_done(reuse / stage.folder, stage.older_key) is not None:
        warn_once(f"{reuse}: {stage.id} was finished by an earlier leakaudit, which may predate {stage.changed}; "
                  "not reused (it runs here)")
    elif stage.earlier_key != stage.key and is_done(reuse / stage.folder, stage.earlier_key) is not None:
        warn_once(f"{reuse}: finished by an earlier leakaudit, so its stages are not reused; `leakaudit run` "
                  f"with its experiment and --out {reuse} updates it (every stage cached), then reuse it")


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold `out/.lock` for the run: a second `leakaudit run` on the same dir trained into the same folders at
    once (interleaved train logs, stages overwritten under the first) and both exited 0. The lock is the
    kernel's (flock), so a killed run never leaves it held."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    with os.fdopen(open_lock(out / LOCK, os.O_RDWR), "r+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise InputError(f"another leakaudit run (pid {holder}) is using this output dir; wait for it to "
                             "end, or use another --out", file=out, field="--out") from None
        except OSError as exc:  # a file system without locks (NFS without lockd, Lustre without -o flock)
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            warn_once(f"{out}: the file system has no locks ({exc.strerror}); nothing stops a second run "
                      "from writing into this output dir at the same time")
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
