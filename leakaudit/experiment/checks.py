"""Checks before any stage runs: every option against its kind's typed options (FILE:LINE and key path), every
model spec resolved, the output dir writable. What a newcomer's typo meets in the first second."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from leakaudit.config import ConfigError, pydantic_message
from leakaudit.errors import InputError, OptionError
from leakaudit.experiment.plan import Plan, Stage, local_adapter_base, named_models, stage_dir, trained_by_all
from leakaudit.kinds.base import DATA_ROLES, MODEL_ROLES
from leakaudit.options import NAMED_MODELS


def check_plan(plan: Plan, runs: tuple[Path | None, ...] = ()) -> None:
    """Fail before any work if a stage kind is not available, or an option is unknown to its API or has a
    value the API would refuse; the error names the experiment file, line and key path. `runs`: the output
    dir (and --reuse dir): a fine-tune finished there with its key is not checked against this machine (an
    FSDP stage trained on GPUs stays usable on a CPU)."""
    from leakaudit.experiment.manifest import is_done

    for stage in plan.stages.values():
        try:
            if stage.kind == "finetune":
                config = per_process(_finetune_config(stage, "-"), stage)
                _check_training_fields(plan, stage, config)
                _check_dp_settings(stage, config)
                if config.fsdp and not any(run is not None and is_done(run / stage.folder, key) is not None
                                           for run in runs for key in (stage.key, stage.earlier_key)):
                    # refused on a CPU (and with DP-SGD, PiSSA); a stage finished under its earlier key is
                    # adopted after these checks
                    _check_engine(stage, config)
                base = plan.stages.get(stage.params["model"].get("stage", ""))
                if base is not None and base.kind == "finetune" and base.params["method"] != "full":
                    # it would fail only when this stage runs, after every stage before it
                    raise ConfigError((*stage.origin, "model"), f"starts from '{base.origin[1]}', a "
                                      f"{base.params['method']} adapter; fine-tuning starts from a full model "
                                      "(fine-tune that one with method: full, or merge it first)")
            elif stage.kind != "dataset":
                options = stage_options(stage)  # validated once, read by every check below
                _check_field_options(plan, stage, options)
                _check_query_fields(plan, stage, options)
                _check_chat_rows(plan, stage, options)
                _check_users(plan, stage)
                _check_option_files(stage, options)
                _check_window(plan, stage, options)
                _check_backend(stage, options)
                if stage.params.get("members") is not None and stage.params.get("members") == stage.params.get(
                        "nonmembers"):  # it ran the whole study to an AUC of 0.5 and a warning inside mia.json
                    raise ConfigError((*stage.origin, "nonmembers"), "names the same data as members: an attack "
                                      "cannot tell a set from itself")
        except ConfigError as exc:
            value = _option_value(stage.params.get("options") or {}, exc.loc)
            raise plan.exp.error(exc.loc, exc.message + _beside_file_hint(plan, value)) from None
    _check_compare_to(plan)
    _check_mask_names(plan)


def _check_backend(stage: Stage, options: dict[str, Any]) -> None:
    """`backend: vllm` where vLLM cannot run failed only when its stage was reached, after the stages before it
    (and its message named the command line's --backend)."""
    if options.get("backend") != "vllm":
        return
    from leakaudit.sampling import vllm_missing

    missing = vllm_missing()
    if missing is not None:
        raise ConfigError(_option_loc(stage, "backend"), f"{missing}: use backend: hf, or auto (vLLM where it "
                          "can run, else hf)")


def _option_value(options: dict[str, Any], loc: tuple[Any, ...]) -> Any:
    """The option value an error's key path names (`attack_options.dc_pdd.corpus` too, not only top-level
    keys): the value a relative-path hint is about."""
    for start in range(len(loc)):  # the path inside the options, after the file's own keys
        value: Any = options
        for key in loc[start:]:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _beside_file_hint(plan: Plan, value: Any) -> str:
    """Local models and option files are read from the working directory (data paths from the experiment
    file's folder): when a path that is missing here exists beside the file, say so. They are not rewritten,
    since stage keys hold them as written."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute() or Path(value).exists():
        return ""
    try:
        beside = (Path(plan.exp._file).parent / value).exists()
    except (OSError, ValueError):
        return ""
    return (f" ('{value}' exists beside the experiment file, but a model's or an option's relative path is the "
            "working directory's: run from the file's folder or write the full path)") if beside else ""


def _check_compare_to(plan: Plan) -> None:
    """`compare_to` must name a target of its evaluation (a model, or one variant of a grid fine-tune): a name
    that is none ran the whole study and left only a note in the report, no comparison."""
    for name, e in plan.exp.evaluate.items():
        labels = [label for target in e.targets for label, _ in plan.model_refs(target)]
        for key, value in (("options", e.options.get("compare_to")), *(("grid", v) for v in e.grid.get("compare_to", []))):
            if value is not None and value not in labels:
                loc = ("evaluate", name, "options", "compare_to") if key == "options" else ("evaluate", name, "grid")
                raise plan.exp.error(loc, f"'{value}' is not a target of this evaluation; its targets are "
                                          f"{', '.join(labels)}")


def resolve_models(plan: Plan) -> None:
    """Resolve every model spec of the `models` section (and an adapter's base) before any stage runs, so a
    typo or a model that is not available fails in the first second, not after the data stage. Each spec is
    resolved once (tiny and default models are converted on first use, then found in the cache)."""
    from leakaudit.models import resolve_spec
    from leakaudit.models.spec import adapter_base, check_model_dir

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
                if kind == "dir":  # its config, tokenizer and weight files (headers only): not at its first stage
                    check_model_dir(Path(where), allow_pickle=False)
                if kind == "adapter":  # its config and weights file, as loading checks them, then its base
                    todo.append(adapter_base(Path(where), allow_pickle=False))
            except InputError as exc:
                what = f"model '{one}'" if one == spec else f"base model '{one}' of '{spec}'"
                raise plan.exp.error(("models", name), f"{what}: {exc.message}{_beside_file_hint(plan, one)}") from None
            except (OSError, ValueError) as exc:
                raise plan.exp.error(("models", name), f"model '{one}': {exc}") from None


def prepare_out(plan: Plan, out: Path) -> None:
    """Create the output dir and make sure every stage folder can be written inside it, before any stage
    runs: an unwritable --out, a file where a folder is needed or a link out of it fails here."""
    from leakaudit.outputs import require_utf8

    require_utf8(out)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a directory", file=out, field="--out")
    if out.is_dir() and not (out / "run.json").exists() and any(p.name not in (".lock", ".report.lock") for p in out.iterdir()):
        # `--out /`, a home folder or the experiment's own folder: stages would write among unrelated files
        raise InputError("holds files and is not a leakaudit run (no run.json); use a new or empty folder",
                         file=out, field="--out")
    if (out / "run.json").exists():  # stale stage folders of the run there get deleted: it must be this one's
        _check_earlier_run(out / "run.json", plan.exp.name, plan.exp.seed)
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


def _check_earlier_run(record: Path, name: str, seed: int) -> None:
    """`--out` may hold an earlier run of this experiment (edited: its stale stages are replaced); a run.json
    that is not a leakaudit run record (report.html's `load_run` reads it), or one of another experiment, is
    refused before anything is deleted."""
    from leakaudit.data.pii_mask import mask_pii
    from leakaudit.report.html import load_run

    try:
        experiment = load_run(record.parent)["experiment"]
    except InputError:
        experiment = {}
    earlier = experiment.get("name")
    if not isinstance(earlier, str):
        raise InputError("holds a run.json that is not a leakaudit run record; use a new or empty folder",
                         file=record.parent, field="--out")
    if earlier not in (name, mask_pii(name)):  # run.json is masked: a digit run in a name may read as a phone
        raise InputError(f"holds a run of experiment '{earlier}', not '{name}': rerunning here would replace its "
                         "stages; use a new folder (--reuse it to copy the stages they share)",
                         file=record.parent, field="--out")
    earlier_seed = experiment.get("seed")
    if isinstance(earlier_seed, int) and earlier_seed != seed:  # `run --seed 3` over seed 0's dir replaced it
        raise InputError(f"holds the run of seed {earlier_seed}, not {seed}: one output dir per seed (`leakaudit "
                         "seeds` compares them), and rerunning here would replace it; use a new folder (--reuse it "
                         "to copy the stages they share), or delete it to replace it",
                         file=record.parent, field="--out")


def _option_loc(stage: Stage, key: Any, section: str = "options", *sub: Any) -> tuple[Any, ...]:
    """The key path of a stage option in the file: under `grid` when the variant's value came from there."""
    kind, name = stage.origin
    if key in stage.overrides:
        return (kind, name, "grid", key)
    return (kind, name, section, key, *sub)


def per_process(config: Any, stage: Stage) -> Any:
    """An experiment's `batch_size` x `gradient_accumulation` is the batch of one optimizer step, however many
    processes a launcher started: the file's numbers of examples per step and of steps hold. Each of W
    processes takes batch_size / W examples a step; where batch_size is no multiple of W, fewer at a time and
    more accumulation steps. (The training is still not exactly one process's, so the number of processes
    is in the stage key: plan.Plan._add.)"""
    from leakaudit.distributed import world

    size = world()[1]
    total = config.batch_size * config.gradient_accumulation
    if size == 1 or not trained_by_all(stage):  # DP-SGD: one process (rank 0 alone)
        return config
    if total % size:
        raise ConfigError(_option_loc(stage, "batch_size", "options"),
                          f"batch_size x gradient_accumulation = {total} examples per optimizer step cannot be "
                          f"shared by the {size} processes the launcher started; make it a multiple of {size}")
    accumulation = next(a for a in range(1, total + 1)
                        if total % (a * size) == 0 and total // (a * size) <= config.batch_size)
    return config.model_copy(update={"batch_size": total // (accumulation * size),
                                     "gradient_accumulation": accumulation})


def _check_engine(stage: Stage, config: Any) -> None:
    """The fine-tune's own check of its engine (FSDP needs GPUs ...), with the option's line in the file."""
    from leakaudit.train.finetune import _check_engine as check

    try:
        check(config)
    except InputError as exc:
        raise ConfigError(finetune_option_loc(stage, exc.field), exc.message) from None


def option_key(field: str | None) -> str | None:
    """The experiment file's key for a command-line option an error names (`--max-length` → max_length);
    any other field as it is."""
    return field[2:].replace("-", "_") if field and field.startswith("--") else field


def _dataset_read(plan: Plan, ref: Any) -> tuple[str, Any]:
    """(name, entry) of the `datasets` entry a stage's data role reads; ("", None) for a generate step's data
    or a role not given."""
    if not (isinstance(ref, list) and ref and str(ref[0]).startswith("data/")):
        return "", None
    name = ref[0].split("/", 1)[1]
    return name, plan.exp.datasets[name]


def _renamed_fields(ds: Any) -> dict[str, str]:
    """A data file's fields the dataset step writes under another name (its text_field as `text`, id_field as
    `id`, user_field as `user`): source name -> the name its rows hold."""
    return {f: to for f, to in ((ds.text_field, "text"), (ds.id_field, "id"), (ds.user_field, "user"))
            if f is not None and f != to}


def _check_field_options(plan: Plan, stage: Stage, options: dict[str, Any]) -> None:
    """A `query_field`/`response_field` (or replace-pii's `text_field`) naming the field a dataset reads as its
    text (id, user): the dataset step writes that field as `text` (`id`, `user`), so the stage would fail on its
    first row ("no query field") in a file of the run dir. Said here, at the option's line. `options`: the
    stage's options as its kind validated them (replace-pii's text_field already a list)."""
    name, ds = _dataset_read(plan, stage.params.get("data"))
    if ds is None or ds.builtin is not None:  # built-in rows keep their own fields (query, response)
        return
    renamed = _renamed_fields(ds)
    for key in ("query_field", "response_field", "text_field"):  # replace-pii's text_field: fields to rewrite
        value = options.get(key)
        for field in [value] if isinstance(value, str) else value or []:
            if field in renamed:
                to = renamed[field]
                raise ConfigError(_option_loc(stage, key), f"datasets.{name} reads '{field}' as its {to} field, "
                                  f"and its rows hold it as '{to}': use {key}: {to}")


def _check_query_fields(plan: Plan, stage: Stage, options: dict[str, Any]) -> None:
    """A backdoor evaluation's `query_field` (a backdoor-mix's `query_field`/`response_field`) is read from each
    row of its data: one its data file's first row lacks failed only when the stage ran, after the fine-tunes
    before it, naming the run dir's copy of the data. The dataset step's rows hold `text` and `id` whatever the
    file holds (`user` with a user_field); a renamed field is `_check_field_options`' to say."""
    if _option_kind(stage) not in ("backdoor", "backdoor-mix"):
        return
    name, ds, line, first = _first_source_row(plan, stage.params.get("data"))
    if first is None:
        return
    held = {"text", "id", *(["user"] if ds.user_field else []), *(set(first) - {"id", "user"})}
    for key in ("query_field", "response_field"):
        field = options.get(key)
        if field and field not in held:
            raise ConfigError(_option_loc(stage, key), f"datasets.{name} ({ds.path}, line {line}) has no field "
                              f"'{field}' (its rows hold: {', '.join(sorted(held))})")


#: what the checks read from files they found good in this process, by path, kind of file, size and mtime
_read_files: dict[tuple[Any, ...], Any] = {}


def _check_option_files(stage: Stage, options: dict[str, Any]) -> None:
    """Read the files a stage's options name (PII pairs, dc_pdd's corpus, backdoor words) the way the stage
    will: a bad row in them failed only when the stage ran, after every fine-tune before it. The error keeps
    the file's own line and field."""
    from leakaudit.data.io import load_records

    checks: list[tuple[str, Any, Any]] = []
    if stage.kind in ("pii", "pii-logprob") and options.get("pairs"):
        from leakaudit.data.enron import load_targets

        checks.append(("pairs", options["pairs"], load_targets))
    if stage.kind == "backdoor" and options.get("words_file"):
        from leakaudit.data.backdoor import load_words

        checks.append(("words_file", options["words_file"], load_words))
    if _option_kind(stage) == "backdoor-mix" and options.get("refusal_words"):
        from leakaudit.data.backdoor import load_words

        checks.append(("refusal_words", options["refusal_words"], load_words))
    corpus = ((options.get("attack_options") or {}).get("dc_pdd") or {}).get("corpus") if stage.kind == "mia" else None
    if isinstance(corpus, str):
        from leakaudit.attacks.mia import corpus_file

        path = corpus_file(corpus)
        if path is not None and corpus != "enron":
            checks.append(("corpus", str(path), load_records))
    for what, path, read in checks:
        content = _read_once(path, what, read)  # an InputError names the file, its line and field
        if content is None:
            continue  # missing: the options' own check says so
        if what == "pairs" and stage.kind == "pii":
            _check_demos(stage, options, content)
        if what in ("words_file", "refusal_words") and not content:  # else found only when its stage ran
            raise ConfigError(_option_loc(stage, what), f"{path} holds no word (letters)")


def _read_once(path: Any, what: str, read: Any) -> Any:
    """`read(path)`, once per process for a file as it is now (by path, size and mtime): stages that share a
    file (seven fine-tunes of one dataset) do not read it seven times. None when it cannot be found."""
    try:
        st = Path(path).expanduser().stat()
    except OSError:
        return None
    seen = (str(path), what, st.st_size, st.st_mtime_ns)
    if seen not in _read_files:
        _read_files[seen] = read(path)
    return _read_files[seen]


def _check_demos(stage: Stage, options: dict[str, Any], targets: list[Any]) -> None:
    """A k-shot template needs each target's demonstrations (`demos` in the pairs rows): with none in the whole
    file the stage failed on its first target, after the fine-tunes."""
    from leakaudit.data.enron import PIL_K_SHOT, resolve_templates

    for template in resolve_templates(options.get("templates") or "fake-privacy"):
        if template.name in PIL_K_SHOT and not any(t.demos.get(template.name) for t in targets):
            raise ConfigError(_option_loc(stage, "templates"), f"template '{template.name}' needs k-shot "
                              f"demonstrations, and no row of {options['pairs']} has `demos`")


def _check_training_fields(plan: Plan, stage: Stage, config: Any) -> None:
    """A fine-tune with format instruction or chat reads its fields (prompt/response, messages) from each row."""
    need = {"instruction": [config.prompt_field, config.response_field], "chat": [config.messages_field]}.get(
        config.format, [])
    _check_first_row(plan, stage, stage.params["data"], need, config.format, "format")


def _check_dp_settings(stage: Stage, config: Any) -> None:
    """DP-SGD's other settings (under `defenses` or `options`) without `dp_epsilon` trained with no DP at all,
    in silence: an arm named for DP was undefended (the command refuses `--dp-delta` without `--dp-epsilon`). A
    grid over `dp_epsilon` with a null value (a no-DP arm beside the DP ones) keeps them shared on purpose."""
    if config.dp_epsilon is not None or "dp_epsilon" in stage.overrides:
        return
    for section in ("defenses", "options"):
        for key in ("dp_delta", "dp_max_grad_norm"):
            if key in (stage.params[section] or {}) and key not in stage.overrides:
                raise ConfigError(_option_loc(stage, key, section), "applies only with dp_epsilon (DP-SGD); "
                                  "without it this fine-tune trains with no differential privacy: set dp_epsilon, "
                                  "or drop it")


def _check_chat_rows(plan: Plan, stage: Stage, options: dict[str, Any]) -> None:
    """An evaluation with format chat (mia, user-inference, perplexity) reads its `messages_field` from each row
    of its data, as a fine-tune does."""
    if options.get("format") != "chat":
        return
    field = options.get("messages_field") or "messages"
    key = "messages_field" if "messages_field" in (stage.params.get("options") or {}) else "format"
    for role in ("members", "nonmembers", "data"):
        _check_first_row(plan, stage, stage.params.get(role), [field], "chat", key)


def _first_source_row(plan: Plan, source: Any) -> tuple[str, Any, int, dict[str, Any] | None]:
    """(name, entry, line, row) of the first row of the data file the dataset `source` names; row None for a
    built-in or generated source (its fields are known when it runs) or a file whose first row is no object
    (the data step says what is wrong with it)."""
    name, ds = _dataset_read(plan, source)
    if ds is None or ds.path is None:
        return name, ds, 0, None
    from leakaudit.data.io import read_rows

    rows = _read_once(Path(ds.path).expanduser(), "rows", read_rows)
    if not rows or not isinstance(rows[0][1], dict):
        return name, ds, 0, None
    return name, ds, *rows[0]


def _check_first_row(plan: Plan, stage: Stage, source: Any, fields: list[str], data_format: str, key: str) -> None:
    """`fields` are in the first row of the dataset `source` names: a data file without them failed when the stage
    ran, after every stage before it, naming the run dir's copy of the data. Refused at the option `key`."""
    if not fields:  # a plain fine-tune reads no field of its own: its file is not read here
        return
    name, ds, line, first = _first_source_row(plan, source)
    if first is None:
        return
    renamed = _renamed_fields(ds)
    for field in fields:
        top = field.split(".")[0]
        if top not in first or top in renamed:
            raise ConfigError(_option_loc(stage, key), f"format: {data_format} reads '{field}' from each row, and "
                              f"datasets.{name} ({ds.path}, line {line}) has "
                              + ("it as its own " + renamed[top] if top in renamed
                                 else f"no such field (it has: {', '.join(sorted(first))})"))


def _check_window(plan: Plan, stage: Stage, options: dict[str, Any]) -> None:
    """`max_new_tokens` at least the sampled model's context window: refused when the stage ran, after every
    fine-tune before it. The window is read from the model's config.json (the base of a fine-tune's chain);
    hub and random models are left to the stage."""
    n = options.get("max_new_tokens")
    if not isinstance(n, int):
        return
    param = stage.params.get("target" if stage.origin[0] == "evaluate" else "model")
    for _ in range(len(plan.stages)):  # a fine-tune's model: the stage it starts from, down to a spec
        if not isinstance(param, dict) or "stage" not in param:
            break
        param = plan.stages[param["stage"]].params.get("model")
    spec = param.get("spec") if isinstance(param, dict) else None
    window = _config_window(spec.split("#", 1)[0]) if isinstance(spec, str) else None
    if window is not None and n >= window:
        raise ConfigError(_option_loc(stage, "max_new_tokens"),
                          f"{n} new tokens do not fit the model's context of {window} tokens")


@functools.cache
def _config_window(spec: str) -> int | None:
    """The context window a local model's (or an adapter's base's) config.json gives; None where it does not."""
    from leakaudit.models import resolve_spec
    from leakaudit.models.spec import context_window

    try:
        kind, where = resolve_spec(spec)
        if kind == "adapter":  # its base's window (a hub base: left to the stage)
            base = local_adapter_base(Path(where))
            return _config_window(base) if base is not None else None
        if kind != "dir":
            return None
        cfg = json.loads((Path(where) / "config.json").read_text())
    except (InputError, OSError, ValueError):
        return None  # the model checks say what is wrong with it
    return context_window(cfg) if isinstance(cfg, dict) else None


def _check_users(plan: Plan, stage: Stage) -> None:
    """User inference groups rows by user: a data file read without `user_field` gives its rows no user (the
    dataset step writes `text`, `id` and `user` from the fields it maps), which failed on the stage's first
    row, after every stage before it. Said here, at the evaluation's data role."""
    if stage.kind != "user-inference":
        return
    for role in DATA_ROLES:
        name, ds = _dataset_read(plan, stage.params.get(role))
        if ds is not None and ds.builtin is None and ds.user_field is None:
            raise ConfigError((*stage.origin, role), f"user inference needs each row's user, and datasets.{name} "
                              "reads none: set its user_field (the column that names each row's user)")


def _check_mask_names(plan: Plan) -> None:
    """`report.mask_names` read before any stage: a missing or unreadable list would otherwise fail only when
    run.json is first written, or leave a report that was meant to hide those names."""
    from leakaudit.data.pii_mask import mask_names_in_messages

    names = plan.exp.report.mask_names
    if names is not None:
        p = Path(names).expanduser()
        if not p.is_file():
            raise plan.exp.error(("report", "mask_names"), f"name list not found: {names}")
        # absolute (a file given through the Python API is relative to the working directory): `leakaudit
        # report` reads it from run.json wherever it runs
        plan.exp.report.mask_names = str(p.resolve())
        from leakaudit.data.pii_find import load_name_list
        from leakaudit.warn import warn_if_no_names

        warn_if_no_names(load_name_list(p), names)
    mask_names_in_messages(plan.exp.report.mask_names)  # a bad line: an error naming the list's file and line


def finetune_option_loc(stage: Stage, field: str | None) -> tuple[Any, ...] | None:
    """The key path of the fine-tune option an error of `finetune` names (`--fsdp` → finetune.NAME.options.fsdp,
    or its grid when the variant's value came from there); None when it names no option (an environment
    variable, a data column)."""
    from leakaudit.train.finetune import FinetuneConfig

    if not field or not field.startswith("--"):
        return None
    key = option_key(field)
    if key not in FinetuneConfig.model_fields or key == "out":
        return None
    if key in stage.overrides:
        return (*stage.origin, "grid")
    if key in ("model", "data", "method"):  # the step's own keys
        return (*stage.origin, key)
    section = "defenses" if key in stage.params["defenses"] else "options"
    return _option_loc(stage, key, section)


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
    names = NAMED_MODELS.set(frozenset(named_models(stage)))  # resolved by the plan, after their fine-tunes
    try:
        registered.check(model.model_validate(raw), stage_roles(stage))
    except OptionError as exc:
        key, *sub = exc.loc
        raise ConfigError(_option_loc(stage, key, "options", *sub), exc.message) from None
    finally:
        NAMED_MODELS.reset(names)
    return opts


def _registered(kind: str) -> Any:
    """The registered kind (leakaudit.kinds) of a generate or evaluate stage."""
    from leakaudit.kinds import get_kind

    try:
        return get_kind(kind)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def stage_roles(stage: Stage) -> set[str]:
    """The data and model roles an evaluation stage was given (members, reference, ...)."""
    return {r for r in (*DATA_ROLES, *MODEL_ROLES)
            if stage.params.get(r) is not None}


def _finetune_config(stage: Stage, out: str) -> Any:
    """The FinetuneConfig of a variant: options and defenses are its fields (validated by it)."""
    from pydantic import ValidationError

    from leakaudit.train.finetune import FinetuneConfig as config_cls
    p = stage.params
    fields = {**p["options"], **p["defenses"]}
    for key in ("model", "data", "method", "out"):  # the step's own keys (and --out): FinetuneConfig raised a
        if key in fields:                            # TypeError for a value given twice
            section = "defenses" if key in p["defenses"] else "options"
            where = "--out" if key == "out" else f"the step's own `{key}`"
            raise ConfigError(_option_loc(stage, key, section), f"'{key}' is set by {where}, not as an option")
    fields.setdefault("seed", p.get("seed", 0))
    user = fields.get("user_field")
    if user is not None and user != "user":  # the dataset step read the user from its own `user_field`
        section = "defenses" if "user_field" in p["defenses"] else "options"
        raise ConfigError(_option_loc(stage, "user_field", section),
                          f"'{user}': an experiment's data names each row's user `user` (the dataset's own "
                          "user_field says where to read it from); write user_field: user")
    try:
        return config_cls(model=p.get("model_path") or p["model"].get("spec", "-").split("#", 1)[0],
                          data=str(p.get("data_path", "-")),
                          method=p["method"], out=out, **fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = err["loc"][0] if err["loc"] else "options"
        section = "defenses" if key in p["defenses"] else "options"
        valid = sorted(set(config_cls.model_fields) - {"model", "data", "method", "out"})
        msg = (f"unknown option; valid: {', '.join(valid)}" if err["type"] == "extra_forbidden"
               else pydantic_message(err))
        raise ConfigError(_option_loc(stage, key, section), msg) from None
