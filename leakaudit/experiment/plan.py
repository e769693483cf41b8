"""The plan of an experiment: its stages in run order, each with a key hashing everything that changes its
outputs, and the folder each stage owns under --out (never outside it). See leakaudit/experiment/__init__.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leakaudit.config import Experiment, expand_grid
from leakaudit.distributed import world
from leakaudit.errors import InputError
from leakaudit.kinds.base import DATA_ROLES

STAGE_VERSION = 1


@dataclass
class Stage:
    """One unit of cached work."""

    id: str
    kind: str
    params: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    key: str = ""
    # the key this stage had when a data file entered keys by its absolute path (moving a checkout or a run
    # dir reran everything): a run dir finished under it is adopted, not rerun (engine.adopt_earlier_keys)
    earlier_key: str = ""
    # the key it had at its kind's version before this one (stage_version), with its inputs' keys of then: a run
    # dir finished under it runs the stage again, and `changed` says what that version changed
    older_key: str = ""
    changed: str = ""
    seed: int = 0  # the step's own `seed` when it has one, else the experiment's
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
    only ever one inside `out`. Its finished marker goes first, so a kill halfway through the deletion never
    leaves a folder that reads as finished."""
    inside(out, path)
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        for marker in ("stage.json", ".key"):
            (path / marker).unlink(missing_ok=True)
        shutil.rmtree(path)


def stage_version(stage: Stage) -> tuple[int, str]:
    """The version of what a stage's kind computes (its `version`) and what that version changed. Data and
    fine-tune steps have none: a fine-tune records what it trained on (finetune_config.json), and the engine
    reads it (manifest.older_split)."""
    from leakaudit.kinds import get_kind

    if stage.kind in ("dataset", "finetune"):
        return 1, ""
    kind = get_kind(stage.params["kind"] if stage.kind == "generate" else stage.kind)
    return kind.version, f"{kind.name} version {kind.version} ({kind.changed})"


def _key_params(stage: Stage) -> dict[str, Any]:
    """A stage's parameters as its key holds them: a data file by its name and content, not the folder it sits
    in (its rows' ids are `<file stem>:<line>`; the folder changes nothing a step writes), so a moved checkout
    or a colleague's copy of the project finds its run dirs cached and can `--reuse` them."""
    if stage.kind == "dataset" and stage.params.get("path") is not None:
        return {**stage.params, "path": Path(stage.params["path"]).name}
    return stage.params


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path: str | Path) -> str:
    """Content hash of an input file or dir, so an edited file reruns what reads it. A model or adapter dir
    (config.json or adapter_config.json at its top) by its weight, config and tokenizer files (dir_fingerprint:
    not the checkpoints and logs a fine-tune leaves there); any other dir (a saved Hugging Face dataset: .arrow
    files, a split per subfolder) by every file under it, so a row edited and saved again reruns its readers."""
    from leakaudit.models import dir_fingerprint, file_sha256

    p = Path(path).expanduser()  # `~/corpus.jsonl` as options may name it
    if p.is_dir():
        if (p / "config.json").exists() or (p / "adapter_config.json").exists():
            return dir_fingerprint(p)
        return _tree_fingerprint(p)
    return file_sha256(p)


def _tree_fingerprint(root: Path) -> str:
    """Hash of every file under `root` (relative path and content), in dir_fingerprint's format: a dir whose
    files all sit at its top with a suffix dir_fingerprint reads keeps the key it had when dirs were hashed so."""
    import os

    from leakaudit.models import file_sha256

    files: dict[str, Path] = {}
    seen: set[Path] = set()
    for top, dirs, names in os.walk(root, followlinks=True):
        real = Path(top).resolve()
        if real in seen:  # a symlink loop (or a folder linked twice): read once
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in names:
            f = Path(top) / name
            if f.is_file():
                files[f.relative_to(root).as_posix()] = f
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode())
        h.update(file_sha256(files[rel]).encode())
    return h.hexdigest()[:32]


