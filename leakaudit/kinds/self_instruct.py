"""Generation kind `self-instruct`: grow instruction data from seed tasks with a generator model.

Why: instruction data a model invents from seed tasks is the other kind of "generated data" the study
fine-tunes on. The loop (ROUGE-L dedup, quality filters, resume by round) is leakaudit/data/synth.py's
`self_instruct`; this file holds its options and the two files it writes: `tasks.jsonl` (one task per row,
appended round by round, what a rerun resumes from) and `data.jsonl` (one row per instance, with `text`,
ready to fine-tune on; see synth.instruction_rows).
"""

from __future__ import annotations

from pydantic import Field

from leakaudit.kinds.base import Kind, KindContext, KindOptions, Result
from leakaudit.kinds.registry import register
from leakaudit.options import BatchSize, InputFile


class SelfInstructOptions(KindOptions):
    n: int = Field(default=50, ge=1, description="how many new tasks to generate")
    seed_tasks: InputFile | None = Field(default=None, description="seed task file (default: the shipped 175)")
    requests_per_round: int = Field(default=8, ge=1)
    max_rounds: int | None = Field(default=None, ge=1, description="default: 20 x ceil(n / requests)")
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.7, gt=0)
    top_p: float = Field(default=0.5, gt=0, le=1)
    batch_size: BatchSize = "auto"


@register
class SelfInstruct(Kind):
    name = "self-instruct"
    section = "generate"
    Options = SelfInstructOptions
    roles = {"model": True}
    summary = "the `model` grows instruction tasks from seed tasks (rows: instruction, input, output, text)"

    def run(self, ctx: KindContext, options: SelfInstructOptions) -> Result:
        from leakaudit import resources
        from leakaudit.data.io import write_jsonl
        from leakaudit.data.synth import instruction_rows, load_seed_tasks, self_instruct
        from leakaudit.errors import InputError

        seeds = load_seed_tasks(options.seed_tasks or resources.path("self-instruct-seed", "seed_tasks.jsonl"))
        lm = ctx.model("model")
        kwargs = {"requests_per_round": options.requests_per_round, "max_rounds": options.max_rounds,
                  "max_new_tokens": options.max_new_tokens, "temperature": options.temperature,
                  "top_p": options.top_p, "seed": ctx.seed, "batch_size": options.batch_size}
        tasks_file = ctx.output_file("tasks.jsonl")
        if ctx.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

            from leakaudit.progress import progress_bar

            with progress_bar(TextColumn("self-instruct"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("round {task.fields[round]}"), unit="tasks") as bar:
                task = bar.add_task("self-instruct", total=options.n, round="-")
                tasks = self_instruct(lm, seeds, tasks_file, options.n, progress=False,
                                      on_round=lambda r, k, total: bar.update(task, completed=total,
                                                                              round=str(r)), **kwargs)
        else:
            tasks = self_instruct(lm, seeds, tasks_file, options.n, progress=False, **kwargs)
        if not tasks:  # else the failure surfaces later as "empty file" in whatever trains on it
            raise InputError(f"the model wrote no task that passed the filters in "
                             f"{options.max_rounds or 'the default number of'} rounds; self-instruct needs an "
                             "instruction-following generator", field="model")
        rows = instruction_rows(tasks)
        flat_file = ctx.output_file("data.jsonl")
        if flat_file is not None and not rows:  # the same later "file is empty" as above, one step on
            raise InputError(f"the model wrote {len(tasks)} task(s) but no input and output for any of them, so "
                             "there is no instruction row to train on (the tasks are kept for a rerun); "
                             "self-instruct needs an instruction-following generator", field="model")
        if flat_file is not None:
            write_jsonl(flat_file, rows)
        return Result({"rows": len(rows), "tasks": len(tasks)})
