"""The contract every evaluation and generation kind follows (see docs/architecture.md).

A kind is one file under `leakaudit/kinds/` holding
  - `Options`: a pydantic model (`extra="forbid"`, bounds): the only place its options are typed and checked,
    used alike by the CLI (built from flags) and by experiment files (validated at plan time, FILE:LINE);
  - `run(ctx, options) -> Result`: the job, reading inputs from a `KindContext` and writing its files into
    `ctx.out`;
  - `Result`: what `run` returns; it knows its JSON (kept in stage.json / run.json), its headline numbers
    (summary.json and the report's first table) and its report section (built from what runs left on disk).
Kinds register themselves with `@register` (leakaudit.kinds); the experiment schema, the plan check and the
report are derived from that registry, so adding a kind is adding one file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from leakaudit.errors import InputError
from leakaudit.options import BatchSize, numbers_are_not_booleans, stride_inside_the_window
from leakaudit.progress import say

Section = Literal["evaluate", "generate"]
#: The data roles a step can be given in an experiment file (a data reference each) and the model roles.
DATA_ROLES = ("members", "nonmembers", "data", "training")
MODEL_ROLES = ("reference", "baseline", "model")


class KindOptions(BaseModel):
    """Base of every kind's options: unknown keys are errors, values are checked when built."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    _numbers_are_not_booleans = field_validator("*", mode="before")(numbers_are_not_booleans)


class ScoringPassOptions(KindOptions):
    """Options of a kind that scores texts through the cached scoring engine (mia, user inference, perplexity):
    one declaration, so the three take and check them alike."""

    batch_size: BatchSize = "auto"
    max_length: int | None = Field(None, ge=2, description="window in tokens (default: the model's context)")
    stride: int | None = Field(None, ge=1, description="window step for long texts (default: max_length/2)")
    _stride_inside_the_window = field_validator("stride")(stride_inside_the_window)
    cache: bool = Field(True, description="read and write the score cache")


class ScoredRowsOptions(ScoringPassOptions):
    """Options of a kind whose rows may be a chat fine-tune's conversations (mia, user inference, perplexity)."""

    format: Literal["text", "chat"] = Field(
        "text", description="chat: the rows are conversations (`messages`), each scored at its assistant replies "
                            "in their context, as `finetune --format chat` trains on them")
    messages_field: str = Field("messages", min_length=1, description="the conversations' field (format chat)")

    @field_validator("messages_field")
    @classmethod
    def _messages_field_with_chat(cls, value: str, info: ValidationInfo) -> str:
        """A conversations' field given for text rows was read by nothing, in silence (checked when given)."""
        if info.data.get("format") != "chat":
            raise ValueError("is read with format chat only: add format chat, or drop it")
        return value

    def record_fields(self) -> dict[str, str]:
        """What the rows are read with beside the data's own fields: the conversations' field, in format chat."""
        return {"messages_field": self.messages_field} if self.format == "chat" else {}


@dataclass
class Headline:
    """One headline number (summary.json, the report's first table)."""

    metric: str
    value: Any
    ci: list[float] | None = None
    m: str | None = None  # user inference's samples per user the number is at: the table's column names it


@dataclass
class StageView:
    """A finished stage of a run as the report sees it (one entry of run.json's `stages`)."""

    record: dict[str, Any]
    out: Path

    @property
    def result(self) -> dict[str, Any]:
        return self.record.get("result") or {}

    @property
    def dir(self) -> Path:
        return self.out / self.record["folder"]

    @property
    def target(self) -> str:
        return str(self.record["params"].get("target_label") or self.record["id"].split("/", 1)[-1])

    @property
    def evaluation(self) -> str:
        return str(self.record["params"].get("evaluation") or self.record["id"].split("/")[1])


def figure_names(stages: list[StageView]) -> Callable[[StageView], str]:
    """How a section's figure names a stage: its target, and its evaluation too where several evaluations of
    the kind are drawn together (keyed by target alone, a second evaluation of one target was drawn over the
    first)."""
    several = len({s.evaluation for s in stages}) > 1
    return lambda s: f"{s.target} ({s.evaluation})" if several else s.target


