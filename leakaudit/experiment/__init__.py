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

Where things are: `plan.py` (stages, keys, stage folders), `checks.py` (everything checked before a stage
runs), `stages.py` (what each stage does; generate and evaluate steps run their kind), `engine.py` (run,
resume, run.json, report).
"""

from leakaudit.data.split import shuffled, split_rows
from leakaudit.experiment.checks import check_plan, prepare_out, resolve_models, stage_options
from leakaudit.experiment.engine import is_done, run_experiment, run_plan, versions, write_run_record
from leakaudit.experiment.plan import (
           Plan,
           Stage,
           file_identity,
           inside,
           model_identity,
           remove_stale,
           stage_dir,
)
from leakaudit.experiment.stages import RUNNERS, StageContext, run_kind_stage

__all__ = ["RUNNERS", "Plan", "Stage", "StageContext", "check_plan", "file_identity", "inside", "is_done",
           "model_identity", "prepare_out", "remove_stale", "resolve_models", "run_experiment", "run_kind_stage",
           "run_plan", "shuffled", "split_rows", "stage_dir", "stage_options", "versions", "write_run_record"]
