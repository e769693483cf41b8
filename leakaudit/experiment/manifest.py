"""What a finished stage wrote, recorded in its stage.json, so a file deleted, cut short or edited afterwards is
noticed instead of read: the report rebuilt its comparisons from a stage's per-item files, so a missing
logprobs.jsonl turned "increase" into "not comparable" and ten deleted rows moved an AUC, while the run said
every stage was cached and exited 0.

Small files (the per-item results a report reads) are recorded with their SHA-256, large ones (model weights)
with their size only, so checking a run of many models stays fast; files added later are not checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: files up to this size are hashed; larger ones (weights, checkpoints) are compared by size
HASH_LIMIT = 16 * 2**20
#: the engine's own markers, written around the outputs
MARKERS = ("stage.json", ".key")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def output_manifest(stage_dir: Path) -> dict[str, list[Any]]:
    """Every file the stage wrote (relative path -> [size, sha256 or None when larger than HASH_LIMIT])."""
    out = {}
    for p in sorted(stage_dir.rglob("*")):
        rel = p.relative_to(stage_dir).as_posix()
        if p.is_file() and rel not in MARKERS:
            size = p.stat().st_size
            out[rel] = [size, _sha256(p) if size <= HASH_LIMIT else None]
    return out


def changed_output(stage_dir: Path, info: dict[str, Any]) -> str | None:
    """The first recorded output that is gone or differs now ('FILE was deleted' / 'FILE was changed'), else None.
    A stage recorded before manifests existed has none to check."""
    for rel, (size, digest) in (info.get("outputs") or {}).items():
        p = stage_dir / rel
        if not p.is_file():
            return f"{rel} was deleted"
        if p.stat().st_size != size or (digest is not None and _sha256(p) != digest):
            return f"{rel} was changed"
    return None