class Result:
    """A kind's outcome: JSON data plus how to read it. Kinds subclass it to add headline and section."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def to_json(self) -> dict[str, Any]:
        return self.data

    def headline(self) -> list[Headline]:
        """The numbers that summarise this result (none by default: generation kinds)."""
        return []

    @classmethod
    def section(cls, stages: list[StageView]) -> dict[str, Any] | None:
        """The report section for every finished stage of this kind: {id, title, note, figures, tables}."""
        return None

    @classmethod
    def comparisons(cls, stages: list[StageView]) -> list[dict[str, Any]]:
        """Paired comparisons between targets of one evaluation (e.g. a mitigation against none), each a
        dict with at least evaluation, metric, baseline, variant, delta, ci and verdict; summary.json lists
        them. None by default."""
        return []


class ModelCache:
    """Loaded models, shared by the stages of one run. The most recently used stay in memory while their weights
    fit a quarter of the machine's memory (of the GPU's, on a GPU) and `keep` allows: a study scores the same
    few models in several evaluations, and loading one again costs seconds each time. The engine owns one;
    the CLI makes its own."""

    def __init__(self, keep: int | None = None, **load_options: Any):
        self.keep = keep
        self.load_options = load_options
        self._loaded: dict[str, Any] = {}

    def get(self, spec: str | None) -> Any:
        if spec is None:
            return None
        if spec in self._loaded:
            self._loaded[spec] = self._loaded.pop(spec)  # most recently used last
            return self._loaded[spec]
        from leakaudit.models import load_model

        lm = load_model(spec, **self.load_options)
        while self._loaded and self._full(lm):
            self._loaded.pop(next(iter(self._loaded)))  # least recently used first
        self._loaded[spec] = lm
        return lm

    def load_once(self, spec: str) -> Any:
        """A model used for one pass and then released (lira's reference models, one after another: n of them
        must not sit in memory together): the held copy when there is one, else loaded and not kept."""
        if spec in self._loaded:
            return self._loaded[spec]
        from leakaudit.models import load_model

        return load_model(spec, **self.load_options)

    def _full(self, incoming: Any) -> bool:
        if self.keep is not None and len(self._loaded) >= self.keep:
            return True
        held = sum(_weight_bytes(lm) for lm in self._loaded.values())
        return held + _weight_bytes(incoming) > _memory_budget(incoming.device)

    def clear(self) -> None:
        self._loaded.clear()


def _weight_bytes(lm: Any) -> int:
    return sum(p.numel() * p.element_size() for p in lm.model.parameters())


def _memory_budget(device: Any) -> int:
    """Bytes of weights the model cache may hold: a quarter of RAM, or of the GPU's memory."""
    import torch

    from leakaudit.models import host_memory

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return host_memory() // 4


@dataclass
class KindContext:
    """What a kind's `run` sees, from the engine (one stage) or from a CLI command alike."""

    out: Path                                   # the folder it writes into (exists)
    seed: int = 0
    data: dict[str, Path] = field(default_factory=dict)          # role -> data file (members, nonmembers, data)
    models: dict[str, str | None] = field(default_factory=dict)  # role -> model spec (target, reference, ...)
    checkpoints: list[str] = field(default_factory=list)         # the target's per-epoch checkpoint dirs
    data_fields: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> load_records fields (CLI)
    #: role -> records the caller already read (the CLI's one --data file split by --label-field); used
    #: instead of reading `data[role]`, which then only names the file in error messages
    loaded: dict[str, list[Any]] = field(default_factory=dict)
    show_pii: bool = False
    cache: ModelCache = field(default_factory=ModelCache)
    log: Callable[[str], None] = say
    progress: bool = True
    #: where each file the kind writes goes, by its usual name ("data.jsonl" -> the CLI's --out); a name not
    #: here goes to `out / name`, a name mapped to None is not written (an optional CLI output not asked for)
    outputs: dict[str, Path | None] = field(default_factory=dict)
    #: role -> the option a command names it by where that is not `--ROLE` (perplexity's target is `--model`)
    model_flags: dict[str, str] = field(default_factory=dict)

    def output_file(self, name: str) -> Path | None:
        """Where to write the file the kind calls `name` (None: the caller does not want it)."""
        return self.outputs[name] if name in self.outputs else self.out / name

    def shown(self, text: str | None) -> str:
        """A model spec as a shareable output shows it: masked as a message is unless show_pii (a model dir
        named after a person titled a plot), so a path's digits (runs/2025061514/) stay as they are."""
        from leakaudit.data.pii_mask import mask_message

        return str(text) if self.show_pii else mask_message(str(text))

    def model(self, role: str = "target") -> Any:
        """The loaded model of a role (None when the role is not given). A model that cannot be loaded is
        an error naming the role's option (`--target`, `--reference`), not the loader's `--model`."""
        try:
            return self.cache.get(self.models.get(role))
        except InputError as exc:
            if exc.field == "--model":
                exc.field = self.model_flags.get(role, f"--{role}")
            raise

    def records(self, role: str = "data", **defaults: Any) -> list[Any]:
        """The records of a data role, read with the fields the caller gave (text_field, id_field, ...);
        `defaults` are the kind's own defaults for fields the caller did not give (e.g. user_field='user')."""
        from leakaudit.data.io import load_records

        if role in self.loaded:
            return self.loaded[role]
        if role not in self.data:
            raise InputError(f"this evaluation needs '{role}'", field=role)
        fields = {**defaults, **self.data_fields.get(role, {})}
        records = load_records(self.data[role], **fields)
        if fields.get("user_field"):
            from leakaudit.warn import say_lookalike_users

            say_lookalike_users([(r.user, r.line) for r in records], self.data[role], fields["user_field"])
        return records


