"""The experiment file: a validated (pydantic) description of a whole study, from data to report.

Why a schema: a typo in a 40-minute study should fail in the first second with one line naming the
file, the line, the key path and what is wrong, not after the fine-tuning finished.

An experiment names
  models     name -> model spec (`default`, `tiny-gpt-neox`, an HF id, a local dir, ...),
  datasets   name -> a data file or a built-in source, optionally split (`emails.members`),
  generate   name -> a data-generation step (a `generate` kind: continuation, self-instruct, replace-pii, ...),
  finetune   name -> a fine-tuning variant (method, data, options, defenses, grid),
  evaluate   name -> an evaluation (mia, user-inference, pii, perplexity, backdoor) of some targets.
`grid:` on a finetune or an evaluation sweeps options: every combination becomes its own variant.
Data references are `dataset`, `dataset.split` or a generate step; model references are a `models`
name or a `finetune` name (meaning all its grid variants).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from leakaudit.data.builtin import BUILTIN_NAMES
from leakaudit.data.split import HOLDOUT_SUFFIX
from leakaudit.errors import InputError
from leakaudit.kinds.base import DATA_ROLES
from leakaudit.options import Seed

FINETUNE_METHODS = ("full", "lora", "dora", "pissa")
# Names become folders under --out: no separators, no '.'/'..', nothing that starts a path or an option.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Dataset and split names also may not contain '.', which separates them in a data reference (`emails.members`).
SAFE_DATA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class Strict(BaseModel):
    """Unknown keys are errors (a misspelt option must not be silently ignored)."""

    # and no inf/NaN in a number; strict: `seed: true` or `limit: "5"` is an error, not 1 and 5
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class DatasetSpec(Strict):
    """A data file (`path`) or a built-in source (`builtin`), optionally limited, shuffled and split."""

    path: str | None = None
    builtin: Literal[BUILTIN_NAMES] | None = None  # type: ignore[valid-type]
    text_field: str = "text"
    # rows of conversations (a chat fine-tune's, a backdoor's queries): the checked conversations stay in the rows
    # under this field for the steps with `format: chat`, and their text is every turn's content, one per line
    messages_field: str | None = Field(default=None, min_length=1)
    id_field: str | None = None
    user_field: str | None = None
    limit: int | None = Field(default=None, gt=0)
    max_users: int | None = Field(default=None, gt=0)  # keep every row of the first N users (after the shuffle)
    min_texts_per_user: int | None = Field(default=None, gt=0)  # leave out users with fewer distinct texts
    max_chars: int | None = Field(default=None, gt=0)
    split: dict[str, float] = Field(default_factory=dict)
    split_by: Literal["row", "user"] = "row"
    # With split_by: user, each part P also gets P_holdout: this many samples of each of its users, never in P
    # (the attacker's samples of user inference; data/split.py:holdout_per_user).
    holdout_per_user: int | None = Field(None, ge=1)
    # Extra parts made of whole split parts, e.g. {trained: [targets, prompts]}: one model trains on both while
    # other steps read each alone (a study's disjoint rows for extraction targets and generation prompts).
    unions: dict[str, list[str]] = Field(default_factory=dict)
    # Parts as row ranges in the source's own order, {part: [start, end]} with Python slice meaning (end null =
    # to the end, negative = counted from the end), e.g. a study's fixed rows: targets = rows 0-999, prompts =
    # rows 1110 on. Rows are not shuffled (an index must mean a file row); parts may overlap, unlike `split`.
    ranges: dict[str, list[StrictInt | None]] = Field(default_factory=dict)
    # A fixed seed for this step, unaffected by the experiment's `seed` and `--seed`: what a study holds fixed
    # across its seeds (a pre-training stand-in, a data split), so other seeds' runs reuse it (run --reuse).
    seed: Seed | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        return self

    @model_validator(mode="after")
    def _messages_from_a_file(self) -> DatasetSpec:
        if self.messages_field is not None and self.builtin is not None:
            raise ValueError("messages_field reads a data file's conversations ('path'); a built-in source's rows "
                             "carry theirs (dolly: `messages`)")
        if self.messages_field is not None and self.text_field != "text":
            raise ValueError("give one of 'text_field' or 'messages_field': with messages_field a row's text is its "
                             "turns' contents, one per line")
        return self

    @model_validator(mode="after")
    def _holdout(self) -> DatasetSpec:
        if self.holdout_per_user is None:
            return self
        if self.split_by != "user" or not self.split:
            raise ValueError("holdout_per_user needs a 'split' with 'split_by: user'")
        clash = [p for p in self.split if p + HOLDOUT_SUFFIX in self.split]
        if clash:
            raise ValueError(f"split '{clash[0]}{HOLDOUT_SUFFIX}' clashes with the held-out part of "
                             f"'{clash[0]}' (holdout_per_user); rename it")
        return self

    @model_validator(mode="after")
    def _unions(self) -> DatasetSpec:
        for name, parts in self.unions.items():
            if name == "all":
                raise ValueError("union 'all' would be the whole dataset's file (all.jsonl); name it otherwise")
            if name in self.split:
                raise ValueError(f"union '{name}' clashes with the split part of that name")
            unknown = [p for p in parts if p not in self.split]
            if unknown or not parts:
                raise ValueError(f"union '{name}' must list parts of 'split' (not {unknown or 'nothing'})")
        return self

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, v: dict[str, list[int | None]], info: ValidationInfo) -> dict[str, list[int | None]]:
        # The other ways of making parts shuffle or partition the rows; mixed with file-order ranges, row
        # indices would mean nothing, so refuse the mix rather than pick an order.
        for other in ("split", "unions", "holdout_per_user"):
            if v and info.data.get(other):
                raise ValueError(f"cannot be combined with '{other}' (ranges are parts in file order; "
                                 f"use one or the other)")
        for name, bounds in v.items():
            if name == "all":
                raise ValueError("part 'all' is the whole dataset (all.jsonl); name the range otherwise")
            if len(bounds) != 2:
                raise ValueError(f"range of '{name}' must be [start, end] (null end = to the end), "
                                 f"got {len(bounds)} value(s)")
            start, end = bounds
            if start is not None and end is not None and (start >= 0) == (end >= 0) and start >= end:
                raise ValueError(f"range of '{name}' is empty: start {start} is not before end {end}")
        return v

    @field_validator("split")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if "all" in v:  # a part named 'all' overwrote all.jsonl, which `dataset` (no part) reads
            raise ValueError("part 'all' is the whole dataset (all.jsonl); name the part otherwise")
        for name, frac in v.items():
            if not 0 < frac <= 1:
                raise ValueError(f"fraction of '{name}' must be in (0, 1], got {frac}")
        if sum(v.values()) > 1 + 1e-9:
            raise ValueError(f"fractions add up to {sum(v.values()):g} > 1")
        return v


def _kind_name(name: str, section: str) -> str:
    """A registered kind of the section (the registry's did-you-mean message otherwise)."""
    from leakaudit.kinds import kind_names, unknown_kind_message

    if name in kind_names(section):
        return name
    raise ValueError(unknown_kind_message(name, section))


def _missing_roles(spec: BaseModel, kind: str) -> None:
    """'<kind>' needs 'a' and 'b': the roles the registered kind requires (Kind.roles) that are not given."""
    from leakaudit.kinds import get_kind

    missing = [r for r, required in get_kind(kind).roles.items()
               if required and r in type(spec).model_fields and getattr(spec, r) is None]
    if missing:
        raise ValueError(f"'{kind}' needs " + " and ".join(f"'{r}'" for r in missing))


class GenerateSpec(Strict):
    """A data-generation step; its output is a data file other steps can reference by its name."""

    kind: str
    data: str | None = None
    model: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    seed: Seed | None = None  # fixed seed for this step (see DatasetSpec.seed)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return _kind_name(v, "generate")

    @model_validator(mode="after")
    def _needs(self) -> GenerateSpec:
        from leakaudit.kinds import get_kind

        _missing_roles(self, self.kind)
        roles = get_kind(self.kind).roles
        for role in ("data", "model"):  # a role it does not read would be silently ignored
            if getattr(self, role) is not None and role not in roles:
                raise ValueError(f"'{self.kind}' does not read '{role}'")
        return self


class FinetuneSpec(Strict):
    """A fine-tuning variant: base model, data, method, options, defenses; `grid` sweeps options (and may
    sweep `model` over `models` names and `method`)."""

    model: str
    data: str
    method: Literal["full", "lora", "dora", "pissa"] = "lora"
    options: dict[str, Any] = Field(default_factory=dict)
    defenses: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seed: Seed | None = None  # fixed seed for this step (see DatasetSpec.seed)


class EvaluationSpec(Strict):
    """One evaluation kind run on each target (a model or a fine-tuning variant)."""

    kind: str
    targets: list[str] = Field(min_length=1)
    reference: str | None = None
    baseline: str | None = None
    members: str | None = None
    nonmembers: str | None = None
    data: str | None = None
    training: str | None = None  # the targets' fine-tuning data, for per-user sample counts (user inference)
    options: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seed: Seed | None = None  # fixed seed for this step (see DatasetSpec.seed)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return _kind_name(v, "evaluate")

    @model_validator(mode="after")
    def _needs(self) -> EvaluationSpec:
        from leakaudit.kinds import get_kind

        _missing_roles(self, self.kind)
        roles = get_kind(self.kind).roles
        for role in ("reference", "baseline", "members", "nonmembers", "data", "training"):
            if getattr(self, role) is not None and role not in roles:  # it would be silently ignored
                raise ValueError(f"'{self.kind}' does not read '{role}' (it reads {', '.join(roles) or 'none'})")
        return self


class ReportSpec(Strict):
    title: str | None = None
    show_pii: bool = False
    #: a name list (one per line, or JSONL with `name`) masked besides the shipped Enron names: your own people
    mask_names: str | None = None


class Experiment(Strict):
    """The whole study."""

    name: str
    seed: Seed = 0
    models: dict[str, str] = Field(min_length=1)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    generate: dict[str, GenerateSpec] = Field(default_factory=dict)
    finetune: dict[str, FinetuneSpec] = Field(default_factory=dict)
    evaluate: dict[str, EvaluationSpec] = Field(default_factory=dict)
    report: ReportSpec = Field(default_factory=ReportSpec)
    _file: str = PrivateAttr("<experiment>")  # where it was read from, so later checks can name FILE:LINE
    _text: str = PrivateAttr("")

    def error(self, loc: tuple[Any, ...], message: str) -> InputError:
        """An InputError at a key path of this experiment's file (its line when the text is known)."""
        return InputError(message, file=self._file, line=line_of(self._text, loc) if self._text else None,
                          field=key_path(loc))


# ----------------------------------------------------------------------------------------- grids
def expand_grid(name: str, grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every combination of a grid as (variant name, overrides); no grid gives the name itself."""
    if not grid:
        return [(name, {})]
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        overrides = dict(zip(keys, values, strict=True))
        label = ",".join(f"{k}={_short(v)}" for k, v in overrides.items())
        out.append((f"{name}[{label}]", overrides))
    return out


def _short(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


# ----------------------------------------------------------------------------------------- loading
class ConfigError(Exception):
    """A problem at a key path of the experiment file (turned into an InputError with its line)."""

    def __init__(self, loc: tuple[Any, ...], message: str):
        self.loc = loc
        self.message = message
        super().__init__(message)


def key_path(loc: tuple[Any, ...]) -> str:
    """('evaluate', 'mia', 'targets', 0) -> 'evaluate.mia.targets[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of a key path in YAML text (the deepest part that exists)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = 1  # a key missing at the top level: the file's first line
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def pydantic_message(err: dict[str, Any]) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    return msg.removeprefix("Value error, ")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last, so a second
    `ppl:` stage or `name:` would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *alias` merges, explicit keys override
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key is refused later, by the schema
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads a float only with a dot: `1e-4` was the string "1e-4" (a grid variant named by it,
# a key apart from 0.0001's). Exponent-only numbers are floats here, as YAML 1.2 and every other tool read them.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_experiment(text: str | Mapping[str, Any], file: str | Path = "<experiment>") -> Experiment:
    """Parse and validate YAML text; every problem is one InputError naming file, line and key path. `text` may
    also be the file's content as a dict (what `yaml.safe_load` gives): its problems name the key path alone."""
    if isinstance(text, Mapping):  # a notebook's dict: read as text was `'dict' object has no attribute 'read'`
        return _validated(dict(text), "", file)
    if not isinstance(text, str):
        raise TypeError(f"text: expected an experiment's YAML text or a dict, got {type(text).__name__} (a file: "
                        "leakaudit.config.load_experiment(path))")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"not valid YAML: {problem}", file=file,
                         line=mark.line + 1 if mark else None) from None
    except RecursionError:
        raise InputError("not valid YAML: nested too deeply", file=file) from None
    if not isinstance(raw, dict):
        raise InputError("an experiment file must be a YAML mapping (name:, models:, ...)", file=file, line=1)
    return _validated(raw, text, file)


def _validated(raw: dict[str, Any], text: str, file: str | Path) -> Experiment:
    """The experiment `raw` describes, checked; `text` its YAML (lines for errors), or "" for a dict."""
    def line(loc: tuple[Any, ...]) -> int | None:
        return line_of(text, loc) if text else None

    try:
        exp = Experiment.model_validate(raw)
        check_references(exp)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        # Literal unions report the union member in loc; drop pydantic's internal tags.
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith(("literal[", "function-"))))
        raise InputError(pydantic_message(err), file=file, line=line(loc), field=key_path(loc)) from None
    except ConfigError as exc:
        raise InputError(exc.message, file=file, line=line(exc.loc), field=key_path(exc.loc)) from None
    exp._file, exp._text = str(file), text
    return exp


def shipped_experiment(name: str | Path) -> Path | None:
    """The experiment file leakaudit ships under that name (`demo`, `demo.yaml`, `experiments/demo.yaml`), or
    None. The docs' `experiments/NAME.yaml` is a link into the package in a checkout; an installed package has
    only the copy inside it."""
    from leakaudit import resources

    stem = Path(name).name.removesuffix(".yaml")
    shipped = resources.ROOT / "experiments" / f"{stem}.yaml"
    return shipped if stem and shipped.is_file() else None


def _shipped_hint(p: Path) -> str:
    shipped = shipped_experiment(p)
    if shipped is None:
        return ""
    return f"; leakaudit ships '{p.name}' inside the package: {shipped} (run it from there, or copy it to edit it)"


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment file; relative data paths (and `report.mask_names`) are resolved against the file's
    folder."""
    p = Path(path)
    if p.is_dir():  # "not found" of a folder that is there (a run's --out given first) sent users looking for it
        raise InputError("is a directory; expected an experiment file (YAML)", file=p)
    if not p.is_file():
        raise InputError("experiment file not found" + _shipped_hint(p), file=p)
    from leakaudit.data.io import read_text  # BOM, UTF-16, undecodable bytes: one line naming the file

    exp = parse_experiment(read_text(p), p)
    for ds in exp.datasets.values():
        if ds.path is not None and not Path(ds.path).expanduser().is_absolute():
            ds.path = str((p.parent / ds.path).resolve())
    names = exp.report.mask_names
    if names is not None and not Path(names).expanduser().is_absolute():
        exp.report.mask_names = str((p.parent / names).resolve())
    return exp


# ----------------------------------------------------------------------------------------- references
def data_names(exp: Experiment) -> set[str]:
    """Every valid data reference."""
    names = set(exp.generate)
    for name, ds in exp.datasets.items():
        names.add(name)
        names.update(f"{name}.{split}" for split in [*ds.split, *ds.unions, *ds.ranges])
        if ds.holdout_per_user is not None:
            names.update(f"{name}.{split}{HOLDOUT_SUFFIX}" for split in ds.split)
    return names


def model_names(exp: Experiment) -> set[str]:
    return set(exp.models) | set(exp.finetune)


def check_names(exp: Experiment) -> None:
    """Every user-given name is safe as a folder name under --out (a dataset named '../..' must not be
    able to write to, or on a rerun delete, the folders above it)."""
    sections: dict[str, dict[str, Any]] = {"models": exp.models, "datasets": exp.datasets,
                                           "generate": exp.generate, "finetune": exp.finetune,
                                           "evaluate": exp.evaluate}
    for section, entries in sections.items():
        pattern = SAFE_DATA_NAME if section == "datasets" else SAFE_NAME
        for name in entries:
            _check_name(name, pattern, (section, name))
    for name, ds in exp.datasets.items():
        for split in ds.split:
            _check_name(split, SAFE_DATA_NAME, ("datasets", name, "split", split))
        for union in ds.unions:
            _check_name(union, SAFE_DATA_NAME, ("datasets", name, "unions", union))
        for part in ds.ranges:
            _check_name(part, SAFE_DATA_NAME, ("datasets", name, "ranges", part))


def _check_name(name: str, pattern: re.Pattern[str], loc: tuple[Any, ...]) -> None:
    if not pattern.fullmatch(name):
        allowed = "letters, digits, '_' and '-'" + (", '.'" if pattern is SAFE_NAME else "")
        raise ConfigError(loc, f"invalid name {json.dumps(name)}: use {allowed}, starting with a letter or digit")


def check_references(exp: Experiment) -> None:
    """Every data and model reference points at something defined; no name is used twice; no cycles."""
    check_names(exp)
    clash = (set(exp.models) & set(exp.finetune)) | (set(exp.datasets) & set(exp.generate))
    if clash:
        name = sorted(clash)[0]
        section = "finetune" if name in exp.finetune else "generate"
        raise ConfigError((section, name), f"name '{name}' is already used in "
                          f"{'models' if section == 'finetune' else 'datasets'}")
    datas, models = data_names(exp), model_names(exp)
    base_models = set(exp.models)

    def need(ref: str | None, valid: set[str], loc: tuple[Any, ...], what: str) -> None:
        if ref is not None and (not isinstance(ref, str) or ref not in valid):  # a grid's {a: 1} is unhashable
            raise ConfigError(loc, f"unknown {what} '{ref}'; defined: {', '.join(sorted(valid)) or 'none'}")

    for name, g in exp.generate.items():
        need(g.data, datas, ("generate", name, "data"), "data")
        need(g.model, models, ("generate", name, "model"), "model")
    for i, (name, f) in enumerate(exp.finetune.items()):
        earlier = base_models | set(list(exp.finetune)[:i])  # a variant may continue from one defined above it
        need(f.model, earlier, ("finetune", name, "model"), "base model (or a finetune defined above)")
        need(f.data, datas, ("finetune", name, "data"), "data")
        for key, values in f.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(("finetune", name, "grid", key), "a grid needs a non-empty list of values")
            if key == "model":
                for j, v in enumerate(values):
                    need(v, base_models, ("finetune", name, "grid", "model", j), "base model")
            if key == "method":
                for j, v in enumerate(values):
                    if v not in FINETUNE_METHODS:
                        raise ConfigError(("finetune", name, "grid", "method", j),
                                          f"unknown method '{v}'; use one of {', '.join(FINETUNE_METHODS)}")
    for name, e in exp.evaluate.items():
        for i, t in enumerate(e.targets):
            need(t, models, ("evaluate", name, "targets", i), "model")
        for field in ("reference", "baseline"):
            need(getattr(e, field), models, ("evaluate", name, field), "model")
        for field in DATA_ROLES:
            need(getattr(e, field), datas, ("evaluate", name, field), "data")
        for key, values in e.grid.items():
            if not values:  # an empty sweep would drop the whole evaluation without a word
                raise ConfigError(("evaluate", name, "grid", key), "a grid needs a non-empty list of values")
    _check_generate_cycles(exp)


def _check_generate_cycles(exp: Experiment) -> None:
    state: dict[str, int] = {}

    def visit(name: str) -> None:
        if state.get(name) == 1:
            raise ConfigError(("generate", name, "data"), f"generate step '{name}' depends on itself")
        if state.get(name) == 2:
            return
        state[name] = 1
        ref = exp.generate[name].data
        if ref in exp.generate:
            visit(ref)
        state[name] = 2

    for name in exp.generate:
        visit(name)
