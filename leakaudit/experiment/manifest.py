"""A finished stage's record (its stage.json: key, result, what it wrote), read by the engine and the report.

What it wrote is recorded so that a file deleted, cut short or edited afterwards is noticed instead of read:
the report rebuilt its comparisons from a stage's per-item files, so a missing logprobs.jsonl turned
"increase" into "not comparable" and ten deleted rows moved an AUC, while the run said every stage was cached
and exited 0. Every file is recorded with its size and SHA-256 (models.file_sha256, memoised by inode, size
and times, so checking a run of many models again hashes only what changed); files added later are not
checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the engine's own markers, written around the outputs
MARKERS = ("stage.json", ".key")


def is_leftover(p: Path) -> bool:
    """A temporary file a write left behind when it was killed (`data.io.write_atomic`'s NAME.PID.tmp, the
    training log's .tmp): never an output, nor state a stage resumes from, as the write renames it into place
    when it completes. Recorded as an output, it made the stage and all it fed run again once it was deleted."""
    return p.suffix == ".tmp" and p.is_file()


def drop_leftovers(stage_dir: Path) -> None:
    """Delete the killed writes' temporary files of a stage about to run (or resume) in its folder."""
    for p in sorted(stage_dir.rglob("*.tmp")):
        if is_leftover(p):
            p.unlink(missing_ok=True)


def is_done(stage_dir: Path, key: str) -> dict[str, Any] | None:
    """The stage's record when it finished with this key, else None."""
    marker = stage_dir / "stage.json"
    if not marker.exists():
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:  # not JSON, or not UTF-8 text: not a finished stage's record
        return None
    return info if isinstance(info, dict) and info.get("key") == key else None


def output_manifest(stage_dir: Path) -> dict[str, list[Any]]:
    """Every file the stage wrote: relative path -> [size, sha256]."""
    from leakaudit.models import file_sha256

    out = {}
    for p in sorted(stage_dir.rglob("*")):
        rel = p.relative_to(stage_dir).as_posix()
        if p.is_file() and rel not in MARKERS and not is_leftover(p):
            out[rel] = [p.stat().st_size, file_sha256(p)]
    return out


def changed_output(stage_dir: Path, info: dict[str, Any]) -> str | None:
    """The first recorded output that is gone or differs now ('FILE was deleted' / 'FILE was changed'), else
    None. A stage recorded before manifests existed has none to check."""
    from leakaudit.models import file_sha256

    for rel, (size, digest) in (info.get("outputs") or {}).items():
        p = stage_dir / rel
        if not p.is_file():
            return f"{rel} was deleted"
        if p.stat().st_size != size or (digest is not None and file_sha256(p) != digest):
            return f"{rel} was changed"
    return None


def older_split(kind: str, sdir: Path) -> str | None:
    """Why a finished fine-tune that held data out is stale: an earlier release held rows out one by one, so a
    repeated text was both trained on and in the eval loss early stopping watches; its finetune_config.json
    records no held-out rule (every release since the fix records `heldout`). None for any other stage."""
    if kind != "finetune":
        return None
    try:
        record = json.loads((sdir / "model" / "finetune_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged stage is found stale by its outputs' hashes
    if not isinstance(record, dict) or not (record.get("eval_fraction") or record.get("early_stopping_patience")
                                            is not None):
        return None
    from leakaudit.train.defenses import HELDOUT_RULE

    if record.get("heldout") == HELDOUT_RULE:
        return None
    return ("trained on the held-out split of an earlier release (rows held out one by one, so a repeated text was "
            "trained on and evaluated; every copy of a held-out text is held out with it now)")


def older_results(out: Path, records: list[dict[str, Any]]) -> list[str]:
    """The finished stages of a run dir (run.json's records) whose results an earlier leakaudit computed and
    this one computes anew, one line each: a kind's `version` above the one recorded (run.json records it from
    2 on, so a release before versions recorded none), or a fine-tune on an earlier held-out split. Why: the
    report and `leakaudit seeds` read what is there, and a plain `leakaudit run` reruns these."""
    from leakaudit.kinds import get_kind

    notes = []
    for r in records:
        if r.get("result") is None or not r.get("folder"):
            continue
        if (why := older_split(str(r.get("kind")), out / r["folder"])) is not None:
            notes.append(f"{r['id']}: {why}")
            continue
        name = (r.get("params") or {}).get("kind") if r.get("kind") == "generate" else r.get("kind")
        try:
            kind = get_kind(str(name))
        except ValueError:  # a dataset or fine-tune step, or a kind this release no longer has
            continue
        if kind.version > int(r.get("version") or 1):
            notes.append(f"{r['id']}: computed by an earlier leakaudit, which may predate {kind.name} version "
                         f"{kind.version} ({kind.changed})")
    return notes
