"""Data-parallel scoring under `accelerate launch` or `torchrun`: each process scores a shard, all gather.

Why: scoring is embarrassingly parallel over texts. Process r of W takes texts r, r+W, r+2W, ... (an even
mix of lengths), scores them with the ordinary engine, and the per-token arrays are all-gathered as
plain float32 tensors (no pickling) and put back in input order, so every process ends with the list a
single process would have produced. With one process (no WORLD_SIZE, or 1) these helpers just call
through. Only the main process should write outputs (`is_main()`). `leakaudit run` under a launcher runs the
steps that are not data-parallel (generation, comparisons) on rank 0 alone (`alone()`) while the others wait.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from leakaudit.scoring import TokenScores

# torch and the scoring engine are imported where used: `world()` and `is_main()` are asked before a run
# checks its experiment file, whose errors must not wait seconds for torch to load


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when not launched in parallel."""
    return _launcher_number("RANK", 0), _launcher_number("WORLD_SIZE", 1)


def _launcher_number(name: str, default: int) -> int:
    """A launcher's variable as a number; set empty (`RANK= cmd`, a blank line in a .env file) it is unset, and
    anything else not a number is one `error:` line naming it (every command failed with a ValueError
    traceback before it read its arguments)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        from leakaudit.errors import InputError

        what = "index" if name == "RANK" else "count"
        raise InputError(f"'{value}' is not a number (a launcher's process {what}, which torchrun sets): unset it "
                         "to run as one process", field=name) from None


#: what MPI launchers (mpirun of Open MPI, MPICH or Intel MPI, MVAPICH; srun --mpi) set in each process
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def mpi_launch_without_rank() -> str | None:
    """Why this process cannot run: started as one of several by an MPI launcher, which sets no RANK or
    WORLD_SIZE, every process took itself for the only one and wrote the same files. None otherwise."""
    if os.environ.get("WORLD_SIZE", "").strip():  # a launch torchrun or accelerate made (empty is unset)
        return None
    for var in MPI_SIZE_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 1:
            return (f"{var}={value}: started as one of {value} processes by an MPI launcher, which sets no RANK "
                    "and WORLD_SIZE (each process would take itself for the only one and write the same files): "
                    "start them with torchrun or accelerate launch")
    return None


def is_main() -> bool:
    """Whether this is the process that writes outputs (rank 0, or the only process): the one such check."""
    return world()[0] == 0


#: how long `barrier` and `broadcast_int` wait for the other processes: under `leakaudit run` they wait while
#: rank 0 alone generates text, which can take hours at a study's scale, past torch's default (30 min for
#: gloo, 10 for NCCL). Only those waits get it (a group of their own): a hung collective in training still
#: fails at the default. A rank that dies does not leave the others waiting: the launcher stops them all.
WAIT = timedelta(hours=24)
_waiting: Any = None  # the process group of the long waits, made once by every process
_leaving = False  # whether the group is destroyed at exit (registered once)


def check_rendezvous() -> None:
    """A launcher's environment half there is one line, not torch's or the Trainer's 70-90-line traceback:
    several processes (WORLD_SIZE > 1, or a LOCAL_RANK the Trainer takes for a launch) need MASTER_ADDR and
    MASTER_PORT, which torchrun and accelerate launch set, to find each other."""
    from leakaudit.errors import InputError

    env = os.environ
    if (world()[1] > 1 or "LOCAL_RANK" in env) and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        which = f"WORLD_SIZE={env['WORLD_SIZE']}" if world()[1] > 1 else f"LOCAL_RANK={env['LOCAL_RANK']}"
        raise InputError(f"{which} says this is one of several processes, but MASTER_ADDR and MASTER_PORT (where "
                         "they meet) are not both set: start them with torchrun or accelerate launch, or unset it "
                         "for one process", field="MASTER_ADDR")


def _group() -> None:
    """Join the launcher's process group once (gloo for the CPU tensors this module exchanges)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        check_rendezvous()
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    global _leaving
    if not _leaving:  # also a group the Trainer (accelerate) made first
        _leaving = True
        atexit.register(_leave_group)


