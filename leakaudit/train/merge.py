"""Merge a LoRA/DoRA/PiSSA adapter into its base, giving a full model dir that loads anywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from leakaudit.data.io import write_json
from leakaudit.errors import InputError


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Load base + adapter in fp32 (folded into the weights on load), save safetensors + tokenizer."""
    from leakaudit.models import load_model

    adapter = Path(adapter_dir).expanduser()  # `~/adapter`, as every --model reads it
    if not (adapter / "adapter_config.json").exists():
        raise InputError("not an adapter dir (no adapter_config.json)", file=adapter, field="--adapter")
    out = Path(out_dir)
    earlier = (out / "leakaudit_merge.json").is_file()  # an earlier merge's output: replaced, once this one loads
    if out.exists() and any(out.iterdir()) and not earlier:
        raise InputError("output dir exists and is not empty", file=out, field="--out")
    try:
        lm = load_model(str(adapter), device="cpu", dtype="fp32")
    except InputError as exc:  # the loader names its own flag, '--model', which merge does not have
        if exc.field != "--model":
            raise
        raise InputError(exc.message, file=exc.file, line=exc.line, field="--adapter") from None
    merged = lm.model  # load_model folds an adapter loaded for inference into the weights
    # Written beside --out, then moved into place: a merge killed or failing while saving left --out holding
    # weights but no leakaudit_merge.json, which its rerun refused as not merge's; and an earlier merge's
    # model was deleted before the new one was saved, so a failed save lost both.
    target = out.resolve()  # a symlinked --out: its folder is replaced, not the link
    staging = target.with_name(f".{target.name}.merging")
    if staging.exists():  # what a killed merge left
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    merged.save_pretrained(str(staging), safe_serialization=True)
    lm.tokenizer.save_pretrained(str(staging))
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    write_json(staging / "leakaudit_merge.json", {"adapter": str(adapter.resolve()), "base": base})
    if target.exists():  # an earlier merge's output, or the empty dir the output check made
        shutil.rmtree(target)
    staging.replace(target)
    return out