class Kind:
    """One evaluation or generation kind. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str]
    section: ClassVar[Section]
    Options: ClassVar[type[KindOptions]] = KindOptions
    Result: ClassVar[type[Result]] = Result
    #: data roles (members, nonmembers, data) and model roles (reference, baseline, model) it reads;
    #: True = required. `target` is implied for evaluations.
    roles: ClassVar[dict[str, bool]] = {}
    summary: ClassVar[str] = ""
    #: True when `run` is data-parallel under a launcher (every process calls it; it scores through
    #: leakaudit.distributed and writes on the main process only); otherwise rank 0 runs it alone
    data_parallel: ClassVar[bool] = False
    #: raised when the kind's results for the same inputs and options change (a fix), with `changed` saying
    #: how: an experiment's stages of it finished by an earlier release run again, and the log says why
    #: (version 1 stays out of stage keys, so raising one kind's keeps every other stage cached)
    version: ClassVar[int] = 1
    changed: ClassVar[str] = ""
    #: dotted option paths holding a list of model specs in which an experiment may name its own models (a
    #: `models:` entry, a fine-tune): the plan resolves each such name, the stage reads it as that model's spec
    model_list_options: ClassVar[tuple[str, ...]] = ()

    def check(self, options: KindOptions, roles: set[str]) -> None:
        """Checks that need more than the options (e.g. an attack that needs a reference model).
        Raise leakaudit.errors.OptionError(loc, message)."""

    def run(self, ctx: KindContext, options: KindOptions) -> Result:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------------------- report helpers
def fmt(x: Any, digits: int = 3) -> str:
    """A number as the report shows it ('–' for missing or not finite). Rounded from its 12 significant digits,
    so 0.7525 and 0.7525000000000001 (one AUC reached two ways) print alike; a value that is not 0 but rounds
    to it keeps two significant digits (a CI bound of 0.00012 beside "increase" printed as 0.000)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        x = float(f"{x:.12g}")
        if x != 0 and abs(x) < 0.5 * 10 ** -digits:
            return f"{x:.2g}"
        return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.4g}"
    return str(x)


#: what the tables' TPR at a low FPR is, said beside them (the page named the columns and never said it)
LOW_FPR = ("TPR@1%FPR = the share of members an attacker flags at the score threshold that flags 1% of the "
           "non-members (0.1% likewise): how many members it exposes while rarely accusing anyone wrongly; 95% "
           "bootstrap CI. It needs at least 1 / FPR non-members to be resolved, so with fewer it reads n/a.")


#: a stage result's warnings printed while it ran (warn_once: a window clamped, texts cut), kept by the
#: experiment engine beside a kind's own `warnings` and shown under the kind's section
WARNINGS_SAID = "warnings_said"


def warning_lines(warned: dict[str, list[str]], n_stages: int) -> list[str]:
    """A report section's warnings: each once, with the stages that gave it ("every stage" when all did)."""
    return [f"{w} ({'every stage' if len(where) == n_stages and n_stages > 1 else ', '.join(where)})"
            for w, where in warned.items()]


def ci_text(ci: Any, digits: int = 3) -> str:
    """An interval as every table of the report writes it: '[lo, hi]' ('–' without one)."""
    if not ci or len(ci) != 2 or ci[0] is None:
        return "–"
    return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


#: how to redo a stage whose file was damaged (a stage finished before stage.json recorded its files, which
#: `leakaudit run` would otherwise keep as finished)
REDO = "to redo its stage, delete the stage.json beside it and rerun `leakaudit run`"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object a stage wrote (empty when it is not there yet); like read_jsonl, a file that does not
    parse was changed outside leakaudit: a one-line error naming it."""
    import json

    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"stage file changed outside leakaudit ({exc}); {REDO}", file=path) from None
    if not isinstance(obj, dict):
        raise InputError(f"stage file changed outside leakaudit (not a JSON object); {REDO}", file=path)
    return obj


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file a stage wrote (empty when it is not there yet). Stages write atomically, so a bad
    row means the file was changed outside leakaudit: a one-line error naming it, for the report too."""
    from leakaudit.data.io import read_jsonl_rows

    if not path.exists():
        return []
    try:
        return [row for _, row in read_jsonl_rows(path)]
    except InputError as exc:
        raise InputError(f"stage file changed outside leakaudit ({exc.message}); {REDO}", file=path,
                         line=exc.line) from None