def _leave_group() -> None:
    """Destroy the process group at exit: left to the interpreter's teardown, gloo's threads were destroyed
    while still joinable and a process aborted after its work was done ("terminate called without an active
    exception", exit -6: a launched rerun failed though every stage was cached)."""
    import torch.distributed as dist

    global _waiting
    if dist.is_initialized():
        dist.destroy_process_group()
    _waiting = None


def _wait_group() -> Any:
    """A gloo group of every process with the long timeout (made by all of them at their first wait)."""
    global _waiting
    import torch.distributed as dist

    _group()
    if _waiting is None:
        _waiting = dist.new_group(backend="gloo", timeout=WAIT)
    return _waiting


#: how long a process other than rank 0 whose wait on rank 0 failed waits before it says so: the launcher
#: stops it first when rank 0 failed (and printed its own error line); otherwise the failure is its own
PEER_GRACE_S = 3.0


@contextmanager
def _peer_guard() -> Iterator[None]:
    """A process other than rank 0 waiting on rank 0 when rank 0 stops (it failed on bad input and printed the
    one error line, or was interrupted): the collective raises (gloo: "Connection closed by peer"), and the
    traceback buried rank 0's line under 45 more. This process waits PEER_GRACE_S (the launcher stops it then)
    and otherwise says what failed in one line, exit 1: a failure of its own (a timed-out wait, a broken
    group) is not hidden."""
    try:
        yield
    except RuntimeError as exc:
        rank = world()[0]
        if rank == 0:
            raise
        import sys
        import time

        from leakaudit.errors import one_line

        time.sleep(PEER_GRACE_S)
        print(f"[rank {rank}] error: waiting on rank 0 failed: {one_line(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def join() -> None:
    """Join the group of the long waits now (no-op with one process). Called by every process before rank 0
    checks an experiment: when a check fails, rank 0 exits and the others' wait ends at once on the closed
    connection. Joined only at the first wait, they sat in the group's set-up for a rank 0 that never came,
    where the launcher's SIGTERM does not reach Python: torchrun killed them 30 s later, and a process
    started without torchrun (one per pod) waited the 30-minute store timeout."""
    if world()[1] > 1:
        with _peer_guard():
            _wait_group()


def barrier() -> None:
    """Wait for every process (no-op with one process), as long as rank 0 takes (`WAIT`)."""
    if world()[1] > 1:
        import torch.distributed as dist

        with _peer_guard():
            dist.barrier(group=_wait_group())


def broadcast_int(value: int) -> int:
    """Rank 0's `value`, on every process (a decision only rank 0 may take, e.g. whether a stage is cached)."""
    if world()[1] == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    with _peer_guard():
        dist.broadcast(t, src=0, group=_wait_group())
    return int(t.item())


@contextmanager
def alone() -> Iterator[None]:
    """Run a step on this process as if it were the only one (`world()` is (0, 1), WORLD_SIZE=1 for the
    libraries that read it): for rank 0 doing a step that is not data-parallel while the others wait. Every
    collective in it would otherwise wait for processes that never join."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shard(n: int) -> list[int]:
    """Indices of the items this process handles: rank, rank + W, ... (all of them with one process)."""
    rank, size = world()
    return list(range(rank, n, size))


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    import torch
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(out, t)
    return out


def gather_ragged(local: Sequence[np.ndarray], n_total: int) -> list[np.ndarray]:
    """All-gather float32 1-D arrays produced for `shard(n_total)` on each process; return all in input order."""
    rank, size = world()
    if size == 1:
        return [np.asarray(a, dtype=np.float32) for a in local]
    import torch

    _group()
    per_rank = [len(range(r, n_total, size)) for r in range(size)]
    if len(local) != per_rank[rank]:
        raise RuntimeError(f"rank {rank} has {len(local)} results, expected {per_rank[rank]}")
    width = max(per_rank)
    lengths = torch.zeros(width, dtype=torch.int64)
    lengths[: len(local)] = torch.tensor([len(a) for a in local], dtype=torch.int64)
    all_lengths = _all_gather(lengths)
    totals = [int(x.sum()) for x in all_lengths]
    flat = torch.zeros(max(max(totals), 1), dtype=torch.float32)
    if local:
        values = np.concatenate([np.asarray(a, dtype=np.float32) for a in local])
        flat[: len(values)] = torch.from_numpy(values)
    all_flat = _all_gather(flat)
    out: list[np.ndarray | None] = [None] * n_total
    for r in range(size):
        pos = 0
        for j, i in enumerate(range(r, n_total, size)):
            n = int(all_lengths[r][j])
            out[i] = all_flat[r][pos:pos + n].numpy().copy()
            pos += n
    return out  # type: ignore[return-value]


def gather_floats(local: Sequence[float], n_total: int) -> np.ndarray:
    """All-gather one number per item (e.g. a gradient norm) computed for `shard(n_total)`."""
    parts = gather_ragged([np.array([x], dtype=np.float32) for x in local], n_total)
    return np.array([p[0] for p in parts], dtype=np.float64)


@contextmanager
def window_warning_of_all(lm) -> Iterator[None]:
    """Around one process's scoring of its shard: the window warning it would say is said once, after, with
    every process's counts summed. Said per shard, a launched run warned "14 of 14 texts are longer than the
    16-token window" where one process said "27 of 27"."""
    import torch
    import torch.distributed as dist

    from leakaudit import scoring

    counts: list[tuple] = []
    saved, scoring._strided_counts = scoring._strided_counts, counts
    try:
        yield
    finally:
        scoring._strided_counts = saved
    total = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts), int(any(c[4] for c in counts))],
                         dtype=torch.int64)
    _group()  # the wrappers use it under a launcher only: with one process they are score_texts / score_ids
    dist.all_reduce(total)
    if counts:  # every process scored (an empty shard too); window, step and what is counted are the same
        _, _, window, step, _, counted = counts[0]
        scoring._say_strided(lm, int(total[0]), int(total[1]), window, step, bool(total[2]), counted)