def model_identity(spec: str) -> str:
    """A model spec as it enters a key: local files by content, names (default, tiny-*, HF ids) as is. An
    adapter dir whose base_model_name_or_path is a local path holds that base's identity too (and its base's,
    for a chain), so base weights rewritten in place rerun what reads the adapter."""
    return _model_identity(spec, frozenset())


def _model_identity(spec: str, seen: frozenset[Path]) -> str:
    p = Path(spec).expanduser()
    if not p.exists():
        return spec
    identity = f"{spec}#{file_identity(p)}"
    real = p.resolve()
    base = local_adapter_base(p)
    if base is None or real in seen:  # not an adapter of a local base; or a cycle, each dir counted once
        return identity
    return f"{identity}|base:{_model_identity(base, seen | {real})}"


def local_adapter_base(p: Path) -> str | None:
    """The base_model_name_or_path of an adapter dir when it is a local path that exists (resolved as loading
    resolves it), else None: a hub id or tiny-* name enters the adapter's key through its config file."""
    cfg = p / "adapter_config.json"
    if not p.is_dir() or not cfg.is_file():
        return None
    try:
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError, OSError, UnicodeDecodeError):
        return None  # loading refuses it; the file itself is hashed
    if not isinstance(base, str) or not base.strip() or "\x00" in base:
        return None
    try:
        return base if Path(base).expanduser().exists() else None
    except (OSError, RuntimeError):  # a name too long for the file system; "~user" of no such user
        return None


