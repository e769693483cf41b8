"""What a fine-tuning run leaves on disk: loadable model/adapter dirs and Trainer checkpoints.

A leaf module shared by the trainers (finetune, dp), the checkpoint callback and the evaluators of a run's
checkpoints, so none of them imports the fine-tuning entry point for these helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from leakaudit.data.io import link_or_copy, write_json


def base_reference(spec: str) -> str:
    """What adapter_config.json names as base: the spec itself, made absolute when it is a local path."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def save_loadable(model, directory: Path, config, tokenizer=None, state_dict=None) -> None:
    """Save the model/adapter so `load_model(directory)` works (adapters name the original base spec).

    `config`: the run's FinetuneConfig (its method, out and model are read); `state_dict`: the full weights gathered from every rank when the model is sharded (FSDP)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    if config.method == "pissa":
        # the conversion loads the initial adapter, which draws from torch's RNG: mid-run (a checkpoint) that
        # would make the next steps' dropout differ from a run resumed there
        with torch.random.fork_rng():
            model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=str(
                Path(config.out) / "pissa_init"))
    else:
        model.save_pretrained(str(directory), state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    fix_adapter_base(directory, config.model)


def load_saved_weights(model, checkpoint: Path | str) -> None:
    """Load a saved full model's weights into `model` in place through transformers' own loader.
    save_pretrained writes weights under their original names (GPT-NeoX's `lm_head` as `embed_out`), which a
    plain `load_state_dict(strict=False)` skips: a resumed Pythia run went on with its initial output layer,
    and an early-stopped one kept the last step's instead of the best checkpoint's."""
    saved = type(model).from_pretrained(str(checkpoint), dtype=model.dtype)
    model.load_state_dict(saved.state_dict())  # strict: every weight found under the model's own name


def fix_adapter_base(directory: Path, spec: str) -> None:
    """Make a saved adapter name `spec` (absolute when local) as its base, so it loads from any cwd."""
    cfg_path = directory / "adapter_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_reference(spec)
        write_json(cfg_path, cfg)


#: written last by a finished fine-tune: {"fingerprint": of its config, "step": the step of its final weights}
DONE_MARKER = "finetune_done.json"


def checkpoint_number(path: Path) -> int | None:
    """N of a Trainer checkpoint folder `checkpoint-N` (its global step); None for any other name."""
    tail = path.name.split("-")[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def training_step(model_dir: str | Path) -> int | None:
    """The optimizer step a fine-tuning run's weights are from: N for checkpoint-N (or its adapter/ folder),
    the step recorded for the run's final model; None for anything else (a base model, a run from before the
    step was recorded)."""
    path = Path(model_dir)
    path = path.parent if path.name == "adapter" else path
    if (number := checkpoint_number(path)) is not None:
        return number
    try:
        step = json.loads((path / DONE_MARKER).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def checkpoint_dirs(out: Path) -> list[Path]:
    """Trainer checkpoints under a run dir, in step order."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and checkpoint_number(p) is not None]
    return sorted(found, key=checkpoint_number)


def last_checkpoint(out: Path, remove: bool = True) -> Path | None:
    """The newest complete checkpoint (one with trainer_state.json, every file readable), to resume from. One
    without trainer_state.json was half-written by a kill, one with a damaged file (a zero-byte optimizer.pt,
    a cut safetensors) would stop the resume with a library's traceback: both are skipped, and with `remove`
    deleted (a warning for the second). Only the process that writes checkpoints may remove: another rank
    could judge a checkpoint rank 0 is still writing damaged."""
    from leakaudit.warn import warn_once

    for ckpt in reversed(checkpoint_dirs(out)):
        if (ckpt / "trainer_state.json").exists():
            bad = damaged_file(ckpt)
            if bad is None:
                return ckpt
            warn_once(f"{ckpt}: {bad} cannot be read; resuming from the checkpoint before it")
        if remove:
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def damaged_file(ckpt: Path) -> str | None:
    """The first file of a checkpoint that cannot be read as what it claims to be (JSON that does not parse, a
    safetensors file whose header or length is off, a torch file that is no zip archive), or None. Reads
    headers only: cheap next to the resume itself."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    for f in sorted(p for p in Path(ckpt).rglob("*") if p.is_file()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".safetensors":
                with safe_open(str(f), "pt"):
                    pass
            elif f.suffix in (".pt", ".pth") and not zipfile.is_zipfile(f):
                return str(f.relative_to(ckpt))
        except (OSError, ValueError, SafetensorError):
            return str(f.relative_to(ckpt))
    return None


# What a checkpoint holds only so that training can resume (the Trainer's files, and DP-SGD's optimizer).
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng_state", "dp_optimizer")
# What a Trainer checkpoint holds beside the loadable files and is not one of them.
CHECKPOINT_ONLY = ("trainer_state", "training_args")


def drop_resume_state(out: Path) -> None:
    """Delete the optimizer, scheduler, scaler and RNG states from a finished run's checkpoints. Only a resume
    reads them, and a finished run is never resumed; the weights stay, so every checkpoint still loads and
    evaluates. (A full fine-tune of the default model keeps 1.1 GB of AdamW state per checkpoint.)"""
    for ckpt in checkpoint_dirs(out):
        for entry in list(ckpt.iterdir()):
            if not entry.name.startswith(RESUME_ONLY):
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def link_loadable(checkpoint: Path, directory: Path) -> None:
    """Give `directory` the loadable files of a checkpoint that holds the final weights: the files
    `save_loadable` would write, without writing the weights a second time (538 MB for the default model in
    fp32). Weights are hard-linked (copied where the file system has no links): safetensors files are never
    written in place; the small files are copied, so no later write to one can change the other."""
    for src in checkpoint.iterdir():
        if not src.is_file() or src.name.startswith(RESUME_ONLY + CHECKPOINT_ONLY):
            continue
        dest = directory / src.name
        dest.unlink(missing_ok=True)
        (link_or_copy if src.suffix == ".safetensors" else shutil.copy2)(src, dest)
