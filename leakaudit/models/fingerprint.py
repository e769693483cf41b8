"""The cache dir, and content fingerprints of model files and weights (what identifies a model's exact weights).

Converted models are built once per key under the cache, guarded by a file lock so two processes starting at
once do not clash."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch


def cache_dir() -> Path:
    """Where converted models and score caches live (`LEAKAUDIT_CACHE`, default ~/.cache/leakaudit)."""
    d = Path(os.environ.get("LEAKAUDIT_CACHE", Path.home() / ".cache" / "leakaudit"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def file_sha256(path: Path) -> str:
    """Content hash of a file, memoised in the cache by (path, size, mtime) so big weights hash once."""
    st = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / "filehash" / memo_key
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}")
    tmp.write_text(digest)
    tmp.replace(memo)
    return digest


_FINGERPRINT_FILES = (".safetensors", ".json", ".model", ".txt", ".gguf", ".bin", ".pt", ".pth")


def dir_fingerprint(path: Path) -> str:
    """Hash of the weight, config and tokenizer files of a model or adapter dir (not logs or checkpoints)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in _FINGERPRINT_FILES and f.name not in ("train_log.jsonl", "trainer_state.json"):
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()[:32]


def tensor_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the parameters themselves, for models changed in memory (e.g. after training in-process)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(p.dtype).encode())
        h.update(p.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _converted_dir(key: str) -> Path:
    return cache_dir() / "models" / key


def build_once(key: str, build) -> Path:
    """Run build(tmp_dir) once per key, atomically, under a lock (safe with concurrent processes)."""
    from filelock import FileLock

    target = _converted_dir(key)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target
