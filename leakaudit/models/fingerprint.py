"""The cache dir, and content fingerprints of model files and weights (what identifies a model's exact weights).

Converted models are built once per key under the cache, guarded by a file lock so two processes starting at
once do not clash."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cache_dir() -> Path:
    """Where converted models and score caches live (`LEAKAUDIT_CACHE`, default ~/.cache/leakaudit). An empty
    LEAKAUDIT_CACHE (`LEAKAUDIT_CACHE= cmd`, a blank line in a .env file) is unset: it was the working directory,
    which then got models/, filehash/ and scores.sqlite; `~` in it is the home folder, not a folder named `~`."""
    from leakaudit.errors import InputError

    given = os.environ.get("LEAKAUDIT_CACHE", "")
    if given:
        d = Path(given).expanduser()
    else:
        try:
            d = Path.home() / ".cache" / "leakaudit"
        except (RuntimeError, KeyError):  # no HOME and no passwd entry (a container run with an arbitrary uid)
            raise InputError("no home directory to keep the cache in: set LEAKAUDIT_CACHE to a writable "
                             "directory", field="LEAKAUDIT_CACHE") from None
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, FileNotFoundError, NotADirectoryError) as exc:  # a file there, a path under /proc
        raise InputError(f"cannot be the cache directory ({exc.strerror})", file=d,
                         field="LEAKAUDIT_CACHE" if given else None) from None
    except OSError as exc:  # read-only (a read-only HOME): still an OSError, for the callers that go on without
        raise _unwritable_cache(exc) from None
    return d


def _unwritable_cache(exc: OSError) -> OSError:
    """`exc` saying which directory it is and what to do: "error: /home/u/.cache: Permission denied" left a user
    wondering why leakaudit writes there."""
    return type(exc)(exc.errno, f"{exc.strerror or exc} (leakaudit's cache: set LEAKAUDIT_CACHE to a writable "
                     "directory)", exc.filename)


def file_sha256(path: Path) -> str:
    """Content hash of a file, memoised in the cache by (path, inode, size, mtime, ctime) so big weights hash
    once. ctime and inode too: `cp -p`, `rsync -a`, `tar x` and `touch -r` restore an mtime, and weights
    rewritten in place with the same size and an old mtime kept their old hash (and cached scores)."""
    st = path.stat()
    # the path as the file system's bytes: a name that is not UTF-8 (a Latin-1 folder) is text with surrogates
    memo_key = hashlib.sha256(os.fsencode(path.resolve()) + f"|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|"
                              f"{st.st_ctime_ns}".encode()).hexdigest()
    try:
        memo: Path | None = cache_dir() / "filehash" / memo_key
    except OSError as exc:  # a cache dir that cannot be made (a read-only file system): hash without the memo
        from leakaudit.warn import warn_once

        warn_once(f"the cache cannot be made ({exc.strerror or exc}): file hashes are computed again each time")
        memo = None
    if memo is not None and memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is None:
        return digest
    tmp = memo.with_suffix(f".{os.getpid()}")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(digest)
        tmp.replace(memo)
    except OSError as exc:  # a read-only or full cache (a team's shared one): the hash is known, only not kept
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        from leakaudit.warn import warn_once

        warn_once(f"the cache {cache_dir()} cannot be written ({exc.strerror or exc}): file hashes are computed "
                  "again each time")
    return digest


#: a model dir's files that change what it computes: weights, configs, tokenizer (chat templates in .jinja)
_FINGERPRINT_FILES = (".safetensors", ".json", ".model", ".txt", ".gguf", ".bin", ".pt", ".pth", ".jinja")


def dir_fingerprint(path: Path) -> str:
    """Hash of the weight, config and tokenizer files of a model or adapter dir (not logs or checkpoints),
    of the file config.json's `transformers_weights` names (transformers loads it instead, from a subfolder or
    under any name), and of the shards a weights index names in a subfolder (transformers loads them from there)."""
    import json

    files = {f.name: f for f in path.iterdir()
             if f.is_file() and f.suffix in _FINGERPRINT_FILES and f.name not in ("train_log.jsonl", "trainer_state.json")}
    try:
        explicit = json.loads((path / "config.json").read_text()).get("transformers_weights")
    except (ValueError, AttributeError, OSError):
        explicit = None  # no config (an adapter) or not one loading would accept
    if isinstance(explicit, str) and explicit and (path / explicit).is_file():
        files.setdefault(explicit, path / explicit)
    for index in [f for name, f in files.items() if name.endswith(".index.json")]:
        try:
            shards = set((json.loads(index.read_text()).get("weight_map") or {}).values())
        except (ValueError, AttributeError, OSError):
            continue  # not an index loading would accept either; the file itself is hashed
        for rel in shards:
            shard = path / str(rel)
            if isinstance(rel, str) and rel not in files and shard.is_file():
                files[rel] = shard
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(file_sha256(files[name]).encode())
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the files a tokenizer saves (vocabulary, merges, special tokens, chat template): with the weights,
    what decides a model's scores; for a model fetched from the hub, whose files leakaudit never sees."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return dir_fingerprint(Path(tmp))


def tensor_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the parameters themselves, for models changed in memory (e.g. after training in-process)."""
    import torch  # here: file hashes (the experiment's stage records) need no torch

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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only LEAKAUDIT_CACHE
        raise _unwritable_cache(exc) from None
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        for stale in target.parent.glob(f"{target.name}.tmp*"):  # a build killed (-9) before: none runs now,
            shutil.rmtree(stale, ignore_errors=True)               # we hold the lock (up to a model's size each)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar: noise before a command's
        try:                               # first line (and before its one-line error on bad input)
            build(tmp)
        except BaseException:  # a failed build (a bad file, a kill the process sees) leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target