def score_texts_distributed(lm, texts: Sequence[str], *, prefixes: str | Sequence[str | None] | None = None,
                            moments: bool = False, **kwargs) -> list[TokenScores]:
    """`scoring.score_texts` with the same signature, data-parallel across launched processes.

    Every process returns the full list in input order. With one process it is exactly score_texts.
    """
    from leakaudit.scoring import score_texts

    rank, size = world()
    if size == 1:
        return score_texts(lm, texts, prefixes=prefixes, moments=moments, **kwargs)
    texts = list(texts)
    mine = shard(len(texts))
    if prefixes is None or isinstance(prefixes, str):
        my_prefixes = prefixes
    else:
        prefixes = list(prefixes)
        if len(prefixes) != len(texts):
            raise ValueError("prefixes must match texts in length")
        my_prefixes = [prefixes[i] for i in mine]
    with window_warning_of_all(lm):
        local = score_texts(lm, [texts[i] for i in mine], prefixes=my_prefixes, moments=moments,
                            progress=kwargs.pop("progress", True) and rank == 0, **kwargs)
    return _gather_scores(local, len(texts), moments)


def _gather_scores(local: Sequence[TokenScores], n_total: int, moments: bool) -> list[TokenScores]:
    """Every process's token scores for its shard → all of them, in input order, on every process."""
    from leakaudit.scoring import TokenScores

    logp = gather_ragged([s.logp for s in local], n_total)
    if not moments:
        return [TokenScores(lp) for lp in logp]
    mu = gather_ragged([s.mu for s in local], n_total)
    var = gather_ragged([s.var for s in local], n_total)
    return [TokenScores(a, b, c) for a, b, c in zip(logp, mu, var, strict=True)]


def score_ids_distributed(lm, contexts: Sequence[Sequence[int]], ids: Sequence[Sequence[int]],
                          **kwargs) -> list[TokenScores]:
    """`scoring.score_ids` with the same signature, data-parallel across launched processes (each a shard of
    the (context, ids) pairs, all gathered); exactly score_ids with one process."""
    from leakaudit.scoring import score_ids

    rank, size = world()
    if size == 1:
        return score_ids(lm, contexts, ids, **kwargs)
    if len(contexts) != len(ids):
        raise ValueError("contexts must match ids in length")
    mine = shard(len(ids))
    with window_warning_of_all(lm):
        local = score_ids(lm, [contexts[i] for i in mine], [ids[i] for i in mine],
                          progress=kwargs.pop("progress", True) and rank == 0, **kwargs)
    return _gather_scores(local, len(ids), moments=kwargs.get("moments", False))