# ----------------------------------------------------------------------------------------- planning
def trained_by_all(stage: Stage) -> bool:
    """A fine-tune that every process of a launched run trains (DDP, FSDP); DP-SGD trains in one."""
    p = stage.params
    return stage.kind == "finetune" and {**p["options"], **p["defenses"]}.get("dp_epsilon") is None


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

    def _model_param(self, ref: str | None, loc: tuple[str, ...]) -> tuple[Any, list[str]]:
        """A model reference as a stage parameter; `loc` is its key path, for the error's line."""
        if ref is None:
            return None, []
        if ref in self.exp.models:
            return {"spec": model_identity(self.exp.models[ref])}, []
        sids = self.finetune_variants[ref]
        if len(sids) != 1:
            raise self.exp.error(loc, f"'{ref}' is a grid of {len(sids)} variants, and this needs one model: "
                                      "give that variant its own finetune entry (or drop the grid)")
        return {"stage": sids[0]}, [sids[0]]

    def _named_models(self, kind: str, options: dict[str, Any], loc: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
        """The experiment's model names inside the kind's model_list_options (lira's references: `[ref_a, ref_b]`,
        fine-tunes of this file) → {`path.i`: the model parameter a role gets}, and the stages they read."""
        from leakaudit.kinds import get_kind

        try:
            paths = get_kind(kind).model_list_options
        except ValueError:  # an unknown kind: the plan check names it
            return {}, []
        named: dict[str, Any] = {}
        deps: list[str] = []
        for path in paths:
            for i, entry in enumerate(_at(options, path) or []):
                if isinstance(entry, str) and (entry in self.exp.models or entry in self.finetune_variants):
                    named[f"{path}.{i}"], mdeps = self._model_param(entry, (*loc, *path.split(".")))
                    deps += mdeps
        return named, deps

    def _add(self, stage: Stage) -> None:
        # two grid variants that are one stage, or that share a folder, would silently overwrite each other
        # (a value given twice: [0.001, 0.001], [20, "20"]; labels that differ only in characters a folder
        # name cannot hold: "A,D" and "A, D")
        twin = self.stages.get(stage.id) or next((s for s in self.stages.values() if s.folder == stage.folder), None)
        cased = None if twin is not None else next(
            (s for s in self.stages.values() if s.folder.casefold() == stage.folder.casefold()), None)
        if cased is not None:  # `Real` and `real`: one folder on macOS and Windows, where the
            # second stage trained over the first and both evaluations read one model
            raise self.exp.error(stage.origin, f"'{cased.id}' and '{stage.id}' differ only in letter case: on macOS "
                                 "and Windows (file systems blind to case) they would share one folder; rename one")
        if twin is not None:
            raise self.exp.error((*stage.origin, "grid"), f"grid variants '{twin.id}' and '{stage.id}' "
                                 f"{'are the same' if twin.id == stage.id else 'share the folder ' + stage.folder}; "
                                 "give each value once")
        version, changed = stage_version(stage)
        stage.key = self._key(stage, _key_params(stage), "key", version)
        stage.older_key = self._key(stage, _key_params(stage), "older_key", version - 1)
        stage.earlier_key = self._key(stage, stage.params, "earlier_key")
        stage.changed = changed if version > 1 else next((f"its input {self.stages[d].id}, which runs again"
                                                          for d in stage.deps if self.stages[d].changed), "")
        self.stages[stage.id] = stage

    def compare_to_keys(self, stage: Stage, also: Any = None) -> dict[str, Any]:
        """The keys an evaluation stage would have with its `compare_to` set otherwise: key -> that value (None:
        unset), for unset, each target of its evaluation and `also` (the value a finished stage recorded).
        `compare_to` only says which target the report compares the others with, from the finished stages'
        files, yet it is an option, so in the key: a stage finished under one of these keys holds what this
        one would compute, and editing `compare_to` need not sample and score every target again."""
        options = stage.params.get("options")
        if not stage.id.startswith("evaluate/") or not isinstance(options, dict) or "compare_to" in stage.overrides:
            return {}  # a grid over compare_to: each value is a stage (and a folder) of its own
        evaluation = self.exp.evaluate.get(stage.origin[1])
        labels = [] if evaluation is None else [label for t in evaluation.targets for label, _ in self.model_refs(t)]
        version = stage_version(stage)[0]
        out: dict[str, Any] = {}
        for value in dict.fromkeys([None, *labels, *([also] if isinstance(also, str) else [])]):
            if value == options.get("compare_to"):
                continue
            opts = {k: v for k, v in options.items() if k != "compare_to"}
            if value is not None:
                opts["compare_to"] = value
            params = {k: v for k, v in stage.params.items() if k not in ("files", "show_pii")}
            params = {**params, "options": opts, **self._read_outside(opts)}
            other = Stage(stage.id, stage.kind, params, stage.deps, seed=stage.seed)
            out[self._key(other, _key_params(other), "key", version)] = value
        return out

    def _key(self, stage: Stage, params: dict[str, Any], chain: str, version: int = 1) -> str:
        payload = {"v": STAGE_VERSION, "kind": stage.kind, "params": params, "seed": stage.seed,
                   "deps": {d: getattr(self.stages[d], chain) for d in stage.deps}}
        if version > 1:  # version 1 stays out: raising one kind's leaves every other stage's key as it was
            payload["kind_version"] = version
        processes = world()[1]
        if processes > 1 and trained_by_all(stage):  # not quite the one-process training: docs/experiments.md
            payload["processes"] = processes
        return _hash(payload)[:24]

    def _read_outside(self, options: dict[str, Any]) -> dict[str, Any]:
        """What a generate or evaluate stage reads besides its inputs, for its key: the content of every file
        an option names at any depth (pii `pairs`, self-instruct `seed_tasks`, backdoor `words_file`, mia's
        `attack_options.dc_pdd.corpus`, ...; the corpus LEAKAUDIT_ENRON_MESSAGES names for a `corpus: enron`),
        and `report.show_pii`, which decides whether its outputs are masked. Nothing when neither applies, so
        keys of stages without them stay as they were."""
        from leakaudit.data.builtin import enron_messages_path

        flat = _flat(options)
        files = {key: file_identity(v) for k, value in sorted(flat.items())
                 for key, v in _entries(k, value) if _names_a_file(v, model_folder=k in MODEL_FOLDER_OPTIONS)}
        corpus = enron_messages_path()
        if corpus is not None:  # dc_pdd counting `enron` reads the corpus LEAKAUDIT_ENRON_MESSAGES points at
            files.update({k: file_identity(corpus) for k, v in flat.items()
                          if k.endswith(".corpus") and v == "enron"})
        return {**({"files": files} if files else {}), **({"show_pii": True} if self.exp.report.show_pii else {})}

    def _seed(self, spec: Any) -> int:
        return self.exp.seed if spec.seed is None else spec.seed

    # building -----------------------------------------------------------------------------
    def _build(self) -> None:
        exp = self.exp
        for name, ds in exp.datasets.items():
            # the seed enters the key as the stage's seed; no unions (ranges, messages_field) = the key of files
            # written before unions (ranges, messages_field) existed
            unset = {f for f in ("unions", "ranges", "messages_field") if not getattr(ds, f)}
            params = ds.model_dump(exclude={"seed"} | unset)
            if ds.path is not None:
                p = Path(ds.path).expanduser()
                if not p.exists():
                    raise exp.error(("datasets", name, "path"), f"data file not found: {p}")
                params["content"] = file_identity(p)
            params["name"] = name
            if not (ds.ranges or ds.split or ds.limit or ds.max_users):
                # taken whole, its rows keep the source's order (they were shuffled before): a run dir made
                # before keeps its step as it was built, not as cached under this key
                params["order"] = "source"
            if ds.builtin == "enron":  # the corpus LEAKAUDIT_ENRON_MESSAGES points at, else the shipped sample
                from leakaudit.data.builtin import enron_messages_path

                corpus = enron_messages_path()
                if corpus is not None:
                    params["corpus"] = file_identity(corpus)
            self._add(Stage(f"data/{name}", "dataset", params, origin=("datasets", name), seed=self._seed(ds)))
        for section, name in _build_order(exp):  # a step after the steps it reads from
            if section == "generate":
                self._add_generate(name)
            else:
                self._add_finetune(name)
        for name, e in exp.evaluate.items():
            twice = sorted({t for t in e.targets if e.targets.count(t) > 1})
            if twice:  # it silently ran once
                raise exp.error(("evaluate", name, "targets"), f"'{twice[0]}' is listed twice")
            for label, overrides in expand_grid(name, e.grid):
                options = {**e.options, **overrides}
                common: dict[str, Any] = {"options": options, **self._read_outside(options)}
                deps: list[str] = []
                for role in DATA_ROLES:
                    ref = getattr(e, role)
                    if ref is not None:
                        sid, fname = self.data_stage(ref)
                        common[role] = [sid, fname]
                        deps.append(sid)
                for role in ("reference", "baseline"):
                    model, mdeps = self._model_param(getattr(e, role), ("evaluate", name, role))
                    common[role] = model
                    deps += mdeps
                named, mdeps = self._named_models(e.kind, options, ("evaluate", name, "options"))
                if named:  # absent otherwise: the keys of stages that name no model stay as they were
                    common["named_models"] = named
                    deps += [d for d in mdeps if d not in deps]
                for target in e.targets:
                    for tlabel, tsid in self.model_refs(target):
                        target_param = {"stage": tsid} if tsid else {"spec": model_identity(exp.models[target])}
                        params = {**common, "target": target_param, "target_label": tlabel,
                                  "evaluation": label}
                        stage = Stage(f"evaluate/{label}/{tlabel}", e.kind, params,
                                      deps + ([tsid] if tsid else []), origin=("evaluate", name),
                                      overrides=overrides, seed=self._seed(e))
                        self._add(stage)

    def _add_generate(self, name: str) -> None:
        g = self.exp.generate[name]
        params: dict[str, Any] = {"kind": g.kind, "options": g.options, **self._read_outside(g.options)}
        deps: list[str] = []
        if g.data:
            sid, fname = self.data_stage(g.data)
            params["data"] = [sid, fname]
            deps.append(sid)
        model, mdeps = self._model_param(g.model, ("generate", name, "model"))
        params["model"] = model
        self._add(Stage(f"generate/{name}", "generate", params, deps + mdeps, origin=("generate", name),
                        seed=self._seed(g)))

    def _add_finetune(self, name: str) -> None:
        f = self.exp.finetune[name]
        self.finetune_variants[name] = []
        for label, overrides in expand_grid(name, f.grid):
            options = {**f.options, **{k: v for k, v in overrides.items() if k not in ("method", "model")}}
            sid, fname = self.data_stage(f.data)
            loc = ("finetune", name, "grid") if "model" in overrides else ("finetune", name, "model")
            model, mdeps = self._model_param(overrides.get("model", f.model), loc)  # a base or a tuned model
            params = {"model": model, "method": overrides.get("method", f.method), "options": options,
                      "defenses": f.defenses, "data": [sid, fname]}
            stage = Stage(f"finetune/{label}", "finetune", params, [sid, *mdeps], origin=("finetune", name),
                          overrides=overrides, seed=self._seed(f))
            self._add(stage)
            self.finetune_variants[name].append(stage.id)


def _flat(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested options as dotted keys (`attack_options.dc_pdd.corpus`): a file may be named at any depth."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _at(options: dict[str, Any], path: str) -> list | None:
    """The list at a dotted option path (`attack_options.lira.references`), or None."""
    value: Any = options
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, list) else None


def named_models(stage: Stage) -> set[str]:
    """The model names of the experiment a stage's options hold where a model spec goes (its `named_models`)."""
    out = set()
    for key in stage.params.get("named_models") or {}:
        path, _, i = key.rpartition(".")
        out.add((_at(stage.params.get("options") or {}, path) or [])[int(i)])
    return out


def _entries(key: str, value: Any) -> list[tuple[str, Any]]:
    """An option's value as the key hashes its files: a list's strings each under `key.i` (lira's reference
    folders: a file inside a list was not hashed, and an edited reference did not rerun the stage), anything
    else as itself."""
    if isinstance(value, (list, tuple)):
        return [(f"{key}.{i}", v) for i, v in enumerate(value) if isinstance(v, str)]
    return [(key, value)]


#: options (dotted, as `_flat` gives them) whose value may be a model folder, or a list of them: the
#: neighbourhood attack's masked LM, lira's reference models
MODEL_FOLDER_OPTIONS = ("attack_options.neighbourhood.model", "attack_options.lira.references")


def _names_a_file(value: Any, model_folder: bool = False) -> bool:
    """An option value that is the path of an existing file, saved dataset folder or, for an option of
    MODEL_FOLDER_OPTIONS (`model_folder`), model folder; any other string, e.g. a template, is not, nor any other
    folder, which an option naming it by chance would make the key hash (`compare_to: base`, a target's label,
    beside a model folder ./base: every such stage of an earlier release ran again)."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 4096:
        return False
    markers = (*_DATASET_DIR_FILES, "config.json") if model_folder else _DATASET_DIR_FILES
    try:
        p = Path(value).expanduser()
        return p.is_file() or (p.is_dir() and any((p / f).is_file() for f in markers))
    except (OSError, RuntimeError):  # a name too long for the file system; "~user" of no such user
        return False


#: what `datasets`' save_to_disk writes at the top of a saved dataset (or dataset dict) folder
_DATASET_DIR_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def _build_order(exp: Experiment) -> list[tuple[str, str]]:
    """Generate and finetune steps, each after the steps it reads: a generate step's data (another generate
    step) and model (a finetune, e.g. data generated by the exposed model), a finetune's data (a generate
    step) and model (a finetune defined above it). Otherwise the file's order, generate steps first. A cycle
    (a finetune on data generated by itself) is an error at the step that closes it."""
    order: list[tuple[str, str]] = []
    state: dict[tuple[str, str], int] = {}

    def needs(step: tuple[str, str]) -> list[tuple[tuple[str, str], str]]:
        section, name = step
        spec = exp.generate[name] if section == "generate" else exp.finetune[name]
        out = [(("generate", spec.data), "data")] if spec.data in exp.generate else []
        models = [spec.model, *(spec.grid.get("model") or [])] if section == "finetune" else [spec.model]
        out += [(("finetune", m), "model") for m in models if m in exp.finetune]
        return out

    def visit(step: tuple[str, str]) -> None:
        if state.get(step) == 2:
            return
        state[step] = 1
        for dep, key in needs(step):
            if state.get(dep) == 1:
                raise exp.error((*step, key), f"'{step[1]}' depends on itself (through {dep[0]} '{dep[1]}')")
            visit(dep)
        state[step] = 2
        order.append(step)

    for name in exp.generate:
        visit(("generate", name))
    for name in exp.finetune:
        visit(("finetune", name))
    return order
